"""Stop a run whose steps keep producing non-finite values, before it writes a bad checkpoint.

Methods drop non-finite samples and repair non-finite gradients, counting both
(``dropped_samples``, ``nonfinite_grads``). A step that raised either count on any rank is bad; after
``max_bad_steps`` bad steps in a row the run stops with :class:`~distillbench.errors.TrainingStopped`.
Checkpoints are only written while the current streak is empty (see :attr:`healthy`).
"""

from __future__ import annotations

import lightning as L
import torch

from distillbench.errors import ConfigError, TrainingStopped


class NonFiniteGuard(L.Callback):
    def __init__(self, max_bad_steps: int = 20):
        if int(max_bad_steps) < 1:
            raise ConfigError(f"max_bad_steps={max_bad_steps} must be >= 1")
        self.max_bad_steps = int(max_bad_steps)
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
                f"{int(pl_module.gen_steps)}. Its newest checkpoint predates the streak. Look for the source "
                "(a teacher that overflows in reduced precision, a learning rate too high), then resume with "
                "resume=<run folder> (optim.lr may be changed on resume), or allow longer streaks with "
                "max_bad_steps=<n>"
            )

    def state_dict(self) -> dict:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state["streak"])
