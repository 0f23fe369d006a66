"""Metrics against a known density: the data module's exact mixture (``data=gmm_digits|gmm_mnist``).

- ``log_density_gap``: mean log p₀(x)/d of the model's samples minus that of exact samples. Exact samples
  score E[log p₀]/d (minus the entropy per dimension); a model that spreads mass where p₀ is small scores
  lower; concentrating on the modes scores higher, so the gap is read with the other metrics, never alone.
- ``coverage_tv``: ½ Σ_c |mean over samples of p(c | x) − p(c)|, the total-variation distance between the
  samples' class shares under the clean mixture and the class prior (a dropped or halved class shows here).
- ``clamped_fraction``: the share of sample values outside [-1, 1], which the image feature extractors see
  clipped (the mixture's samples are not confined to [-1, 1]).

No metric clips: the log-density and class posterior read the samples as the sampler made them (docs/gmm.md).
"""

from __future__ import annotations

import torch


def mixture_of(datamodule):
    """The data module's exact mixture (it needs ``log_prob`` and ``class_posterior``)."""
    mixture = getattr(datamodule, "mixture", None)
    if mixture is None or not hasattr(mixture, "log_prob"):
        raise ValueError(
            f"ground-truth metrics need data with an exact mixture (data=gmm_digits or gmm_mnist), "
            f"not data '{datamodule.name}'"
        )
    return mixture


def mean_log_density(mixture, x: torch.Tensor) -> float:
    """Mean log p₀(x) / d (non-finite samples make it non-finite)."""
    device = mixture.means.device
    return float(mixture.log_prob(torch.as_tensor(x).to(device)).mean()) / mixture.dim


def coverage_tv(mixture, x: torch.Tensor) -> float:
    """½ ‖E_x[p(c | x)] − p(c)‖₁."""
    shares = mixture.class_posterior(torch.as_tensor(x).to(mixture.means.device)).mean(0)
    return float((shares - mixture.class_prior).abs().sum() / 2)


def clamped_fraction(x: torch.Tensor) -> float:
    """Share of values outside [-1, 1]."""
    x = torch.as_tensor(x)
    return float((x.abs() > 1).double().mean()) if x.numel() else 0.0
