"""Time schedules, deterministic ODE samplers and batched generation on fixed evaluation noise."""

from distillbench.samplers.generate import fixed_labels, fixed_noise, generate
from distillbench.samplers.schedules import SCHEDULES, improved, karras, log_uniform
from distillbench.samplers.solvers import (
    SAMPLERS,
    DPMSolverPP2MSampler,
    EulerSampler,
    HeunSampler,
    Sampler,
    SampleResult,
)

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "DPMSolverPP2MSampler",
    "EulerSampler",
    "HeunSampler",
    "SampleResult",
    "Sampler",
    "fixed_labels",
    "fixed_noise",
    "generate",
    "improved",
    "karras",
    "log_uniform",
]
