"""Stop a run whose steps keep producing non-finite values, before it writes a bad checkpoint.

Methods drop non-finite samples and repair non-finite gradients, counting both
(``dropped_samples``, ``nonfinite_grads``). A step that raised either count on any rank is bad; after
``max_bad_steps`` bad steps in a row the run stops with :class:`~distillbench.errors.TrainingStopped`.
Checkpoints are only written while the current streak is empty (see :attr:`healthy`).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from distillbench.errors import ConfigError, TrainingStopped
from distillbench.utils.checkpoints import step_checkpoints


class NonFiniteGuard(L.Callback):
    def __init__(self, max_bad_steps: int = 20, checkpoint_dir: str | Path | None = None):
        if int(max_bad_steps) < 1:
            raise ConfigError(f"max_bad_steps={max_bad_steps} must be >= 1")
        self.max_bad_steps = int(max_bad_steps)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.streak = 0
        self.counts: tuple[int, int] | None = None

    @property
    def healthy(self) -> bool:
        return self.streak == 0

    @staticmethod
    def read_counts(pl_module) -> tuple[int, int]:
        # one read from the device for both (each read of a GPU tensor waits for the GPU)
        dropped, repaired = torch.stack([pl_module.dropped_samples, pl_module.nonfinite_grads]).tolist()
        return dropped, repaired

    def on_train_start(self, trainer, pl_module):
        self.counts = self.read_counts(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        counts = self.read_counts(pl_module)
        bad = trainer.strategy.reduce_boolean_decision(counts != self.counts, all=False)  # any rank
        self.counts = counts
        self.streak = self.streak + 1 if bad else 0
        if self.streak >= self.max_bad_steps:
            raise TrainingStopped(
                f"{self.streak} steps in a row had non-finite values (so far {counts[0]} samples dropped, "
                f"{counts[1]} gradient entries repaired), so the run stopped at generator step "
                f"{int(pl_module.gen_steps)}. {self.resume_advice()} Look for the source first (a "
                "teacher that overflows in reduced precision, a learning rate too high), or allow longer "
                "streaks with max_bad_steps=<n>"
            )

    def resume_advice(self) -> str:
        """What resuming would continue from: the newest checkpoint (written before the streak), or none."""
        folder = self.checkpoint_dir
        newest = (step_checkpoints(folder) or [None])[0] if folder is not None else None
        if newest is None:
            where = f" in {folder.parent}" if folder is not None else ""
            return (f"No checkpoint was written before the streak, so resume=<run folder> starts the run "
                    f"again from the beginning{where}; method.lr may be lowered on resume.")  # fmt: skip
        return (f"Its newest checkpoint, {newest.name}, predates the streak: resume={folder.parent} "
                "continues from it, and method.lr (and method.fake_lr) may change on resume.")  # fmt: skip

    def state_dict(self) -> dict:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state["streak"])
