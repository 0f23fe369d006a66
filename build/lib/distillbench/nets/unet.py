"""diffusers ``UNet2DModel`` as an EDM backbone F(c_in·x, c_noise, labels)."""

from __future__ import annotations

import torch
from torch import nn


class UNetBackbone(nn.Module):
    """A diffusers UNet2DModel taking EDM's c_noise = ln(σ)/4 as its timestep.

    c_noise is multiplied by ``time_scale`` before diffusers' sinusoidal embedding, whose frequencies span
    1 … 1e-4 and would otherwise see an almost constant input. Class conditioning reserves one extra
    embedding (index ``num_classes``) as the "no label" token, so a conditional backbone also has the
    unconditional path that classifier-free guidance needs.
    """

    def __init__(
        self,
        sample_size: int,
        in_channels: int = 1,
        block_out_channels: tuple[int, ...] | list[int] = (64, 128),
        layers_per_block: int = 2,
        attention_levels: tuple[int, ...] | list[int] = (),
        num_classes: int = 0,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        time_scale: float = 1000.0,
    ):
        from diffusers import UNet2DModel  # here, so that importing the backbones needs no diffusers

        super().__init__()
        levels = range(len(block_out_channels))
        down = [("AttnDownBlock2D" if i in attention_levels else "DownBlock2D") for i in levels]
        up = [("AttnUpBlock2D" if i in attention_levels else "UpBlock2D") for i in reversed(levels)]
        self.num_classes = int(num_classes)
        self.time_scale = float(time_scale)
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            num_class_embeds=self.num_classes + 1 if self.num_classes else None,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None):
        class_labels = None
        if self.num_classes:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            class_labels = labels.long()
        t = (c_noise * self.time_scale).expand(x.shape[0])
        return self.unet(x, t, class_labels=class_labels).sample
