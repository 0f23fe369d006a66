"""The bottleneck of a denoiser's backbone: the features at the end of its encoder, which DMD2's GAN head and
SiDA's discriminator logit read from the fake score network (docs/algorithms.md §10, §13).

- ``SongUNet`` (EDM's DDPM++/NCSN++): the output of its last encoder entry, as the official DMD2 and SiDA
  networks return it (their decoder starts with the lowest-resolution ``in0``/``in1`` blocks);
- ``UNetBackbone`` (diffusers ``UNet2DModel``): the output of its mid block;
- ``MLPBackbone``: its last hidden activation (a vector per sample).

The features are read by a forward hook that lives for one call, so the networks (and copies of them) carry
no state, and a DDP wrapper around the network sees an ordinary forward.
"""

from __future__ import annotations

import torch
from torch import nn

from distillbench.errors import ConfigError
from distillbench.nets import MLPBackbone, SongUNet, UNetBackbone
from distillbench.teachers.denoiser import EDMDenoiser


def bottleneck_of(denoiser: nn.Module) -> nn.Module:
    """The module whose output is ``denoiser``'s bottleneck."""
    net = denoiser.net if isinstance(denoiser, EDMDenoiser) else None
    if isinstance(net, UNetBackbone):
        return net.unet.mid_block
    if isinstance(net, SongUNet):
        return net.enc[list(net.enc.keys())[-1]]
    if isinstance(net, MLPBackbone):
        return net.mlp[-2]
    raise ConfigError(
        f"the fake score network ({type(net or denoiser).__name__}) has no known bottleneck; the adversarial "
        "term reads one from an EDM denoiser around UNetBackbone, SongUNet or MLPBackbone"
    )


def with_bottleneck(call, module: nn.Module, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """``call(*args)`` and the output of ``module`` (the bottleneck inside it) during that call."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        out = call(*args)
    finally:
        handle.remove()
    return out, seen[-1]
