"""A deterministic solver's run cut at given steps: the states x_k after k steps (Direct Distillation's
training inputs, Li & Zhang §4.2) and the first k steps alone (its k + 1 sampling)."""

from __future__ import annotations

import torch

from distillbench.samplers.solvers import CountingDenoiser, DPMSolverPP2MSampler, SampleResult
from distillbench.teachers.denoiser import Denoiser


class StateRecorder(CountingDenoiser):
    """A counting denoiser that keeps the solver state x_k it is called on at call k, for k in ``indices``.

    DPM-Solver++(2M) calls the denoiser once per step, at the start of step k + 1 on x_k (σ_k), so call k
    sees the state after k steps.
    """

    def __init__(self, denoiser, labels, indices):
        super().__init__(denoiser, labels)
        self.indices = set(indices)
        self.states: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.calls in self.indices:
            self.states[self.calls] = x.clone()
        return super().__call__(x, sigma)


@torch.no_grad()
def trajectory(
    teacher: Denoiser, sampler: DPMSolverPP2MSampler, z: torch.Tensor, labels, indices
) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (B, J, …) at the step indices, final x_N) in z's dtype, of ``sampler.sample``'s very run."""
    sigmas = sampler.sigmas(teacher).tolist()
    recorder = StateRecorder(teacher, labels, indices)
    final = sampler.integrate(recorder, z.to(torch.float64) * sigmas[0], sigmas)
    states = torch.stack([recorder.states[k] for k in indices], dim=1)
    return states.to(z.dtype), final.to(z.dtype)


@torch.no_grad()
def first_steps(
    teacher: Denoiser, sampler: DPMSolverPP2MSampler, z: torch.Tensor, labels, k: int
) -> SampleResult:
    """x_k: the first k steps of the sampler's N-step run from z (NFE k), in z's dtype."""
    sigmas = sampler.sigmas(teacher).tolist()[: k + 1]
    counted = CountingDenoiser(teacher, labels)
    x = sampler.integrate(counted, z.to(torch.float64) * sigmas[0], sigmas)
    return SampleResult(x.to(z.dtype), counted.calls)
