"""Data-free input for SIM/SiD/DI: an endless stream of class labels (the method draws its own noise z).

Each batch is a LongTensor of shape ``(per-device batch,)``. An unconditional setup (``num_classes == 0``)
yields batches filled with ``-1`` (:data:`UNCONDITIONAL`), so every step still sees a batch of the right size.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from distillbench.data.base import (
    ConfigError,
    DataPosition,
    TensorDataModule,
    keyed_stream,
    per_device_batch,
)

UNCONDITIONAL = -1


class LabelStream(IterableDataset):
    """Endless batches of ``batch`` labels drawn from ``probs``; all ``-1`` when ``probs`` is None.

    Every rank draws the global batch (``world`` × ``batch``) from the same stream and keeps its own rows, so
    ranks differ and together see the labels a single process with the global batch sees. Batch b is drawn
    from a stream keyed by (seed, b), so a run resumed at batch ``start`` draws what it would have drawn.
    """

    def __init__(self, probs: torch.Tensor | None, batch: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0):  # fmt: skip
        self.probs = probs
        self.batch = batch
        self.rows = slice(rank * batch, (rank + 1) * batch)
        self.world = world
        self.seed, self.start = seed, start

    def draw(self, b: int) -> torch.Tensor:
        if self.probs is None:
            return torch.full((self.batch,), UNCONDITIONAL, dtype=torch.long)
        size = self.world * self.batch
        labels = torch.multinomial(self.probs, size, replacement=True, generator=keyed_stream(self.seed, b))
        return labels[self.rows]

    def __iter__(self):
        for b in itertools.count(self.start):
            yield self.draw(b)


def normalise(label_probs) -> torch.Tensor:
    probs = torch.as_tensor(list(label_probs), dtype=torch.float64)
    if probs.ndim != 1 or not torch.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
        raise ConfigError(
            f"data.label_probs must be non-negative numbers with a positive sum, got {label_probs}"
        )
    return probs / probs.sum()


class NoiseDataModule(DataPosition, L.LightningDataModule):
    """Label batches for data-free distillation.

    Labels follow ``label_probs`` when given, else ``like``'s training label frequencies, else a uniform law
    over ``num_classes``. ``like`` (an optional :class:`TensorDataModule`) also supplies ``num_classes``,
    ``sample_shape`` and the real data that metrics need (``arrays``, ``real_samples``).
    """

    name = "noise"

    def __init__(
        self,
        num_classes: int = 0,
        label_probs=None,
        like: TensorDataModule | None = None,
        sample_shape=None,
        batch_size: int = 128,
        seed: int = 0,
    ):
        super().__init__()
        self.like = like
        self.label_probs = None if label_probs is None else normalise(label_probs)
        self.num_classes = self.resolve_classes(int(num_classes))
        self._sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world = 0, 1

    def resolve_classes(self, num_classes: int) -> int:
        """``num_classes`` agreed between the argument, ``label_probs`` and ``like``."""
        given = {}
        if self.label_probs is not None:
            given["data.label_probs"] = len(self.label_probs)
        if self.like is not None:
            given["data.like"] = self.like.num_classes
        for source, n in given.items():
            if num_classes and n != num_classes:
                raise ConfigError(f"data.num_classes={num_classes} but {source} gives {n} classes")
            num_classes = n
        return num_classes

    @property
    def label_distribution(self) -> torch.Tensor | None:
        """Class probabilities of the drawn labels (None when unconditional)."""
        probs = self.label_probs
        if probs is None and self.like is not None:
            probs = self.like.label_distribution
        if probs is None and self.num_classes:
            probs = torch.full((self.num_classes,), 1.0 / self.num_classes, dtype=torch.float64)
        return probs

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self._sample_shape is not None:
            return self._sample_shape
        return tuple(self.real_data().sample_shape)

    def real_data(self) -> TensorDataModule:
        if self.like is None:
            raise ConfigError(
                "data 'noise' holds no real data (needed for sample_shape and metrics): set data.like to a "
                "data config (e.g. +data@data.like=digits) or give data.sample_shape"
            )
        return self.like

    def arrays(self, split: str = "train"):
        return self.real_data().arrays(split)

    def real_samples(self, n: int, split: str = "train", seed: int = 0):
        return self.real_data().real_samples(n, split, seed)

    def setup(self, stage: str | None = None) -> None:
        self.world = self.trainer.world_size if self.trainer is not None else 1
        self.rank = self.trainer.global_rank if self.trainer is not None else 0
        self.batch_per_device = per_device_batch(self.batch_size, self.world)

    def train_dataloader(self) -> DataLoader:
        batch = getattr(self, "batch_per_device", self.batch_size)
        stream = LabelStream(self.label_distribution, batch, self.seed, self.rank, self.world, self.position)
        return DataLoader(stream, batch_size=None)
