"""Shared LightningDataModule for datasets held in memory as tensors."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    TensorDataset,
    default_collate,
    get_worker_info,
)

from distillbench.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataPosition",
    "ResumableBatches",
    "TensorDataModule",
    "keyed_stream",
    "per_device_batch",
]


def keyed_stream(*key: int) -> torch.Generator:
    """A CPU random stream (``torch.Generator``) seeded by a hash of ``key`` (a seed and stream numbers), e.g.
    (seed, pass, shard)."""
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


class DataPosition:
    """A LightningDataModule mixin: where the training batches start, so a resumed run continues after the
    last batch it trained on.

    That is the model's ``batches_trained`` (a checkpointed counter, restored before Lightning builds the
    loader); 0 for a model without one or outside a trainer.
    """

    @property
    def position(self) -> int:
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        return int(getattr(module, "batches_trained", 0))


def split_among_workers(indices: range) -> range:
    """This DataLoader worker's share of ``indices`` (round robin, so the loader yields them in order)."""
    info = get_worker_info()
    return indices if info is None else indices[info.id :: info.num_workers]


class ResumableBatches(IterableDataset):
    """Endless batches of a map-style dataset in a reshuffled order per pass, from global batch ``start``.

    Global batch b is rows [b·W·B, (b + 1)·W·B) of the permutation of pass p keyed by (seed, p) (W processes,
    B rows each, the last incomplete batch of a pass dropped); each rank keeps its own B rows. The order is a
    function of the batch index alone, so a run resumed at batch ``start`` sees what it would have seen.
    """

    def __init__(
        self, dataset: Dataset, batch: int, seed: int, start: int = 0, rank: int = 0, world: int = 1
    ):
        self.dataset, self.batch, self.seed, self.start = dataset, batch, seed, start
        self.rank, self.world = rank, world
        self._order: tuple[int, torch.Tensor | None] = (-1, None)
        self.per_pass = len(dataset) // (batch * world)
        if self.per_pass < 1:
            raise ConfigError(
                f"the batch of {batch * world} is larger than the {len(dataset)} training samples; "
                "lower the batch size"
            )

    def order(self, p: int) -> torch.Tensor:
        """The permutation of pass ``p`` (the current pass's is kept)."""
        if self._order[0] != p:
            self._order = (p, torch.randperm(len(self.dataset), generator=keyed_stream(self.seed, p)))
        return self._order[1]

    def rows(self, b: int) -> torch.Tensor:
        first = (b % self.per_pass) * self.batch * self.world + self.rank * self.batch
        return self.order(b // self.per_pass)[first : first + self.batch]

    def __iter__(self):
        for b in split_among_workers(range(self.start, 2**62)):
            yield default_collate([self.dataset[int(i)] for i in self.rows(b)])


class TensorDataModule(DataPosition, L.LightningDataModule):
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

    def rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        x, labels = self.arrays("train")
        return self.batches(TensorDataset(*((x,) if labels is None else (x, labels))))

    def batches(self, dataset: Dataset) -> DataLoader:
        """Resumable shuffled batches of ``dataset`` (:class:`ResumableBatches`), from :attr:`position`."""
        batch = getattr(self, "batch_per_device", self.batch_size)
        stream = ResumableBatches(dataset, batch, self.seed, self.position, *self.rank_and_world())
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)
