"""The one teacher face of distillbench: an EDM denoiser D(x, σ, labels).

EDM preconditioning (Karras et al. 2022, Table 1 / NVlabs/edm ``EDMPrecond``):

    c_skip = σ_d² / (σ² + σ_d²)        c_out = σ·σ_d / sqrt(σ² + σ_d²)
    c_in   = 1 / sqrt(σ² + σ_d²)       c_noise = ln(σ) / 4
    D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise, labels)

The wrapper always computes in fp32, whatever precision the inner backbone F runs in.
"""

from __future__ import annotations

import torch
from torch import nn


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """Return (c_skip, c_out, c_in, c_noise) for noise level(s) σ (EDM Table 1)."""
    sigma = sigma.to(torch.float32)
    denom = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / denom
    c_out = sigma * sigma_data / denom.sqrt()
    c_in = 1.0 / denom.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def as_sigma_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (N,) σ to shape (N, 1, …, 1) matching ``x``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """Base class of every denoiser: ``forward(x, σ, labels) -> x̂0``, plus the score."""

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    num_classes: int = 0
    sample_shape: tuple[int, ...] = ()
    #: its data lies in [-1, 1] (images), so sampled images are clipped there; False for an unbounded law
    bounded: bool = True

    def score(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """s(x; σ) = (D(x; σ) − x) / σ²."""
        s = as_sigma_batch(sigma, x)
        return (self(x, sigma, labels) - x) / s**2


class EDMDenoiser(Denoiser):
    """EDM-preconditioned denoiser around a backbone ``F(x_in, c_noise, labels)``."""

    def __init__(
        self,
        net: nn.Module,
        sample_shape: tuple[int, ...] | list[int],
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        num_classes: int = 0,
    ):
        super().__init__()
        self.net = net
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32)
        s = as_sigma_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(s, self.sigma_data)
        labels = labels if self.num_classes else None
        f = self.net(c_in * x, c_noise.flatten(), labels)
        return c_skip * x + c_out * f.to(torch.float32)


def freeze(module: nn.Module) -> nn.Module:
    """Put a module in eval mode with no parameter gradients (a frozen teacher)."""
    module.eval()
    module.requires_grad_(False)
    return module
