"""CIFAR-10 from the standard python batches (``cifar-10-batches-py``), read locally or downloaded once."""

from __future__ import annotations

import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from distillbench.data.base import ConfigError, TensorDataModule
from distillbench.errors import DataNotFoundError
from distillbench.utils.io import file_digest

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def has_batches(folder: Path) -> bool:
    return all((folder / name).is_file() for names in BATCHES.values() for name in names)


def download_cifar10(cache_dir: Path) -> Path:
    """Fetch the tarball into ``cache_dir``, check its md5, extract it; return the batches folder."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / URL.rsplit("/", 1)[-1]
    if not archive.is_file() or file_digest(archive, "md5") != MD5:
        partial = archive.with_name(archive.name + ".part")
        urllib.request.urlretrieve(URL, partial)
        if file_digest(partial, "md5") != MD5:
            partial.unlink()
            raise OSError(f"{URL} downloaded with a wrong md5 (expected {MD5})")
        partial.replace(archive)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(cache_dir, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return cache_dir / FOLDER


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch (trusted CIFAR-10 files only): uint8 N×3×32×32 images and int64 labels."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return batch[b"data"].reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10: 3×32×32 images in [-1, 1] with 10 labels; 50k train, 10k test.

    Looks in ``root/cifar-10-batches-py``, ``root`` itself, then ``cache_dir/cifar-10-batches-py``; with
    ``download=True`` a missing copy is fetched into ``cache_dir``. ``limit`` keeps the first n of a split.
    """

    name = "cifar10"
    num_classes = 10

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        cache_dir: str = "~/.cache/distillbench/cifar10",
        limit: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, seed)
        self.root = None if root is None else Path(root).expanduser()
        self.download = bool(download)
        self.cache_dir = Path(cache_dir).expanduser()
        self.limit = None if limit is None else int(limit)
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"data.limit must be positive or null, got {limit}")

    def candidates(self) -> list[Path]:
        """Folders searched for the batches, in order."""
        roots = [self.root / FOLDER, self.root] if self.root is not None else []
        return roots + [self.cache_dir / FOLDER]

    def batches_dir(self) -> Path:
        """The first folder holding all six batches, downloading when allowed."""
        found = next((d for d in self.candidates() if has_batches(d)), None)
        if found is not None:
            return found
        error = None
        if self.download:
            try:
                return download_cifar10(self.cache_dir)
            except (OSError, tarfile.TarError) as e:
                error = e
        raise DataNotFoundError(self.missing_message(error)) from error

    def missing_message(self, error: Exception | None) -> str:
        looked = "\n".join(f"  - {d}" for d in self.candidates())
        reason = f"download failed: {error}\n" if error else ""
        return (
            f"CIFAR-10 python batches ({FOLDER}/data_batch_1..5, test_batch) not found; looked in:\n"
            f"{looked}\n"
            f"{reason}Set data.download=true to fetch {URL} into data.cache_dir={self.cache_dir}, "
            f"or download and extract it yourself and point data.root at the folder."
        )

    def load(self, split: str):
        if split not in BATCHES:
            raise ValueError(f"CIFAR-10 has splits {sorted(BATCHES)}, not {split!r}")
        folder, xs, ys = self.batches_dir(), [], []
        for name in BATCHES[split]:
            x, y = read_batch(folder / name)
            xs.append(x)
            ys.append(y)
            if self.limit is not None and sum(map(len, ys)) >= self.limit:
                break
        x, y = np.concatenate(xs)[: self.limit], np.concatenate(ys)[: self.limit]
        return torch.from_numpy(x.astype(np.float32)) / 127.5 - 1.0, torch.from_numpy(y)
