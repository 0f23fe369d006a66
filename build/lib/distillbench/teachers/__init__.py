"""Teachers: the EDM ``Denoiser`` face, the analytic mixture, checkpoints and the diffusers adapter."""

from distillbench.teachers.denoiser import Denoiser, EDMDenoiser, edm_coefficients, freeze

__all__ = ["Denoiser", "EDMDenoiser", "edm_coefficients", "freeze"]
