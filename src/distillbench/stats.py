"""The statistics of every comparison: one convention for spread, intervals and ties (docs/evaluation.md).

- Spread is the sample standard deviation, ``ddof = 1`` (:data:`DDOF`), everywhere.
- A mean's 95% interval is Student's t interval over the repeats (training seeds × evaluation-noise sets):
  mean ± t₀.₉₇₅,ₙ₋₁ · s / √n. One repeat has no interval.
- Two rows are *tied* when Welch's two-sided t-test (unequal variances) does not reject equal means at
  α = 0.05. The best row is the best mean among rows with at least two repeats; a row with fewer cannot be
  tested and is reported as such, never as a winner.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats

DDOF = 1  # sample standard deviation
CONFIDENCE = 0.95
ALPHA = 0.05  # Welch's test: p >= ALPHA means tied


class Interval(NamedTuple):
    mean: float
    half_width: float  # NaN for fewer than two repeats
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def text(self, digits: int = 3) -> str:
        """``mean ± half-width`` (the mean alone for one repeat, ``—`` for none)."""
        if self.n == 0 or math.isnan(self.mean):
            return "—"
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} ± {self.half_width:.2g}"


def clean(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[~np.isnan(values)]


#: repeats that agree to this relative precision are equal (the same weights evaluated in two processes
#: differ in the last digits); their spread is 0, not rounding noise
EQUAL_RTOL = 1e-12


def std(values) -> float:
    """The sample standard deviation (NaN for fewer than two values; exactly 0 for equal repeats, see
    :data:`EQUAL_RTOL`)."""
    values = clean(values)
    if len(values) < 2:
        return math.nan
    if np.ptp(values) <= EQUAL_RTOL * max(1.0, float(np.abs(values).max())):
        return 0.0
    return float(np.std(values, ddof=DDOF))


def interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Student's t interval of the mean of ``values`` (NaNs left out)."""
    values = clean(values)
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, 0)
    if n == 1:
        return Interval(float(values[0]), math.nan, 1)
    t = scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1)
    return Interval(float(values.mean()), float(t * std(values) / math.sqrt(n)), n)


def welch_p(a, b) -> float:
    """Welch's two-sided p-value for equal means (NaN when either side has fewer than two values), as
    ``scipy.stats.ttest_ind(a, b, equal_var=False)``, with equal repeats' spread exactly 0 (:func:`std`)."""
    a, b = clean(a), clean(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)  # the squared standard errors of the means
    if va + vb == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    return float(2 * scipy_stats.t.sf(abs(t), df))


def ties_with_best(groups: dict[str, object], lower_is_better: bool = True, alpha: float = ALPHA,
                   among=None) -> dict:  # fmt: skip
    """For each group (name → its repeats): ``"best"`` (the best mean among the groups with at least two
    repeats, and among the names in ``among`` when given: the students, say, that teacher rows are read
    against), ``"tied"`` (Welch's test does not separate it from the best at ``alpha``), ``"worse"``,
    ``"better"`` (separated and ahead of the best: only a row outside ``among`` can be), or ``"untested"``
    (fewer than two repeats: a single measurement has no interval to compare)."""
    spreads = {name: interval(values) for name, values in groups.items()}
    testable = [
        name for name, spread in spreads.items() if spread.n >= 2 and (among is None or name in among)
    ]
    if not testable:
        return dict.fromkeys(groups, "untested")
    best = (min if lower_is_better else max)(testable, key=lambda name: spreads[name].mean)
    verdicts = {}
    for name, values in groups.items():
        if name == best:
            verdicts[name] = "best"
            continue
        p = welch_p(values, groups[best])
        ahead = (spreads[name].mean < spreads[best].mean) == lower_is_better  # only a row outside ``among``
        if math.isnan(p):
            verdicts[name] = "untested"
        else:
            verdicts[name] = "tied" if p >= alpha else "better" if ahead else "worse"
    return verdicts
