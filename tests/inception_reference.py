"""An independent statement of the FID Inception's input, for the regression tests and their fixture.

EDM's ``fid.py`` feeds uint8 images to the ``inception-2015-12-05`` detector, which resizes them like
TensorFlow 1's ``resize_bilinear`` (corners not aligned) and maps levels to (x − 128)/128. Written here from
that definition with numpy index arithmetic alone, so that it shares no code with
``distillbench.metrics.extractors``: output pixel i reads source coordinate s = i·in/out, between rows
⌊s⌋ and min(⌊s⌋ + 1, in − 1), weighted by s − ⌊s⌋.
"""

from __future__ import annotations

import numpy as np

SIZE = 299


def tf1_resize_bilinear(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """N×C×H×W → N×C×size×size in float64, as TensorFlow 1's ``resize_bilinear(align_corners=False)``."""

    def taps(n_in: int):
        source = np.arange(size, dtype=np.float64) * n_in / size
        low = np.floor(source).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, source - low

    x = images.astype(np.float64)
    low, high, weight = taps(x.shape[2])
    x = x[:, :, low, :] + (x[:, :, high, :] - x[:, :, low, :]) * weight[:, None]
    low, high, weight = taps(x.shape[3])
    return x[:, :, :, low] + (x[:, :, :, high] - x[:, :, :, low]) * weight


def inception_input(levels: np.ndarray) -> np.ndarray:
    """uint8 N×C×H×W images (C = 1 or 3) → the detector's float32 input: RGB, 299², (x − 128)/128."""
    if levels.dtype != np.uint8:
        raise TypeError(f"the detector takes uint8 images, not {levels.dtype}")
    if levels.shape[1] == 1:
        levels = np.repeat(levels, 3, axis=1)
    return ((tf1_resize_bilinear(levels) - 128) / 128).astype(np.float32)


def to_levels(x: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1] → uint8 levels, as an image file stores them: round((x + 1)·127.5)."""
    return np.rint((np.clip(x.astype(np.float64), -1, 1) + 1) * 127.5).astype(np.uint8)
