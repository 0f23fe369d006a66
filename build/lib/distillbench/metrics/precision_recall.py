"""Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifold estimates in feature space.

Each set's manifold is the union of balls around its points, with radius the distance to the point's k-th
nearest neighbour in the same set. Precision is the share of fake points inside the real manifold (quality),
recall the share of real points inside the fake manifold (coverage).
"""

from __future__ import annotations

import torch


def knn_radii(feats: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in ``feats`` (itself excluded)."""
    if not 0 < k < len(feats):
        raise ValueError(f"k={k} needs 0 < k < number of points ({len(feats)})")
    return torch.cat([torch.cdist(c, feats).kthvalue(k + 1, dim=1).values for c in feats.split(chunk)])


def coverage(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Share of ``queries`` inside at least one ball B(points[j], radii[j])."""
    inside = [(torch.cdist(q, points) <= radii).any(dim=1) for q in queries.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """(precision, recall) of N×d fake features against real ones."""
    real = torch.as_tensor(real_feats, dtype=torch.float32)
    fake = torch.as_tensor(fake_feats, dtype=torch.float32)
    precision = coverage(fake, real, knn_radii(real, k, chunk), chunk)
    recall = coverage(real, fake, knn_radii(fake, k, chunk), chunk)
    return precision, recall
