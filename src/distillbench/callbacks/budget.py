"""Stop training after a number of generator images (kimg), the unit of every distillation schedule."""

from __future__ import annotations

import lightning as L

from distillbench.errors import ConfigError


class KimgBudget(L.Callback):
    def __init__(self, duration_kimg: float):
        if not duration_kimg > 0:
            raise ConfigError(f"duration_kimg={duration_kimg} must be > 0")
        self.duration_kimg = float(duration_kimg)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.kimg >= self.duration_kimg:
            trainer.should_stop = True
