"""EDM's DDPM++ / NCSN++ U-Net ("SongUNet") as a backbone ``F(x_in, c_noise, labels)``.

An independent reimplementation of the network of Karras et al. 2022 (EDM, "Elucidating the Design Space of
Diffusion-Based Generative Models"), itself a re-expression of the DDPM++ and NCSN++ architectures of Song
et al. 2021 ("Score-Based Generative Modeling through Stochastic Differential Equations"). Module and
parameter names (``state_dict`` keys), shapes, initialisation and the order of operations follow NVlabs/edm
``training/networks.py``, so the weights of its released pickles load with ``load_state_dict(strict=True)``
(see :mod:`distillbench.convert_edm`).

Interface differences from NVlabs' module, none of which changes its weights:

* ``forward(x, c_noise, labels=None, augment_labels=None)`` takes this project's integer class labels and
  one-hots them inside (a float ``(N, num_classes)`` tensor is used as the class vector as is). ``None``,
  and any label outside ``[0, num_classes)`` (the "no label" token ``num_classes``, or -1), give the zero
  class vector, which is what EDM feeds an unconditional call.
* ``num_classes`` is EDM's ``label_dim``. ``augment_labels`` defaults to none (the sampling-time setting);
  ``map_augment`` still exists when ``augment_dim > 0`` so that trained weights load.
* Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` (same maths).
* Under autocast (``bf16-mixed``) the layers leave the parameter casts to autocast, which casts each
  trainable weight once per step and caches it, and group normalisation and attention run in the activations'
  bf16 (both accumulate in fp32 inside their kernels) instead of autocast's fp32 round trip; outside autocast
  every layer computes in its input's dtype, as EDM's. docs/performance.md has the measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (it then picks the precision of convolutions and matmuls)."""
    return torch.is_autocast_enabled(x.device.type)


def like(param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``param`` for an op on ``x``: as it is under autocast (which casts it, once per step for a trainable
    weight), else in ``x``'s dtype. An explicit cast under autocast would run on every call and bypass that
    cache."""
    if param is None or autocasting(x):
        return param
    return param.to(x.dtype)


def draw_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A tensor of ``shape`` drawn by one of EDM's four schemes (uniform ones span ±sqrt(3)·std)."""
    if mode not in INIT_MODES:
        raise ValueError(f"init mode must be one of {INIT_MODES}, got {mode!r}")
    variance = 2 / (fan_in + fan_out) if mode.startswith("xavier") else 1 / fan_in
    if mode.endswith("uniform"):
        return torch.empty(*shape).uniform_(-1, 1) * math.sqrt(3 * variance)
    return torch.randn(*shape) * math.sqrt(variance)


class Linear(nn.Module):
    """y = x Wᵀ + b, initialised as in EDM (``weight`` × ``init_weight``, ``bias`` × ``init_bias``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(draw_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(draw_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, like(self.weight, x), like(self.bias, x))


class Conv2d(nn.Module):
    """A square ``kernel`` convolution (``kernel=0``: none) with optional 2× FIR up- or downsampling.

    The separable filter ``resample_filter`` (normalised to unit gain) is kept as a persistent buffer only
    when the layer resamples, as in EDM. Unfused, the resampling runs before the convolution; fused (EDM's
    ``fused_resample``), a downsampling layer convolves first at full resolution with extra padding and an
    upsampling one resamples with reduced padding, which changes the border handling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(
            mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel
        )
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(draw_init(shape, **fans) * init_weight) if kernel else None
        has_bias = kernel and bias
        self.bias = nn.Parameter(draw_init([out_channels], **fans) * init_bias) if has_bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        fir = torch.outer(taps, taps)[None, None] / taps.sum() ** 2
        self.register_buffer("resample_filter", fir if up or down else None)

    def _resample(self, x: torch.Tensor, fir: torch.Tensor, padding: int) -> torch.Tensor:
        channels = x.shape[1]
        if self.up:
            weight = (fir * 4).expand(channels, 1, *fir.shape[-2:])
            return F.conv_transpose2d(x, weight, groups=channels, stride=2, padding=padding)
        weight = fir.expand(channels, 1, *fir.shape[-2:])
        return F.conv2d(x, weight, groups=channels, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = like(self.weight, x), like(self.bias, x)
        fir = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = weight.shape[-1] // 2 if weight is not None else 0
        f_pad = (fir.shape[-1] - 1) // 2 if fir is not None else 0
        # The bias goes into the convolution when that is the last op (one kernel, no extra pass over x); only
        # a fused downsampling resamples after it.
        if fir is not None and weight is not None and self.fused_resample:
            if self.up:
                x = self._resample(x, fir, max(f_pad - w_pad, 0))
                return F.conv2d(x, weight, bias, padding=max(w_pad - f_pad, 0))
            x = self._resample(F.conv2d(x, weight, padding=w_pad + f_pad), fir, 0)
            return x if bias is None else x + bias.to(x.dtype).reshape(1, -1, 1, 1)
        if fir is not None:
            x = self._resample(x, fir, f_pad)
        if weight is not None:
            x = F.conv2d(x, weight, bias, padding=w_pad)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(32, C // 4) groups and an affine ``weight``/``bias``."""

    def __init__(
        self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast would run group_norm in fp32 (a cast of x up, an fp32 output, a cast down at the next
        # convolution); its kernel accumulates the statistics in fp32 for bf16 input anyway.
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """DDPM++ residual block: GN–SiLU–conv, + Linear(emb), GN–SiLU–dropout–conv, skip, ×sqrt(½); then
    optionally single-resolution self-attention (its own residual, ×sqrt(½) again).

    Only the configuration SongUNet uses: additive (not scale/shift) embedding, a 1×1 (resampling) skip
    projection whenever the shape changes, ``num_heads`` heads when ``attention``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_filter: Sequence[float] = (1, 1),
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0.0)
        init_attn = init_attn if init_attn is not None else init
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb).to(h.dtype)[:, :, None, None]))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self.attend(self.qkv(self.norm2(x)), x.shape)) + x) * self.skip_scale
        return x

    def attend(self, qkv: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        # EDM's channel layout of the qkv projection: (head, channel, {q, k, v}), the last varying fastest.
        # q, k and v are laid out contiguously as (n, heads, hw, c'): the four-dimensional, unit-stride form
        # that the fused attention kernels take.
        n, c, h, w = shape
        heads = self.num_heads
        qkv = qkv.reshape(n, heads, c // heads, 3, h * w).permute(3, 0, 1, 4, 2).contiguous()
        out = F.scaled_dot_product_attention(*qkv.unbind(0))  # (n, heads, hw, c')
        return out.transpose(2, 3).reshape(shape).to(qkv.dtype)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoids of a scalar: ``[sin(t·f), cos(t·f)]`` with f from 1 down to
    ``1 / max_positions`` geometrically (both ends included when ``endpoint``). No parameters."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        steps = steps / (half - (1 if self.endpoint else 0))
        angles = torch.outer(t, ((1 / self.max_positions) ** steps).to(t.dtype))
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[sin(2π t f), cos(2π t f)]``, f ~ N(0, scale²) in the buffer ``freqs``."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(t, (2 * math.pi * self.freqs).to(t.dtype))
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ (defaults) / NCSN++ U-Net of EDM, an ``F(x_in, c_noise, labels)`` backbone.

    ``img_resolution`` is the input side; level ``i`` of ``channel_mult`` runs at ``img_resolution >> i`` with
    ``model_channels · channel_mult[i]`` channels and ``num_blocks`` residual blocks (attention at the sides
    in ``attn_resolutions``). The noise embedding is ``embedding_type`` ('positional' for DDPM++, 'fourier'
    for NCSN++) of width ``model_channels · channel_mult_noise``, plus the class and augmentation embeddings,
    then two SiLU layers of width ``model_channels · channel_mult_emb``. ``encoder_type`` 'skip'/'residual'
    and ``decoder_type`` 'skip' add NCSN++'s auxiliary image pyramids. ``num_classes`` is EDM's ``label_dim``;
    ``label_dropout`` zeroes the class vector of that fraction of a training batch.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int = 3,
        out_channels: int | None = None,
        num_classes: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ):
        for name, value, allowed in (
            ("embedding_type", embedding_type, ("positional", "fourier")),
            ("encoder_type", encoder_type, ("standard", "skip", "residual")),
            ("decoder_type", decoder_type, ("standard", "skip")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.num_classes = int(num_classes)
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        resample_filter = list(resample_filter)
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Noise, class and augmentation embeddings -> one vector of width emb_channels.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(self.num_classes, noise_channels, **init) if self.num_classes else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder: every entry but the auxiliary ones leaves a skip connection for the decoder.
        self.enc = nn.ModuleDict()
        channels, aux_channels = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            side = img_resolution >> level
            tag = f"{side}x{side}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv2d(channels, model_channels, kernel=3, **init)
                channels = model_channels
            else:
                self.enc[f"{tag}_down"] = UNetBlock(channels, channels, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{tag}_aux_down"] = Conv2d(
                        aux_channels, aux_channels, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{tag}_aux_skip"] = Conv2d(aux_channels, channels, kernel=1, **init)
                elif encoder_type == "residual":
                    self.enc[f"{tag}_aux_residual"] = Conv2d(
                        aux_channels,
                        channels,
                        kernel=3,
                        down=True,
                        resample_filter=resample_filter,
                        fused_resample=True,
                        **init,
                    )
                    aux_channels = channels
            for idx in range(num_blocks):
                width = model_channels * mult
                self.enc[f"{tag}_block{idx}"] = UNetBlock(
                    channels, width, attention=side in attn_resolutions, **block
                )
                channels = width
        skips = [module.out_channels for name, module in self.enc.items() if "aux" not in name]

        # Decoder: the "_block" entries take the latest skip, concatenated on the channel axis.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            side = img_resolution >> level
            tag = f"{side}x{side}"
            if level == len(channel_mult) - 1:
                self.dec[f"{tag}_in0"] = UNetBlock(channels, channels, attention=True, **block)
                self.dec[f"{tag}_in1"] = UNetBlock(channels, channels, **block)
            else:
                self.dec[f"{tag}_up"] = UNetBlock(channels, channels, up=True, **block)
            for idx in range(num_blocks + 1):
                width = model_channels * mult
                attention = idx == num_blocks and side in attn_resolutions
                self.dec[f"{tag}_block{idx}"] = UNetBlock(
                    channels + skips.pop(), width, attention=attention, **block
                )
                channels = width
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{tag}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{tag}_aux_norm"] = GroupNorm(channels, eps=1e-6)
                self.dec[f"{tag}_aux_conv"] = Conv2d(channels, out_channels, kernel=3, **init_zero)

    def class_vector(self, labels: torch.Tensor | None, n: int, device, dtype) -> torch.Tensor:
        """(n, num_classes) one-hot rows of ``labels``; zero rows for None and out-of-range labels."""
        if labels is None:
            return torch.zeros(n, self.num_classes, device=device, dtype=dtype)
        if labels.is_floating_point() and labels.ndim == 2:
            return labels.to(dtype).expand(n, self.num_classes)
        labels = labels.reshape(-1).long().expand(n)
        known = (labels >= 0) & (labels < self.num_classes)
        onehot = F.one_hot(torch.where(known, labels, 0), self.num_classes).to(dtype)
        return onehot * known[:, None].to(dtype)

    def embedding(self, c_noise: torch.Tensor, labels, augment_labels, n: int) -> torch.Tensor:
        emb = self.map_noise(c_noise.reshape(-1).to(torch.float32).expand(n))
        if self.map_label is not None:
            onehot = self.class_vector(labels, n, emb.device, emb.dtype)
            if self.training and self.label_dropout:
                onehot = onehot * (torch.rand(n, 1, device=emb.device) >= self.label_dropout).to(emb.dtype)
            emb = emb + self.map_label(onehot * math.sqrt(self.num_classes))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embedding(c_noise, labels, augment_labels, x.shape[0])

        skips, aux = [], x
        for name, module in self.enc.items():
            if name.endswith("_aux_down"):
                aux = module(aux)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + module(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + module(aux)) / math.sqrt(2)
            else:
                x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
                skips.append(x)

        out, pre = None, None
        for name, module in self.dec.items():
            if name.endswith("_aux_up"):
                out = module(out)
            elif name.endswith("_aux_norm"):
                pre = module(x)
            elif name.endswith("_aux_conv"):
                pre = module(F.silu(pre))
                out = pre if out is None else pre + out
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out
