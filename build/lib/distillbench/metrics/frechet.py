"""The Fréchet distance between Gaussians fitted to features (FID, Heusel et al. 2017).

    d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½,   tr (Σ₁ Σ₂)^½ = Σᵢ √λᵢ(Σ₁^½ Σ₂ Σ₁^½)

The trace uses two symmetric eigendecompositions in float64 (a few seconds at 2048-d) instead of the
general eigen-solver of torchmetrics' ``compute()`` (about a minute at 2048-d on two cores).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Σ^½ of a symmetric PSD matrix; tiny negative eigenvalues from rounding are clamped to 0."""
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """tr (Σ₁ Σ₂)^½ for symmetric PSD Σ₁, Σ₂."""
    root = _psd_sqrt(sigma1)
    m = root @ sigma2 @ root
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) (numpy arrays or tensors)."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    d = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(d), 0.0)


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of N×d features, in float64."""
    f = torch.as_tensor(feats, dtype=torch.float64)
    return f.mean(0).numpy(), torch.cov(f.T, correction=1).reshape(f.shape[1], f.shape[1]).numpy()


class FID(FrechetInceptionDistance):
    """torchmetrics' FID with the fast symmetric Fréchet distance and restorable real statistics.

    With a custom ``feature`` module torchmetrics passes ``update``'s input to it unchanged, so the
    extractors of :mod:`distillbench.metrics.extractors` take [-1, 1] samples directly.
    """

    @staticmethod
    def _moments(total: torch.Tensor, outer: torch.Tensor, n: torch.Tensor):
        """(μ, Σ) from running sums Σf, Σffᵀ and the count n."""
        mu = total / n
        return mu, (outer - n * torch.outer(mu, mu)) / (n - 1)

    def set_real_stats(self, mu, sigma, n: int) -> None:
        """Restore the real side from (μ, Σ, n), e.g. cached statistics, instead of real images."""
        n = int(n)
        mu = torch.as_tensor(mu, dtype=torch.float64, device=self.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=self.device)
        self.real_features_sum = n * mu
        self.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu)
        self.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=self.device)

    def compute(self) -> torch.Tensor:
        if self.real_features_num_samples < 2 or self.fake_features_num_samples < 2:
            raise RuntimeError("FID needs at least two real and two fake samples")
        n_real, n_fake = self.real_features_num_samples, self.fake_features_num_samples
        real = self._moments(self.real_features_sum, self.real_features_cov_sum, n_real)
        fake = self._moments(self.fake_features_sum, self.fake_features_cov_sum, n_fake)
        return torch.tensor(frechet_distance(*real, *fake), dtype=torch.float64)
