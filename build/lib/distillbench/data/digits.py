"""scikit-learn's 8×8 handwritten digits (they ship inside scikit-learn), scaled to [-1, 1]."""

from __future__ import annotations

import torch

from distillbench.data.base import TensorDataModule


class DigitsDataModule(TensorDataModule):
    """1797 grey 8×8 digits with 10 labels; ``split='test'`` is a fixed 20% hold-out."""

    name = "digits"
    num_classes = 10

    def __init__(
        self, batch_size: int = 128, num_workers: int = 0, seed: int = 0, test_fraction: float = 0.2
    ):
        super().__init__(batch_size, num_workers, seed)
        self.test_fraction = float(test_fraction)

    def load(self, split: str):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 → [-1, 1]
        y = torch.tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        n_test = int(round(self.test_fraction * len(x)))
        if split == "all":
            return x, y
        idx = perm[:n_test] if split == "test" else perm[n_test:]
        return x[idx], y[idx]
