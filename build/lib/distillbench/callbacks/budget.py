"""Stop training after a number of generator images (kimg), the unit of every distillation schedule."""

from __future__ import annotations

import lightning as L

from distillbench.errors import ConfigError


class KimgBudget(L.Callback):
    def __init__(self, duration_kimg: float):
        if not duration_kimg > 0:
            raise ConfigError(f"duration_kimg={duration_kimg} must be > 0")
        self.duration_kimg = float(duration_kimg)

    def stop_when_spent(self, trainer, pl_module) -> None:
        if pl_module.kimg >= self.duration_kimg:
            trainer.should_stop = True

    def on_train_start(self, trainer, pl_module):  # a resumed run that had already finished
        self.stop_when_spent(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stop_when_spent(trainer, pl_module)
