"""EMA with EDM semantics: a half-life in kimg and a ramp-up ratio (NVlabs/edm ``training_loop.py``)."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch: int, nimg: float, halflife_kimg: float, rampup_ratio: float | None = 0.05) -> float:
    """β = 0.5 ** (batch / halflife_img), halflife_img = min(halflife, rampup_ratio · images seen)."""
    halflife_img = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        halflife_img = min(halflife_img, rampup_ratio * nimg)
    return 0.5 ** (batch / max(halflife_img, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, online: nn.Module, beta: float) -> None:
    """ema ← β·ema + (1 − β)·online, parameter by parameter (buffers are copied)."""
    for p_ema, p in zip(ema.parameters(), online.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), online.buffers(), strict=True):
        b_ema.copy_(b)
