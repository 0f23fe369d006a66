"""Evaluate the EMA generator every N kimg on noise and labels fixed across evaluations and runs.

Under DDP each rank samples its own share of the n fixed inputs (global sample indices, so the set is the
one a single process makes), the shares are gathered on every rank, rank 0 measures and broadcasts the
figures. Every rank takes part in both collectives, so none waits on another.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pandas as pd
import torch

from distillbench.callbacks.progress import evaluation_bar
from distillbench.methods.base import DistillationMethod
from distillbench.metrics.suite import PROTOCOL, protocol_text
from distillbench.samplers.generate import StudentSampler, fixed_labels, fixed_noise, generate
from distillbench.sweeps import AXES, EVAL_FILE, HIGHER_IS_BETTER, metric_kind
from distillbench.utils.images import save_samples_figure
from distillbench.utils.io import atomic_writer


def shard(n: int, world: int, rank: int) -> tuple[int, int]:
    """Global sample indices [start, stop) of ``rank``'s share of ``n``."""
    return rank * n // world, (rank + 1) * n // world


class PeriodicEvaluation(L.Callback):
    """Logs ``eval/<metric>`` against ``train/kimg`` at kimg 0, every ``every_kimg`` and at the end.

    Each row carries the metric suite's protocol record (as one text cell, :func:`protocol_text`), which
    W&B also keeps in the run summary as ``eval/protocol``. With ``run_dir`` it also appends the row to
    ``<run_dir>/eval.csv`` and saves the sample grid of the first ``grid_size`` fixed inputs as
    ``<run_dir>/grids/step_<generator step>.png``; the grid goes to W&B and TensorBoard as an image at the
    same x-axis point.
    """

    def __init__(
        self,
        metrics,
        datamodule,
        every_kimg: float,
        n: int,
        noise_seed: int = 0,
        batch_size: int = 500,
        grid_size: int = 64,
        run_dir: str | Path | None = None,
    ):
        self.metrics = metrics
        self.datamodule = datamodule
        self.every_kimg = float(every_kimg)
        self.n, self.noise_seed, self.batch_size = int(n), int(noise_seed), int(batch_size)
        self.grid_size = int(grid_size)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.history: list[dict] = []
        self.next_kimg = 0.0
        self._declared: set[str] = set()

    def label_probs(self, pl_module):
        """The law of the evaluation labels: the data's, for a class-conditional model; else None."""
        return self.datamodule.label_distribution if pl_module.num_classes else None

    def fixed_inputs(self, pl_module, start: int = 0, stop: int | None = None):
        """Noise and labels of global evaluation indices [start, stop) (the same in every run)."""
        stop = self.n if stop is None else stop
        z = fixed_noise(stop - start, pl_module.sample_shape, self.noise_seed, offset=start)
        labels = fixed_labels(stop, self.label_probs(pl_module), self.noise_seed)
        return z, None if labels is None else labels[start:stop]

    def samples(self, pl_module, trainer=None, sample=None, advance=None) -> torch.Tensor:
        """All n samples of ``sample`` (default: the EMA generator) on the fixed inputs, from every rank;
        ``advance(size)`` after each of this rank's batches."""
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        start, stop = shard(self.n, world, rank)
        local, _, _ = generate(StudentSampler(sample), pl_module, stop - start, self.batch_size,
                               self.noise_seed, self.label_probs(pl_module), offset=start,
                               advance=advance)  # fmt: skip
        return local if world == 1 else gather_shards(trainer, local, self.n)

    def measure(self, trainer, pl_module, sample=None) -> tuple[dict, torch.Tensor]:
        """The metrics of :meth:`samples` and their protocol (measured on rank 0, sent to every rank) and
        the samples. Rank 0's bar shows its share of the samples drawn, then the metrics being computed."""
        start, stop = shard(self.n, trainer.world_size, trainer.global_rank)
        with evaluation_bar(trainer, stop - start, pl_module.kimg) as bar:
            x = self.samples(pl_module, trainer, sample, advance=bar.update)
            figures = None
            if trainer.is_global_zero:
                bar.set_postfix_str(f"metrics of {self.n} samples")
                figures = self.metrics.evaluate(x, self.datamodule)
                figures[PROTOCOL] = protocol_text(self.metrics.protocol(self.datamodule))
        return trainer.strategy.broadcast(figures, src=0), x

    def evaluate(self, trainer, pl_module) -> dict:
        figures, x = self.measure(trainer, pl_module)
        spent = {"tfe": float(pl_module.tfe)} if isinstance(pl_module, DistillationMethod) else {}
        row = {"kimg": pl_module.kimg, "gen_step": int(pl_module.gen_steps), **spent, **figures}
        self.history.append(row)
        if trainer.is_global_zero:
            self.record(trainer, row, x[: self.grid_size])
        return row

    def record(self, trainer, row: dict, grid: torch.Tensor) -> None:
        """Send the row to every logger (and eval.csv), the grid to the image-capable ones and to disk."""
        declare_wandb_metrics(trainer, row, self._declared)
        scalars = {f"eval/{k}": v for k, v in row.items() if k not in (*AXES, PROTOCOL)}
        axes = {f"train/{k}": row[k] for k in AXES if k in row}
        for logger in trainer.loggers:
            logger.log_metrics(scalars | axes, step=row["gen_step"])
        if self.run_dir is None:
            return
        self.write_table()
        picture = save_samples_figure(grid, self.run_dir / "grids" / f"step_{row['gen_step']:07d}.png",
                                      title=f"kimg {row['kimg']:.2f}")  # fmt: skip
        log_grid(trainer, picture, axes)

    def write_table(self) -> None:
        with atomic_writer(self.run_dir / EVAL_FILE) as tmp:
            pd.DataFrame(self.history).to_csv(tmp, index=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.kimg >= self.next_kimg:
            self.evaluate(trainer, pl_module)
            while self.next_kimg <= pl_module.kimg:
                self.next_kimg += self.every_kimg

    def on_train_start(self, trainer, pl_module):
        declare_wandb_axes(trainer)
        if self.run_dir is not None:
            (self.run_dir / "grids").mkdir(parents=True, exist_ok=True)
        if not self.history:
            self.evaluate(trainer, pl_module)
            self.next_kimg = self.every_kimg
        elif self.run_dir is not None and trainer.is_global_zero:  # resumed: drop rows past the checkpoint
            self.write_table()

    def on_train_end(self, trainer, pl_module):
        if not self.history or self.history[-1]["gen_step"] != int(pl_module.gen_steps):
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict:  # the evaluation noise is checked on resume (distillbench.resume)
        return {"history": self.history, "next_kimg": self.next_kimg}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.next_kimg = list(state["history"]), float(state["next_kimg"])


def gather_shards(trainer, local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's share in rank order (shares are padded to equal size for the gather)."""
    world = trainer.world_size
    size = -(-n // world)
    padded = torch.cat([local, local.new_zeros(size - len(local), *local.shape[1:])])
    gathered = trainer.strategy.all_gather(padded)
    parts = [
        gathered[r][: stop - start]
        for r, (start, stop) in enumerate(shard(n, world, r) for r in range(world))
    ]
    return torch.cat(parts).cpu()


def wandb_runs(trainer):
    return [lg.experiment for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]


def declare_wandb_axes(trainer) -> None:
    """W&B: plot ``train/*`` and ``eval/*`` against kimg (``train/gen_step`` and ``train/tfe``, the compute
    spent, are logged beside it to choose as x-axis instead)."""
    for run in wandb_runs(trainer):
        for axis in AXES:
            run.define_metric(f"train/{axis}")
        run.define_metric("train/*", step_metric="train/kimg")
        run.define_metric("eval/*", step_metric="train/kimg")


def declare_wandb_metrics(trainer, row: dict, declared: set[str]) -> None:
    """Summarise each metric by its best value (FID by its minimum); W&B needs exact names for summaries.
    The row's protocol record goes into the run summary as ``eval/protocol``."""
    for run in wandb_runs(trainer):
        if PROTOCOL in row:
            run.summary[f"eval/{PROTOCOL}"] = json.loads(row[PROTOCOL])
        for name in row:
            kind = metric_kind(name)
            if "@" in name and kind in {"fid", "kid"} | HIGHER_IS_BETTER and name not in declared:
                summary = "max" if kind in HIGHER_IS_BETTER else "min"
                run.define_metric(f"eval/{name}", step_metric="train/kimg", summary=summary)
                declared.add(name)


def log_grid(trainer, picture: Path, axes: dict) -> None:
    """The evaluation's sample grid as an image in W&B (at the same kimg) and TensorBoard."""
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "WandbLogger":
            import wandb

            logger.experiment.log({"eval/samples": wandb.Image(str(picture), caption=picture.stem)} | axes)
        elif kind == "TensorBoardLogger":
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(picture).convert("RGB"))
            logger.experiment.add_image("eval/samples", image, axes["train/gen_step"], dataformats="HWC")
