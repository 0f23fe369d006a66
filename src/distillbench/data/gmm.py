"""Exact samples of the analytic teacher's mixture, without limit (``data=gmm_digits|gmm_mnist``).

Sample i of a split is drawn in a block of ``BLOCK`` samples from a generator keyed by (stream, seed, block),
so it is the same in every run, whatever the batch size, n or process count. Each split has its own stream:
``train`` (keyed by the run's seed) feeds the methods that train on data; ``reference`` (keyed by the metric
suite's seed) is what the metrics compare with; ``test`` gives independent exact samples for the metrics'
floors. Distinct streams never share a sample, and the metrics refuse the training stream (docs/gmm.md).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from distillbench.config import ASSETS_DIR
from distillbench.data.base import (
    ConfigError,
    DataPosition,
    keyed_stream,
    per_device_batch,
    split_among_workers,
)
from distillbench.teachers.gmm import load_mixture

BLOCK = 1024
SPLITS = ("train", "reference", "test")


class MixtureDraws:
    """Samples [start, stop) of one keyed stream of a mixture: float32 (x, labels); the last block is kept."""

    def __init__(self, mixture, stream: int, seed: int):
        self.mixture, self.stream, self.seed = mixture, int(stream), int(seed)
        self._block: tuple[int, tuple[torch.Tensor, torch.Tensor] | None] = (-1, None)

    def block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._block[0] != b:
            x, labels, _ = self.mixture.sample(BLOCK, keyed_stream(self.stream, self.seed, b))
            self._block = (b, (x.float().cpu(), labels.cpu()))
        return self._block[1]

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = (
            [self.block(b) for b in range(start // BLOCK, (stop - 1) // BLOCK + 1)] if stop > start else []
        )
        if not blocks:
            return torch.empty(0, *self.mixture.sample_shape), torch.empty(0, dtype=torch.long)
        x, labels = (torch.cat(parts) for parts in zip(*blocks, strict=True))
        first = start - (start // BLOCK) * BLOCK
        return x[first : first + stop - start], labels[first : first + stop - start]


class MixtureBatches(IterableDataset):
    """Endless (x, labels) batches of the training stream: global batch b is samples [b·W·B, (b + 1)·W·B)
    (W processes of B rows), each rank keeping its own B; from global batch ``start`` on resume."""

    def __init__(self, draws: MixtureDraws, batch: int, start: int = 0, rank: int = 0, world: int = 1):
        self.draws, self.batch, self.start, self.rank, self.world = draws, batch, start, rank, world

    def __iter__(self):
        for b in split_among_workers(range(self.start, 2**62)):
            first = (b * self.world + self.rank) * self.batch
            yield self.draws(first, first + self.batch)


class GMMDataModule(DataPosition, L.LightningDataModule):
    """Exact samples of the mixture in ``path`` (None: the shipped one called ``name``) with the interface of
    the image data modules.

    ``arrays(split)`` holds the split's first ``split_size`` samples (for code that reads a finite split);
    ``real_samples(n, split, seed)`` draws any n. ``streams`` numbers the splits' streams; they must differ.
    """

    draws_any_n = True  # the metric suite takes n reference samples, not min(n, split_size)

    def __init__(self, path: str | None, name: str, split_size: int = 10_000, streams=None,
                 batch_size: int = 128, num_workers: int = 0, seed: int = 0):  # fmt: skip
        super().__init__()
        self.mixture = load_mixture(path or ASSETS_DIR / "teachers" / name, "float64")
        self.name = str(name)
        self.num_classes = self.mixture.num_classes
        self.split_size = int(split_size)
        self.streams = dict(zip(SPLITS, range(len(SPLITS)), strict=True)) | dict(streams or {})
        if set(self.streams) != set(SPLITS) or len(set(self.streams.values())) != len(SPLITS):
            raise ConfigError(
                f"data.streams={dict(streams or {})} must give the splits {list(SPLITS)} distinct stream "
                "numbers (training, metric reference and floor samples never overlap); e.g. "
                "{train: 0, reference: 1, test: 2}"
            )
        if self.split_size < 1:
            raise ConfigError(f"data.split_size={split_size} must be >= 1")
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.mixture.sample_shape

    @property
    def label_distribution(self) -> torch.Tensor:
        """The mixture's class prior (exact, not counted)."""
        return self.mixture.class_prior

    def draws(self, split: str, seed: int | None = None) -> MixtureDraws:
        """The stream of ``split``: ``train`` keyed by the data's seed, the others by ``seed`` (default 0)."""
        if split not in SPLITS:
            raise ConfigError(f"data '{self.name}' has splits {list(SPLITS)}, not {split!r}")
        key = self.seed if split == "train" else int(seed or 0)
        return MixtureDraws(self.mixture, self.streams[split], key)

    def arrays(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``split_size`` samples of ``split`` and their labels."""
        if split not in self._cache:
            self._cache[split] = self.draws(split)(0, self.split_size)
        return self._cache[split]

    def real_samples(self, n: int, split: str = "reference", seed: int = 0):
        """The first ``n`` exact samples of ``split`` (keyed by ``seed``); never the training stream."""
        if split == "train":
            raise ConfigError(
                f"data '{self.name}': metrics compared with split=train would measure against the training "
                "stream; set metrics.split=reference"
            )
        return self.draws(split, seed)(0, int(n))

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        self.batch_per_device = per_device_batch(self.batch_size, world)

    def train_dataloader(self) -> DataLoader:
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        )
        batch = getattr(self, "batch_per_device", self.batch_size)
        stream = MixtureBatches(self.draws("train"), batch, self.position, rank, world)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)
