"""Noise-level (σ) schedules for the sampling ODE.

Every schedule is ``f(steps, sigma_min=0.002, sigma_max=80.0, ...) -> Tensor``: float64, length ``steps + 1``,
strictly descending positive σ's from ``sigma_max`` to ``sigma_min``, then a final 0.
"""

from __future__ import annotations

import math

import torch


def _check_range(steps: int, sigma_min: float, sigma_max: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not sigma_min > 0:
        raise ValueError(f"sigma_min must be positive, got {sigma_min}")
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must exceed sigma_min, got sigma_max={sigma_max}, sigma_min={sigma_min}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _ramp(steps: int) -> torch.Tensor:
    """i / (N − 1) for i = 0..N−1 (just [0] when N = 1)."""
    return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)


def _rho_map(t: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras' σ(t) = (σ_min^{1/ρ} + t·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ: t = 1 ↦ σ_max, t = 0 ↦ σ_min."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + t * (hi - lo)) ** rho


def _finish(sigmas: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Pin the end points exactly, check strict descent and append the final σ = 0."""
    sigmas = sigmas.clone()
    sigmas[0] = sigma_max
    if len(sigmas) > 1:
        sigmas[-1] = sigma_min
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"schedule is not strictly descending (degenerate parameters?): {sigmas.tolist()}")
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's schedule (Karras et al. 2022, Eq. 5).

    σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i = 0..N−1.
    """
    _check_range(steps, sigma_min, sigma_max)
    _check_positive("rho", rho)
    return _finish(_rho_map(1.0 - _ramp(steps), sigma_min, sigma_max, rho), sigma_min, sigma_max)


def log_uniform(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """The "exponential" schedule: σ_i = exp(linspace(ln σ_max, ln σ_min, N))_i, uniform in log σ."""
    _check_range(steps, sigma_min, sigma_max)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64)
    return _finish(log_sigmas.exp(), sigma_min, sigma_max)


def improved(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, p: float = 2.0
) -> torch.Tensor:
    """The improved Karras schedule of Direct Distillation (Li & Zhang, §3.1).

    The paper's formula is lost in its text; this is our reading of its description. A time t ∈ [0, 1] is
    divided uniformly "in exponential time space",

        t_i = 1 − (exp(p·i/(N−1)) − 1) / (exp(p) − 1),

    and mapped through Karras' ρ-map σ(t) = (σ_min^{1/ρ} + t·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ.

    Why this reading: t_0 = 1, so the first σ is σ_max as in Karras ("allows the noise level to match that of
    Karras in the final forward step"); the map u ↦ (e^{pu} − 1)/(e^p − 1) is convex, so t stays high longer
    and the last low-noise steps get coarser as p grows ("as p increases, [steps] closer to the final step T
    [become] larger"), curing Karras' too-fine division of the final steps; and p → 0 gives t_i = 1 − i/(N−1),
    which is Karras exactly.
    """
    _check_range(steps, sigma_min, sigma_max)
    _check_positive("rho", rho)
    _check_positive("p", p)
    t = 1.0 - torch.expm1(p * _ramp(steps)) / math.expm1(p)
    return _finish(_rho_map(t, sigma_min, sigma_max, rho), sigma_min, sigma_max)


SCHEDULES = {"karras": karras, "log_uniform": log_uniform, "improved": improved}


# ---- time laws: how training draws σ -------------------------------------------------------------------
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def sigma_p_sim(u: torch.Tensor, t_max: float = 0.8) -> torch.Tensor:
    """SiD/SIM generator time law from u ~ U[0, 1): t = u·t_max on the ρ = 7 Karras map, σ ∈ [0.002, 24.4]
    (docs/algorithms.md §2)."""
    t = u * t_max
    a, b = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return (a + (1 - t) * (b - a)) ** RHO


def sigma_p_edm(normal: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """EDM's log-normal training law from standard normals: ln σ ~ N(P_mean, P_std²)."""
    return (normal * p_std + p_mean).exp()
