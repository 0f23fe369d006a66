"""Deterministic ODE samplers in the EDM σ-parameterisation (Karras et al. 2022).

With x_σ = x₀ + σ·n the probability-flow ODE is dx/dσ = (x − D(x; σ)) / σ. Every sampler starts at
x = σ_0·z on a σ grid from a schedule, integrates in float64 like EDM, and counts its denoiser calls (NFE).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distillbench.samplers.schedules import karras


@dataclass
class SampleResult:
    """Samples and the number of denoiser evaluations (NFE) that produced them."""

    x: torch.Tensor
    nfe: int


class CountingDenoiser:
    """D(x; σ) at a fixed label batch, evaluated in float64 and counting its calls."""

    def __init__(self, denoiser, labels=None):
        self.denoiser = denoiser
        self.labels = labels
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        sigma_batch = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)
        return self.denoiser(x, sigma_batch, self.labels).to(torch.float64)


@dataclass
class Sampler:
    """A deterministic sampler: ``steps`` steps on the grid ``schedule(steps, sigma_min, sigma_max)``.

    sigma_min/sigma_max come from the denoiser unless the schedule (a ``functools.partial``, as Hydra's
    ``_partial_: true`` makes) binds them itself.
    """

    steps: int = 18
    schedule: Callable[..., torch.Tensor] = karras

    def sigmas(self, denoiser) -> torch.Tensor:
        """The σ grid for ``denoiser``: float64, steps + 1 values ending in 0."""
        bound = self.schedule.keywords if isinstance(self.schedule, functools.partial) else {}
        limits = {"sigma_min": float(denoiser.sigma_min), "sigma_max": float(denoiser.sigma_max)}
        return self.schedule(self.steps, **{k: v for k, v in limits.items() if k not in bound})

    def sample(self, denoiser, z: torch.Tensor, labels: torch.Tensor | None = None) -> SampleResult:
        """Integrate the ODE from x = σ_0·z down to σ = 0; the result has z's dtype."""
        sigmas = self.sigmas(denoiser).tolist()
        counted = CountingDenoiser(denoiser, labels)
        x = self.integrate(counted, z.to(torch.float64) * sigmas[0], sigmas)
        return SampleResult(x.to(z.dtype), counted.calls)

    def integrate(self, denoise: CountingDenoiser, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
        """Carry x (float64, at σ = sigmas[0]) down the grid; each sampler's update rule."""
        raise NotImplementedError


@dataclass
class HeunSampler(Sampler):
    """EDM Algorithm 1 with S_churn = 0: Euler step, then the trapezoidal (2nd-order) correction except on
    the last step to σ = 0. NFE = 2N − 1."""

    steps: int = 18

    def integrate(self, denoise, x, sigmas):
        for sigma, sigma_next in itertools.pairwise(sigmas):
            slope = (x - denoise(x, sigma)) / sigma
            x_next = x + (sigma_next - sigma) * slope
            if sigma_next > 0:
                slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
                x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
            x = x_next
        return x


@dataclass
class EulerSampler(Sampler):
    """Euler steps of the ODE, x' = D + (σ'/σ)(x − D): DDIM in the EDM parameterisation. NFE = N."""

    steps: int = 35

    def integrate(self, denoise, x, sigmas):
        for sigma, sigma_next in itertools.pairwise(sigmas):
            denoised = denoise(x, sigma)
            x = denoised + (sigma_next / sigma) * (x - denoised)
        return x


@dataclass
class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): data-prediction multistep in λ = −ln σ. NFE = N.

    With h_i = λ_i − λ_{i−1} and r_i = h_{i−1}/h_i, x_i = (σ_i/σ_{i−1})·x_{i−1} − (e^{−h_i} − 1)·D_i where
    D_i = (1 + 1/(2r_i))·x̂_{i−1} − (1/(2r_i))·x̂_{i−2}; the first step is first order (D_1 = x̂_0) and the final
    step to σ = 0 returns the denoised estimate.
    """

    steps: int = 20

    def integrate(self, denoise, x, sigmas):
        previous_denoised, previous_h = None, None
        for sigma, sigma_next in itertools.pairwise(sigmas):
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                return denoised
            h = math.log(sigma / sigma_next)
            estimate = denoised
            if previous_denoised is not None:
                half_inv_r = h / (2 * previous_h)  # 1 / (2 r_i)
                estimate = (1 + half_inv_r) * denoised - half_inv_r * previous_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
            previous_denoised, previous_h = denoised, h
        return x


SAMPLERS = {"heun": HeunSampler, "euler": EulerSampler, "dpmpp2m": DPMSolverPP2MSampler}
