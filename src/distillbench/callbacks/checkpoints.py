"""Periodic checkpoints that hold everything a run needs to continue as if it had never stopped.

Every ``every_kimg`` generator kimg (between two batches) and at the end, but never while a non-finite
streak runs, the trainer writes ``<folder>/step_<generator step>.ckpt`` through
:class:`~distillbench.utils.checkpoints.AtomicCheckpointIO`, the newest ``keep`` are kept and ``last.ckpt``
becomes the newest.

Lightning's checkpoint holds the networks with EMA and counters (module state), both optimisers, the loops'
progress, the data position (the datamodule's state) and every callback's state (evaluation history, the
next evaluation and checkpoint kimg). This callback adds, under ``"distillbench"``: every rank's torch, CUDA,
numpy and Python RNG states, the number of rows ``metrics.csv`` had (loggers are flushed first), the
W&B run id and the run facts given as ``run`` (evaluation-noise seed, the teacher's reference).
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from distillbench import run_folder
from distillbench.errors import ConfigError
from distillbench.sweeps import HIGHER_IS_BETTER, metric_kind
from distillbench.utils.checkpoints import point_last_at, step_checkpoints
from distillbench.utils.logging import WANDB_ID_FILE, count_rows, csv_files

KEY = "distillbench"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def every_rank(obj) -> list:
    """``obj`` of every rank, in rank order (a collective under torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class RunCheckpoints(L.Callback):
    def __init__(self, folder: str | Path, every_kimg: float, keep: int = 3, run: dict | None = None,
                 guard=None):  # fmt: skip
        if not every_kimg > 0:
            raise ConfigError(f"checkpoint.every_kimg={every_kimg} must be > 0")
        if int(keep) < 1:
            raise ConfigError(f"checkpoint.keep={keep} must be >= 1")
        self.folder, self.every_kimg, self.keep = Path(folder), float(every_kimg), int(keep)
        self.run = dict(run or {})
        self.guard = guard  # a NonFiniteGuard: no checkpoint while its streak runs
        self.next_kimg = self.every_kimg
        self._restored_rng: dict | None = None
        self._between_batches = False

    def healthy(self) -> bool:
        return self.guard is None or self.guard.healthy

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Between batches: the last batch's metrics are logged and nothing of the next one has run."""
        if pl_module.kimg >= self.next_kimg and self.healthy():
            while self.next_kimg <= pl_module.kimg:
                self.next_kimg += self.every_kimg
            self._between_batches = True
            try:
                self.save(trainer, pl_module)
            finally:
                self._between_batches = False

    def on_train_end(self, trainer, pl_module):
        if self.healthy():
            self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> Path:
        """Write the step checkpoint (every rank takes part), point ``last.ckpt`` at it, prune old ones."""
        path = self.folder / f"step_{int(pl_module.gen_steps):07d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the whole run state
        if trainer.is_global_zero:
            point_last_at(path)
            for old in step_checkpoints(self.folder)[self.keep :]:
                trainer.strategy.checkpoint_io.remove_checkpoint(old)
        trainer.strategy.barrier("distillbench-checkpoint")
        return path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        rows = [count_rows(p) for p in csv_files(trainer.loggers)] if trainer.is_global_zero else []
        wandb_id = self.folder.parent / WANDB_ID_FILE
        if self._between_batches:
            # Lightning counts a restart as following a save at a batch's end and adds that batch to the
            # logging step (``_batches_that_stepped``); between batches it is already counted
            checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
        checkpoint[KEY] = {
            "rng": every_rank(rng_state()),
            "csv_rows": rows[0] if rows else None,
            "wandb_id": wandb_id.read_text().strip() if wandb_id.is_file() else None,
            **self.run,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        states = checkpoint.get(KEY, {}).get("rng", [])
        if len(states) == trainer.world_size:
            self._restored_rng = states[trainer.global_rank]

    def on_train_start(self, trainer, pl_module):
        if self._restored_rng is not None:  # as late as possible: setup may draw from the global streams
            set_rng_state(self._restored_rng)
            self._restored_rng = None

    def state_dict(self) -> dict:
        return {"next_kimg": self.next_kimg}

    def load_state_dict(self, state: dict) -> None:
        self.next_kimg = float(state["next_kimg"])


class BestCheckpoint(L.Callback):
    """``<folder>/best.ckpt``: the run as it was at the evaluation with the best ``metric`` so far (a metric
    kind such as ``fid``: its first column in the evaluation rows; lower is better unless the kind is one of
    IS, precision, recall), written after that evaluation; ``best`` holds that row.

    It reads the rows of ``evaluation`` (a :class:`~distillbench.callbacks.PeriodicEvaluation` listed before
    it, so its rows of a batch are there when this runs) and writes on every rank (a collective under DDP).
    The checkpoint is for sampling and evaluation (``evaluate run=<folder>/checkpoints/best.ckpt``); a run
    resumes from ``last.ckpt``."""

    def __init__(self, folder: str | Path, evaluation, metric: str = "fid"):
        self.path = Path(folder) / run_folder.BEST_CHECKPOINT
        self.evaluation, self.metric = evaluation, str(metric)
        self.best: dict | None = None
        self.seen = 0

    def better(self, value: float, than: float) -> bool:
        return value > than if self.metric in HIGHER_IS_BETTER else value < than

    def consider(self, trainer) -> None:
        rows = self.evaluation.history
        for row in rows[self.seen :]:
            column = next((k for k in row if "@" in k and metric_kind(k) == self.metric), None)
            value = None if column is None else row[column]
            if value is not None and np.isfinite(value):
                if self.best is None or self.better(value, self.best["value"]):
                    self.best = {"metric": column, "value": float(value), "kimg": row["kimg"],
                                 "gen_step": row["gen_step"], "checkpoint": f"{run_folder.CHECKPOINTS}/"
                                 f"{run_folder.BEST_CHECKPOINT}"}  # fmt: skip
                    trainer.save_checkpoint(self.path, weights_only=False)
        self.seen = len(rows)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if len(self.evaluation.history) > self.seen:
            self.consider(trainer)

    def on_train_start(self, trainer, pl_module):
        self.consider(trainer)  # the evaluation at kimg 0

    def on_train_end(self, trainer, pl_module):
        self.consider(trainer)

    def state_dict(self) -> dict:
        return {"best": self.best, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.seen = state["best"], int(state["seen"])
