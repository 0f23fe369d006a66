"""2-D Gaussian mixtures with configurable means, isotropic stds and weights."""

from __future__ import annotations

import torch

from distillbench.data.base import TensorDataModule
from distillbench.teachers.analytic import GaussianMixture


class Toy2DDataModule(TensorDataModule):
    """Samples of a :class:`GaussianMixture`; its exact denoiser is ``teacher=analytic``.

    The data set is one fixed draw (``sample_seed``), as a data set on disk is one fixed file: every run,
    whatever its ``seed`` (which orders the batches), trains on and is measured against the same samples,
    so runs of different seeds share their metrics' real side.
    """

    name = "toy2d"

    def __init__(
        self,
        means=((-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)),
        stds=0.1,
        weights=(0.4, 0.3, 0.2, 0.1),
        n_train: int = 20000,
        n_test: int = 5000,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        sample_seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, seed)
        self.mixture = GaussianMixture(means, stds, weights)
        self.n = {"train": int(n_train), "test": int(n_test)}
        self.sample_seed = int(sample_seed)

    def load(self, split: str):
        g = torch.Generator().manual_seed(self.sample_seed + (0 if split == "train" else 1))
        x, _ = self.mixture.sample(self.n[split], rng=g)
        return x, None
