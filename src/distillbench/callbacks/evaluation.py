"""Evaluate the EMA generator every N kimg on noise and labels fixed across evaluations and runs."""

from __future__ import annotations

import lightning as L
import torch

from distillbench.samplers.generate import fixed_labels, fixed_noise
from distillbench.utils.images import to_image_range


class PeriodicEvaluation(L.Callback):
    """Logs ``eval/<metric>`` against ``train/kimg`` at kimg 0, every ``every_kimg`` and at the end."""

    def __init__(
        self, metrics, datamodule, every_kimg: float, n: int, noise_seed: int = 0, batch_size: int = 500
    ):
        self.metrics = metrics
        self.datamodule = datamodule
        self.every_kimg = float(every_kimg)
        self.n, self.noise_seed, self.batch_size = int(n), int(noise_seed), int(batch_size)
        self.history: list[dict] = []
        self.next_kimg = 0.0

    def fixed_inputs(self, pl_module):
        z = fixed_noise(self.n, pl_module.sample_shape, self.noise_seed)
        probs = self.datamodule.label_distribution if pl_module.num_classes else None
        return z, fixed_labels(self.n, probs, self.noise_seed)

    @torch.no_grad()
    def samples(self, pl_module) -> torch.Tensor:
        z, labels = self.fixed_inputs(pl_module)
        out = []
        for start in range(0, self.n, self.batch_size):
            zb = z[start : start + self.batch_size].to(pl_module.device)
            lb = None if labels is None else labels[start : start + self.batch_size].to(pl_module.device)
            out.append(pl_module.sample(zb, lb).cpu())
        return to_image_range(torch.cat(out))

    def evaluate(self, trainer, pl_module) -> dict:
        figures = self.metrics.evaluate(self.samples(pl_module), self.datamodule)
        row = {"kimg": pl_module.kimg, "gen_step": int(pl_module.gen_steps), **figures}
        self.history.append(row)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"eval/{k}": v for k, v in figures.items()} | {"train/kimg": row["kimg"]},
                step=row["gen_step"],
            )
        return row

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.kimg >= self.next_kimg:
            self.evaluate(trainer, pl_module)
            while self.next_kimg <= pl_module.kimg:
                self.next_kimg += self.every_kimg

    def on_train_start(self, trainer, pl_module):
        declare_wandb_axes(trainer)
        if not self.history:
            self.evaluate(trainer, pl_module)
            self.next_kimg = self.every_kimg

    def on_train_end(self, trainer, pl_module):
        if not self.history or self.history[-1]["gen_step"] != int(pl_module.gen_steps):
            self.evaluate(trainer, pl_module)


def declare_wandb_axes(trainer) -> None:
    """W&B: plot ``eval/*`` and ``train/*`` against kimg, and summarise FID-like metrics by their minimum."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            run = logger.experiment
            run.define_metric("train/kimg")
            run.define_metric("train/*", step_metric="train/kimg")
            run.define_metric("eval/*", step_metric="train/kimg")
            for pattern in ("eval/fid*", "eval/kid*"):
                run.define_metric(pattern, step_metric="train/kimg", summary="min")
