"""The training pairs of Direct Distillation, read from the shards that
``python -m distillbench.make_trajectories`` writes.

A training batch is ``(x_k, σ_k, k, x_N, label)``: the solver state after k of N steps, its noise level and
step index, the trajectory's final output and its label (−1 when unlabelled). A trajectory stored at J step
indices gives J pairs.

``like`` (optional) is the data module the teacher was trained on: it supplies the real data, the name and
the label frequencies that metrics and evaluation labels need (``data=trajectories +data@data.like=digits``).
Without it, the real samples are the trajectories' final outputs.

``streaming=true`` reads the training shards one at a time instead of all at once (Stable Diffusion latents:
120k pairs of 4×64×64 states are about 8 GB): :class:`ShardStream` visits the shards in a seeded random order
per pass, shuffles the pairs within each, and gives every (rank, worker) its own shards.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from distillbench.data.base import TensorDataModule, keyed_stream, split_among_workers
from distillbench.errors import ConfigError

MANIFEST = "manifest.json"
UNLABELLED = -1
RERUN = "python -m distillbench.make_trajectories"


def read_manifest(root: Path) -> dict:
    """The manifest of a trajectories folder, after checking that every shard it lists is there."""
    if not root.is_dir():
        raise ConfigError(f"data.root={root} does not exist; make the pairs with `{RERUN} out_dir={root}`")
    if not (root / MANIFEST).is_file():
        raise ConfigError(
            f"data.root={root} has no {MANIFEST}, so it is not a trajectories folder; "
            f"make one with `{RERUN} out_dir={root}`"
        )
    manifest = json.loads((root / MANIFEST).read_text())
    files = [shard["file"] for split in manifest["splits"].values() for shard in split]
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise ConfigError(
            f"data.root={root} misses {len(missing)} of its {len(files)} shards ({', '.join(missing[:3])}"
            f"{', …' if len(missing) > 3 else ''}); rerun `{RERUN}` with the same settings and "
            f"out_dir={root} to finish them (it resumes)"
        )
    return manifest


def teacher_forwards(manifest: dict) -> float:
    """Teacher calls that made the training split: N DPM-Solver++(2M) steps, one call each, per trajectory."""
    return float(sum(shard["count"] for shard in manifest["splits"]["train"]) * manifest["steps"])


def check_held_out(manifest: dict, root: Path, eval_noise_seed: int) -> None:
    """The pairs come from other noise than the evaluation's, or the student is measured on its inputs."""
    if int(manifest["noise_seed"]) == int(eval_noise_seed):
        raise ConfigError(
            f"{root} was made from noise_seed={manifest['noise_seed']}, the evaluation's noise "
            f"(eval.noise_seed={eval_noise_seed}): the student would be measured on the trajectories it "
            f"trains on; remake them with `{RERUN} noise_seed={int(eval_noise_seed) + 1}` or set another "
            "eval.noise_seed"
        )


class PairDataset(Dataset):
    """Pair i = (trajectory i // J, step index i % J) of stacked shards, without copying the finals."""

    def __init__(self, shards: dict[str, torch.Tensor], indices: list[int], sigmas: list[float]):
        self.states, self.finals, self.labels = shards["states"], shards["finals"], shards["labels"]
        self.steps = torch.tensor(indices)
        self.sigmas = torch.tensor([sigmas[k] for k in indices], dtype=torch.float32)

    def __len__(self) -> int:
        return self.states.shape[0] * self.states.shape[1]

    def __getitem__(self, i: int):
        trajectory, j = divmod(i, self.states.shape[1])
        return (self.states[trajectory, j], self.sigmas[j], self.steps[j], self.finals[trajectory],
                self.labels[trajectory])  # fmt: skip


class ShardStream(IterableDataset):
    """Endless pairs from shard files, one shard in memory at a time.

    Pass e (0, 1, …) visits the shards in the order of a permutation seeded by (seed, e); shard i of it goes
    to the consumer i mod C of the C = ranks × workers consumers, which yields its pairs in a seeded random
    order. Each consumer needs a shard: C ≤ the number of shards. A resumed run passes the batches already
    taken (``start``, per rank) and each consumer skips its share of them.
    """

    def __init__(self, data: TrajectoryDataModule, shards: list[dict], seed: int, rank: int = 0,
                 world: int = 1, batch: int = 1, start: int = 0):  # fmt: skip
        self.data, self.shards, self.seed, self.rank, self.world = data, shards, seed, rank, world
        self.batch, self.start = batch, start

    def consumer(self) -> tuple[int, int]:
        """(this consumer's index, the number of consumers) over ranks and data loader workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        count = self.world * workers
        if count > len(self.shards):
            raise ConfigError(
                f"data.streaming with {self.world} process(es) × {workers} worker(s) needs at least {count} "
                f"training shards, {self.data.root} has {len(self.shards)}; lower data.num_workers or remake "
                "the trajectories with a smaller shard_size"
            )
        return self.rank * workers + worker, count

    def __iter__(self):
        taken = len(split_among_workers(range(self.start)))  # batches this worker made before the resume
        return itertools.islice(self.pairs(), taken * self.batch, None)

    def pairs(self):
        index, count = self.consumer()
        for epoch in itertools.count():
            order = torch.randperm(len(self.shards), generator=keyed_stream(self.seed, epoch))
            for position in order[index::count].tolist():
                pairs = PairDataset(self.data.read_shard(self.shards[position]), self.data.indices,
                                    self.data.manifest["sigmas"])  # fmt: skip
                for i in torch.randperm(
                    len(pairs), generator=keyed_stream(self.seed, epoch, position)
                ).tolist():
                    yield pairs[i]


class TrajectoryDataModule(TensorDataModule):
    """Pairs (x_k, σ_k, k, x_N, label) from the shards in ``root``; ``split`` is ``train`` or ``test``."""

    def __init__(self, root: str | Path, like: TensorDataModule | None = None, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, streaming: bool = False):  # fmt: skip
        super().__init__(batch_size, num_workers, seed)
        self.root = Path(root)
        self.streaming = bool(streaming)
        self.like = like
        self.manifest = read_manifest(self.root)
        self._shards: dict[str, dict[str, torch.Tensor]] = {}
        if like is not None and tuple(like.sample_shape) != self.sample_shape:
            raise ConfigError(
                f"data.like '{like.name}' has samples of shape {tuple(like.sample_shape)} but the "
                f"trajectories in data.root={self.root} have shape {self.sample_shape}; pick the teacher's "
                "own data as like"
            )

    @property
    def name(self) -> str:
        return self.like.name if self.like is not None else "trajectories"

    @property
    def num_classes(self) -> int:
        return self.like.num_classes if self.like is not None else int(self.manifest["num_classes"])

    # With ``like``, the evaluation's labels, the metrics' real side and the ground truth are ``like``'s own,
    # so a direct cell is measured on exactly what the other cells of a comparison are: an exact mixture's
    # class prior and reference stream (data=gmm_*), not counts or a resampling of a finite split.
    @property
    def label_distribution(self) -> torch.Tensor | None:
        return self.like.label_distribution if self.like is not None else super().label_distribution

    @property
    def draws_any_n(self) -> bool:
        return bool(getattr(self.like, "draws_any_n", False))

    @property
    def mixture(self):
        return getattr(self.like, "mixture", None)

    def real_samples(self, n: int, split: str = "train", seed: int = 0):
        if self.like is not None:
            return self.like.real_samples(n, split, seed)
        return super().real_samples(n, split, seed)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["sample_shape"])

    @property
    def indices(self) -> list[int]:
        """The stored step indices k."""
        return list(self.manifest["indices"])

    def shards(self, split: str) -> dict[str, torch.Tensor]:
        """The split's stacked shards: states (S, J, …), finals (S, …), labels (S,) (−1 when unlabelled)."""
        if split not in self._shards:
            self._shards[split] = self.read_split(split)
        return self._shards[split]

    def read_split(self, split: str) -> dict[str, torch.Tensor]:
        if split not in self.manifest["splits"]:
            raise ConfigError(f"split {split!r} is not one of {sorted(self.manifest['splits'])}")
        parts = [self.read_shard(shard) for shard in self.manifest["splits"][split]]
        if not parts:
            raise ConfigError(f"data.root={self.root} has no {split} trajectories; set test_fraction > 0")
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def read_shard(self, shard: dict) -> dict[str, torch.Tensor]:
        """One shard's tensors, checked against the manifest's count, step indices and sample shape."""
        tensors = load_file(str(self.root / shard["file"]))
        expected = (shard["count"], len(self.indices), *self.sample_shape)
        if (
            tuple(tensors["states"].shape) != expected
            or tuple(tensors["finals"].shape) != expected[:1] + expected[2:]
        ):
            raise ConfigError(
                f"{self.root / shard['file']} holds states of shape {tuple(tensors['states'].shape)}, not "
                "the "
                f"{expected} of its manifest; delete the shard and rerun `{RERUN} out_dir={self.root}`"
            )
        labels = tensors.get("labels", torch.full((shard["count"],), UNLABELLED, dtype=torch.long))
        return {"states": tensors["states"], "finals": tensors["finals"], "labels": labels}

    def pairs(self, split: str = "train") -> PairDataset:
        return PairDataset(self.shards(split), self.indices, self.manifest["sigmas"])

    def load(self, split: str):
        """The real samples: ``like``'s, else the trajectories' final outputs (and labels)."""
        if self.like is not None:
            return self.like.arrays(split)
        shards = self.shards(split)
        labels = shards["labels"] if self.num_classes else None
        return shards["finals"], labels

    def train_dataloader(self) -> DataLoader:
        if not self.streaming:
            return self.batches(self.pairs("train"))
        batch = getattr(self, "batch_per_device", self.batch_size)
        stream = ShardStream(self, self.manifest["splits"]["train"], self.seed, *self.rank_and_world(), batch,
                             self.position)  # fmt: skip
        return DataLoader(stream, batch_size=batch, num_workers=self.num_workers, drop_last=True)
