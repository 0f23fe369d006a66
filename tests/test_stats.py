"""The one statistics convention: ddof = 1, Student's t intervals, Welch's test for ties."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as scipy_stats

from distillbench import stats


def test_the_spread_is_the_sample_standard_deviation():
    assert stats.std([1.0, 2.0, 3.0, 4.0]) == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert math.isnan(stats.std([5.0]))


def test_equal_repeats_have_no_spread_and_no_interval_width():
    values = [-0.378944127111028] * 3  # np.std leaves ~6e-17 here, from rounding the mean
    assert stats.std(values) == 0 and stats.interval(values).half_width == 0
    assert stats.welch_p(values, values) == 1.0
    assert stats.std([0.5, 0.5 + 1e-15, 0.5]) == 0  # the same weights, evaluated in another process


def test_the_interval_is_student_t_over_the_repeats():
    values = [1.0, 1.4, 0.9, 1.2, 1.1]
    spread = stats.interval(values)
    half = scipy_stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / math.sqrt(5)
    assert spread.mean == pytest.approx(1.12) and spread.half_width == pytest.approx(half) and spread.n == 5
    assert spread.text() == f"1.12 ± {half:.2g}"
    one = stats.interval([2.5, float("nan")])
    assert one.n == 1 and math.isnan(one.half_width) and one.text() == "2.5"
    assert stats.interval([]).text() == "—"


def test_ties_are_what_welch_cannot_separate_from_the_best():
    rng = np.random.default_rng(0)
    groups = {"a": rng.normal(1.0, 0.05, 5), "b": rng.normal(1.02, 0.05, 5), "c": rng.normal(2.0, 0.05, 5),
              "d": [1.5]}  # fmt: skip
    verdicts = stats.ties_with_best(groups)
    assert verdicts == {"a": "best", "b": "tied", "c": "worse", "d": "untested"}
    assert scipy_stats.ttest_ind(groups["b"], groups["a"], equal_var=False).pvalue >= 0.05
    assert stats.ties_with_best({"x": [3.0, 3.1], "y": [1.0, 1.1]}, lower_is_better=False)["x"] == "best"


def test_welch_s_p_value_is_scipy_s_and_a_constant_side_gives_no_warning():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(size=rng.integers(2, 9)), rng.normal(1, 2, size=rng.integers(2, 9))
        assert stats.welch_p(a, b) == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy warns of catastrophic cancellation on equal repeats
        assert 0 < stats.welch_p([5.684064] * 3, [1.2, 1.3, 1.1]) < 0.05
