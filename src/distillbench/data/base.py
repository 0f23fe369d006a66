"""Shared LightningDataModule for datasets held in memory as tensors."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from distillbench.errors import ConfigError

__all__ = ["ConfigError", "TensorDataModule", "keyed_generator", "per_device_batch"]


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``key`` (a seed and stream numbers), e.g. (seed, pass, shard)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def per_device_batch(global_batch: int, world_size: int, key: str = "data.batch_size") -> int:
    """Split the global batch over processes, as EDM/SiD's ``--batch`` does."""
    if global_batch <= 0:
        raise ConfigError(f"{key} must be positive, got {global_batch}")
    if global_batch % world_size:
        raise ConfigError(
            f"{key}={global_batch} is not divisible by the {world_size} processes; "
            f"choose a multiple of {world_size}"
        )
    return global_batch // world_size


class TensorDataModule(L.LightningDataModule):
    """A dataset of tensors ``x`` (in [-1, 1] for images) with optional integer ``labels``.

    Subclasses implement :meth:`load` returning ``(x, labels)`` for a split. ``batch_size`` is the global
    batch; :meth:`setup` divides it by the trainer's world size.
    """

    name: str = "tensors"
    num_classes: int = 0

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def arrays(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The split's (x, labels), loaded once."""
        if split not in self._cache:
            self._cache[split] = self.load(split)
        return self._cache[split]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.arrays("train")[0].shape[1:])

    @property
    def label_distribution(self) -> torch.Tensor | None:
        """Empirical class frequencies of the training split (None when unlabelled)."""
        labels = self.arrays("train")[1]
        if labels is None or not self.num_classes:
            return None
        counts = torch.bincount(labels, minlength=self.num_classes).double()
        return counts / counts.sum()

    def real_samples(self, n: int, split: str = "train", seed: int = 0):
        """``n`` real samples (without replacement where possible), drawn with a fixed seed."""
        x, labels = self.arrays(split)
        g = torch.Generator().manual_seed(seed)
        idx = (
            torch.randperm(len(x), generator=g)[:n]
            if n <= len(x)
            else torch.randint(len(x), (n,), generator=g)
        )
        return x[idx], (labels[idx] if labels is not None else None)

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        self.batch_per_device = per_device_batch(self.batch_size, world)

    def train_dataloader(self) -> DataLoader:
        x, labels = self.arrays("train")
        tensors = (x,) if labels is None else (x, labels)
        batch = getattr(self, "batch_per_device", self.batch_size)
        return DataLoader(
            TensorDataset(*tensors),
            batch_size=min(batch, len(x)),
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )
