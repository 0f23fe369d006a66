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
    """ema ← β·ema + (1 − β)·online over all parameters in a few multi-tensor kernels (buffers are copied)."""
    ema_params, params = list(ema.parameters()), [p.detach() for p in online.parameters()]
    if len(ema_params) != len(params):
        raise ValueError(f"the EMA has {len(ema_params)} parameters, the online network {len(params)}")
    if params:
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), online.buffers(), strict=True):
        b_ema.copy_(b)
