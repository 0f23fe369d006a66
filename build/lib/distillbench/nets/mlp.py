"""An MLP backbone with a Fourier σ-embedding, for 2-D toy data."""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar (EDM's c_noise) with geometric frequencies."""

    def __init__(self, dim: int = 64, max_period: float = 100.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half) * 2 * math.pi
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        angles = c.reshape(-1, 1).float() * self.freqs
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class MLPBackbone(nn.Module):
    """F(x_in, c_noise, labels) for vectors: [x, emb(c_noise)] → SiLU MLP → output of x's size."""

    def __init__(
        self, dim: int = 2, hidden: int = 256, depth: int = 3, emb_dim: int = 64, num_classes: int = 0
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.embed = FourierEmbedding(emb_dim)
        self.label_embed = nn.Embedding(self.num_classes + 1, emb_dim) if self.num_classes else None
        layers: list[nn.Module] = [nn.Linear(dim + emb_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None):
        emb = self.embed(c_noise.expand(x.shape[0]))
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_embed(labels.long())
        return self.mlp(torch.cat([x, emb], dim=1))
