"""NAFNet (Chen et al. 2022, "Simple Baselines for Image Restoration") with a time embedding: the student of
Direct Distillation (Li & Zhang, §3.4; docs/algorithms.md §7).

A NAFBlock on c channels has no nonlinear activation; SimpleGate (split the channels in half, multiply) is
its only nonlinearity:

    spatial:  y = x + β·drop(conv(SCA(SimpleGate(dwconv3×3(conv(FiLM_e(LN(x))))))))  (conv: 1×1, c → 2c → c)
    ffn:      out = y + γ·drop(conv(SimpleGate(conv(LN(y)))))
    SCA(u) = u · conv1×1(avgpool(u))                                       (simplified channel attention)

β and γ are per-channel and start at zero, so every block starts as the identity. The time embedding
e(t) = Linear(SimpleGate(Linear(sinusoid(t)))) (the paper: "a linear layer, the activation, another linear
layer"; the activation a simple gate like everything else) reaches every block through that block's own
Linear(e → 2c), a FiLM scale and shift of the normalised input: LN(x)·(1 + scale) + shift. With
``num_classes`` > 0 a class embedding (zero at the start; the last row for unlabelled samples, label −1) is
added to e(t), as diffusers' UNets add ``class_embedding`` to their time embedding: the student sees the
labels that steered a class-conditional teacher's trajectory.

The U-Net: 3×3 intro conv; per encoder level n blocks, then a 2×2 stride-2 conv doubling the channels; the
middle blocks; per decoder level a bias-free 1×1 conv c → 2c with PixelShuffle(2) (→ c/2 channels), plus the
encoder skip, then n blocks; a 3×3 ending conv plus the input (global residual). The ending conv starts at
zero, so the whole network starts as x ↦ x. H and W must be multiples of 2^levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class LayerNorm2d(nn.Module):
    """Layer norm over the channels at every pixel (eps 1e-6), with a per-channel affine map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        normed = (x - mean) / (var + self.eps).sqrt()
        return normed * self.weight[:, None, None] + self.bias[:, None, None]


class SimpleGate(nn.Module):
    """Split the channels (dim 1) in half and multiply the halves: 2c → c."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=1)
        return first * second


class SimplifiedChannelAttention(nn.Module):
    """u · conv1×1(global average pool of u)."""

    def __init__(self, channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv(self.pool(x))


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The transformer embedding [cos(t·f_i), sin(t·f_i)], f_i = max_period^(−i/(dim/2)), i < dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.reshape(-1, 1).float() * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimeEmbedding(nn.Module):
    """e(t) = Linear(SimpleGate(Linear(sinusoid(time_scale·t)))): R → R^dim."""

    def __init__(self, dim: int, time_scale: float = 1000.0):
        super().__init__()
        self.dim, self.time_scale = dim, float(time_scale)
        self.hidden = nn.Linear(dim, 2 * dim)
        self.gate = SimpleGate()
        self.out = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.gate(self.hidden(sinusoidal_embedding(t * self.time_scale, self.dim))))


class NAFBlock(nn.Module):
    """One NAFBlock on ``channels`` channels with a FiLM input from a ``time_dim`` embedding; ``dropout`` is
    NAFNet's ``drop_out_rate`` at the end of both branches."""

    def __init__(self, channels: int, time_dim: int, dropout: float = 0.0):
        super().__init__()
        c = channels
        self.time_film = nn.Linear(time_dim, 2 * c)
        self.norm1 = LayerNorm2d(c)
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.depthwise = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.gate = SimpleGate()
        self.attention = SimplifiedChannelAttention(c)
        self.project = nn.Conv2d(c, c, 1)
        self.norm2 = LayerNorm2d(c)
        self.ffn_expand = nn.Conv2d(c, 2 * c, 1)
        self.ffn_project = nn.Conv2d(c, c, 1)
        self.drop = nn.Dropout(dropout)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time_film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm1(x) * (1 + scale) + shift
        h = self.project(self.attention(self.gate(self.depthwise(self.expand(h)))))
        y = x + self.beta * self.drop(h)
        return y + self.gamma * self.drop(self.ffn_project(self.gate(self.ffn_expand(self.norm2(y)))))


class BlockStack(nn.ModuleList):
    """n NAFBlocks applied in turn, each given the same time embedding."""

    def __init__(self, n: int, channels: int, time_dim: int, dropout: float = 0.0):
        super().__init__(NAFBlock(channels, time_dim, dropout) for _ in range(n))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x, emb)
        return x


class NAFNet(nn.Module):
    """``forward(x, t, labels)``: the time-embedded NAFNet U-Net, x of shape (B, in_channels, H, W), t and
    labels (with ``num_classes``; −1 for unlabelled) of shape (B,).

    ``enc_blocks`` and ``dec_blocks`` (one count per level, the decoder's from the deepest level up) must be
    equally long; the channels are ``width``·2^level.
    """

    def __init__(
        self,
        in_channels: int = 4,
        width: int = 32,
        enc_blocks: Sequence[int] = (1, 1, 1),
        middle_blocks: int = 1,
        dec_blocks: Sequence[int] = (1, 1, 1),
        time_dim: int = 128,
        time_scale: float = 1000.0,
        num_classes: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(
                f"enc_blocks {list(enc_blocks)} and dec_blocks {list(dec_blocks)} differ in length"
            )
        self.in_channels, self.levels = int(in_channels), len(enc_blocks)
        self.time = TimeEmbedding(time_dim, time_scale)
        self.num_classes = int(num_classes)
        if self.num_classes:
            self.label = nn.Embedding(self.num_classes + 1, time_dim)  # row num_classes: unlabelled
            nn.init.zeros_(self.label.weight)
        self.intro = nn.Conv2d(in_channels, width, 3, padding=1)
        channels = [width * 2**level for level in range(self.levels + 1)]
        self.encoders = nn.ModuleList(
            BlockStack(n, c, time_dim, dropout) for n, c in zip(enc_blocks, channels[:-1], strict=True)
        )
        self.downs = nn.ModuleList(nn.Conv2d(c, 2 * c, 2, stride=2) for c in channels[:-1])
        self.middle = BlockStack(middle_blocks, channels[-1], time_dim, dropout)
        up_channels = channels[::-1][:-1]  # the input channels of each up-sampling, deepest first
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)) for c in up_channels
        )
        self.decoders = nn.ModuleList(
            BlockStack(n, c // 2, time_dim, dropout) for n, c in zip(dec_blocks, up_channels, strict=True)
        )
        self.ending = nn.Conv2d(width, in_channels, 3, padding=1)
        nn.init.zeros_(self.ending.weight)
        nn.init.zeros_(self.ending.bias)

    @property
    def multiple(self) -> int:
        """H and W must be multiples of this (2^levels)."""
        return 2**self.levels

    def embedding(self, t: torch.Tensor, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """e(t), plus the labels' class embedding when the net has classes (label −1: unlabelled)."""
        emb = self.time(t.expand(batch))
        if not self.num_classes:
            return emb
        if labels is None:
            raise ValueError(f"this NAFNet has num_classes={self.num_classes}: pass labels (−1: unlabelled)")
        return emb + self.label(torch.where(labels < 0, self.num_classes, labels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embedding(t, labels, x.shape[0])
        h = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            h = encoder(h, emb)
            skips.append(h)
            h = down(h)
        h = self.middle(h, emb)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            h = decoder(up(h) + skip, emb)
        return x + self.ending(h)
