"""Fixed evaluation noise and labels, and batched generation with any sampler.

The noise of global sample index i depends only on (seed, i): it is drawn in fixed chunks of
``NOISE_CHUNK`` samples, each from its own random stream seeded from (seed, chunk index), so batch size, n and
the rank's offset never change which noise a sample gets.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from rich.progress import Progress

from distillbench.samplers.solvers import SampleResult
from distillbench.utils.images import to_image_range

NOISE_CHUNK = 1024
_LABEL_STREAM = 1 << 32  # spawn key of the label stream, far from any chunk index


def _stream(seed: int, stream: int) -> torch.Generator:
    """A CPU random stream whose seed is a hash of (seed, stream)."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _chunk_noise(chunk: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(NOISE_CHUNK, *shape, generator=_stream(seed, chunk))


def fixed_noise(n: int, shape, seed: int, offset: int = 0) -> torch.Tensor:
    """Standard normal noise (n, *shape) for global sample indices offset .. offset + n − 1 (on the CPU)."""
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be non-negative, got n={n}, offset={offset}")
    shape = tuple(int(s) for s in shape)
    if n == 0:
        return torch.empty(0, *shape)
    first, last = offset // NOISE_CHUNK, (offset + n - 1) // NOISE_CHUNK
    noise = torch.cat([_chunk_noise(chunk, shape, seed) for chunk in range(first, last + 1)])
    start = offset - first * NOISE_CHUNK
    return noise[start : start + n]


def fixed_labels(n: int, probs, seed: int) -> torch.Tensor | None:
    """n class labels drawn from ``probs`` (normalised) with their own random stream; None when probs is None.

    Inverse-CDF sampling of one uniform per sample, so the first k labels do not depend on n.
    """
    if probs is None:
        return None
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if probs.ndim != 1 or (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"label probs must be a non-negative vector with positive sum, got {probs.tolist()}")
    cdf = probs.cumsum(0) / probs.sum()
    uniforms = torch.rand(n, dtype=torch.float64, generator=_stream(seed, _LABEL_STREAM))
    return torch.searchsorted(cdf, uniforms, right=True).clamp_(max=len(probs) - 1)


def device_of(denoiser) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for one with neither)."""
    tensor = next(itertools.chain(denoiser.parameters(), denoiser.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class StudentSampler:
    """A trained method as a sampler for :func:`generate`: its ``sample(z, labels)`` (EMA weights), or the
    ``sample`` callable given; the NFE is the method's ``nfe``."""

    def __init__(self, sample=None):
        self.sample_fn = sample

    def sample(self, method, z: torch.Tensor, labels: torch.Tensor | None = None) -> SampleResult:
        x = (self.sample_fn or method.sample)(z, labels).float()
        return SampleResult(x, nfe=int(method.nfe))


@torch.no_grad()
def generate(
    sampler,
    denoiser,
    n: int,
    batch_size: int = 256,
    seed: int = 0,
    label_probs=None,
    progress: bool = False,
    offset: int = 0,
    advance=None,
):
    """Sample the n points of global indices offset … offset + n − 1 with ``fixed_noise``/``fixed_labels``;
    returns (x, labels, nfe_per_sample) on the CPU.

    Images are clipped to [-1, 1] unless the denoiser's data is unbounded (``bounded = False``: the analytic
    mixture teachers and their students); other samples (2-D points) are returned as the sampler made them.

    All batches run the same deterministic sampler, so nfe_per_sample is the counted NFE of one batch.
    ``progress`` draws a bar of its own; ``advance(size)``, when given, is called after every batch (for a
    caller that shows the progress in its own display).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device_of(denoiser)
    labels = fixed_labels(offset + n, label_probs, seed)
    labels = None if labels is None else labels[offset:]
    batches, nfe = [], 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task("sampling", total=n)
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            z = fixed_noise(size, denoiser.sample_shape, seed, offset=offset + start).to(device)
            batch_labels = None if labels is None else labels[start : start + size].to(device)
            result = sampler.sample(denoiser, z, batch_labels)
            batches.append(result.x.cpu())
            nfe = result.nfe
            bar.advance(task, size)
            if advance is not None:
                advance(size)
    x = torch.cat(batches) if batches else torch.empty(0, *denoiser.sample_shape)
    return (to_image_range(x) if getattr(denoiser, "bounded", True) else x), labels, nfe
