"""The exact EDM denoiser of an isotropic Gaussian mixture, usable as a teacher (``teacher=analytic``).

For data x₀ ~ Σ_k w_k N(μ_k, s_k² I), the noised law at σ is Σ_k w_k N(μ_k, (s_k² + σ²) I) and

    D(x; σ) = E[x₀ | x] = Σ_k r_k(x) · (μ_k + s_k² / (s_k² + σ²) · (x − μ_k)),
    r_k(x)  ∝ w_k · N(x; μ_k, (s_k² + σ²) I).
"""

from __future__ import annotations

import torch

from distillbench.teachers.denoiser import Denoiser, as_sigma_batch


class GaussianMixture:
    """An isotropic Gaussian mixture in ``dim`` dimensions."""

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k, self.dim = self.means.shape
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.as_tensor(weights, dtype=torch.float64).expand(k).clone()
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, got {w.tolist()}")
        if (self.stds <= 0).any():
            raise ValueError(f"mixture stds must be positive, got {self.stds.tolist()}")
        self.weights = w / w.sum()

    def sample(self, n: int, rng: torch.Generator | None = None):
        """``n`` samples and their component index."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=rng)
        noise = torch.randn(n, self.dim, generator=rng, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp, None] * noise
        return x.float(), comp

    def responsibilities(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """r_k(x) under the mixture noised to σ (σ = 0: the clean mixture)."""
        x = x.to(torch.float64)
        var = self.stds.to(x.device) ** 2 + as_sigma_batch(sigma, x).double() ** 2  # (N, K)
        d2 = torch.cdist(x, self.means.to(x.device)) ** 2
        logp = self.weights.to(x.device).log() - 0.5 * d2 / var - 0.5 * self.dim * var.log()
        return torch.softmax(logp, dim=1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely component of each clean sample."""
        return self.responsibilities(x, 0.0).argmax(dim=1)

    def mode_shares(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction of samples assigned to each component."""
        return torch.bincount(self.assign(x), minlength=len(self.weights)).double() / len(x)


class AnalyticMixtureDenoiser(Denoiser):
    """The Bayes-optimal D(x; σ) of a :class:`GaussianMixture`; it has no parameters."""

    def __init__(
        self,
        mixture: GaussianMixture,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ):
        super().__init__()
        self.mixture = mixture
        self.sample_shape = (mixture.dim,)
        self.sigma_data, self.sigma_min, self.sigma_max = (
            float(sigma_data),
            float(sigma_min),
            float(sigma_max),
        )

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        m = self.mixture
        x64 = x.to(torch.float64)
        s2 = as_sigma_batch(sigma, x64).double() ** 2  # (N, 1)
        r = m.responsibilities(x64, sigma)  # (N, K)
        shrink = m.stds.to(x.device) ** 2 / (m.stds.to(x.device) ** 2 + s2)  # (N, K)
        means = m.means.to(x.device)
        cond = means[None] + shrink[..., None] * (x64[:, None, :] - means[None])  # (N, K, dim)
        return (r[..., None] * cond).sum(dim=1).to(x.dtype)


def analytic_teacher(datamodule=None, sigma_data: float = 0.5) -> AnalyticMixtureDenoiser:
    """``teacher=analytic``: the exact denoiser of the toy2d data module's mixture."""
    mixture = getattr(datamodule, "mixture", None)
    if mixture is None:
        from distillbench.errors import ConfigError

        name = getattr(datamodule, "name", None)
        raise ConfigError(f"teacher=analytic needs data=toy2d (a Gaussian mixture), got data={name}")
    return AnalyticMixtureDenoiser(mixture, sigma_data=sigma_data)
