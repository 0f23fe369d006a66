"""``python -m distillbench.train``: distil a teacher into a one-step generator (SIM by default, on digits).

Writes the output contract into its run folder: ``config.yaml``, ``metrics.csv`` (losses and the periodic
evaluation of the EMA generator against kimg), ``student.png`` beside ``teacher.png`` (same noise and
labels), ``curves.png``, ``checkpoints/last.ckpt``, ``samples.npz`` and ``summary.json``, then prints a table
of teacher versus one-step student.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from distillbench.callbacks import KimgBudget, PeriodicEvaluation, StageEvaluation
from distillbench.config import CONFIG_DIR
from distillbench.data.base import per_device_batch
from distillbench.data.noise import NoiseDataModule
from distillbench.data.trajectories import check_held_out
from distillbench.distributed import is_rank_zero, slurm_plugins
from distillbench.samplers.generate import generate
from distillbench.utils.images import save_samples_figure
from distillbench.utils.io import atomic_writer
from distillbench.utils.logging import instantiate_loggers
from distillbench.utils.plots import plot_curves
from distillbench.utils.runs import output_dir, task, write_config, write_summary
from distillbench.utils.tables import print_comparison


def build(cfg: DictConfig):
    """Instantiate everything, so that every bad-input check runs before any work."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.arrays("train")  # missing data or packages fail here, first
    if hasattr(datamodule, "manifest"):  # direct distillation's trajectory pairs
        check_held_out(datamodule.manifest, datamodule.root, cfg.eval.noise_seed)
    teacher = hydra.utils.instantiate(cfg.teacher, datamodule=datamodule)
    student = hydra.utils.instantiate(cfg.student) if cfg.get("student") else None
    method = hydra.utils.instantiate(cfg.method, teacher=teacher, student=student)
    if getattr(method, "trains_on_real_data", False):  # progressive/guided distillation
        datamodule.batch_size = cfg.distill.batch_size
        train_data = datamodule
    else:
        train_data = NoiseDataModule(like=datamodule, batch_size=cfg.distill.batch_size, seed=cfg.seed)
    metrics = hydra.utils.instantiate(cfg.metrics, n=cfg.eval.n)
    evaluation = PeriodicEvaluation(metrics, datamodule, cfg.eval.every_kimg, cfg.eval.n, cfg.eval.noise_seed,
                                    cfg.eval.batch_size, cfg.eval.grid_size, output_dir(cfg))  # fmt: skip
    if hasattr(method, "finished_stages"):  # staged methods stop themselves after their last stage
        callbacks = [evaluation, StageEvaluation(evaluation)]
    else:
        callbacks = [evaluation, KimgBudget(cfg.distill.duration_kimg)]
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks,
        logger=instantiate_loggers(cfg.get("logger"), output_dir(cfg)), max_steps=-1, max_epochs=-1,
        plugins=slurm_plugins() or None,
    )  # fmt: skip
    per_device_batch(cfg.distill.batch_size, trainer.world_size, key="distill.batch_size")
    return datamodule, teacher, method, train_data, metrics, evaluation, trainer


def throughput(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def evaluate_teacher(cfg, teacher, datamodule, metrics, method) -> tuple[dict, torch.Tensor]:
    """The teacher's sampler on the evaluation noise and labels: figures and a grid, cached on disk.

    The cache key is the teacher (config and training record), its sampler, the metric suite and what is
    measured (n, noise seed, grid size; not the evaluation cadence), so a sweep pays once.
    """
    groups = ("teacher", "teacher_sampler", "metrics")
    configs = [OmegaConf.to_container(cfg[k], resolve=True) for k in groups]
    measured = [cfg.eval.n, cfg.eval.noise_seed, cfg.eval.grid_size]
    parts = [*configs, measured, datamodule.name, getattr(teacher, "info", {})]
    key = json.dumps(parts, sort_keys=True, default=str)
    path = Path(cfg.paths.cache_dir) / "teacher_eval" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        return cached["figures"], cached["grid"]
    sampler = hydra.utils.instantiate(cfg.teacher_sampler)
    probs = datamodule.label_distribution if method.num_classes else None
    start = time.perf_counter()
    x, _, nfe = generate(sampler, teacher, cfg.eval.n, cfg.eval.batch_size, cfg.eval.noise_seed, probs)
    figures = {"nfe": nfe, "samples_per_second": cfg.eval.n / (time.perf_counter() - start)}
    figures |= metrics.evaluate(x, datamodule)
    grid = x[: cfg.eval.grid_size]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, binary=True) as tmp:
        torch.save({"figures": figures, "grid": grid}, tmp)
    return figures, grid


def train(cfg: DictConfig) -> dict:
    datamodule, teacher, method, train_data, metrics, evaluation, trainer = build(cfg)
    if is_rank_zero():
        write_config(cfg)
    out = output_dir(cfg)
    trainer.fit(method, datamodule=train_data)
    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")  # every rank: a collective under DDP
    if trainer.global_rank != 0:  # ranks started by Lightning's popen launcher or torchrun end here
        return {}

    student_x = evaluation.samples(method)
    z, labels = evaluation.fixed_inputs(method)
    rate = throughput(
        lambda: method.sample(z[:256], None if labels is None else labels[:256]), min(256, len(z))
    )
    nfe = getattr(method, "steps", 1)
    student = {"nfe": nfe, "samples_per_second": rate, **evaluation.history[-1]}
    np.savez(
        out / "samples.npz", x=student_x.numpy(), **({} if labels is None else {"labels": labels.numpy()})
    )
    save_samples_figure(student_x[: cfg.eval.grid_size], out / "student.png", title=f"{nfe}-step student")
    plot_curves(evaluation.history, out / "curves.png", title=f"{type(method).__name__} on {datamodule.name}")

    summary = {"method": type(method).__name__, "data": datamodule.name, "kimg": method.kimg,
               "gen_steps": int(method.gen_steps), "dropped_samples": int(method.dropped_samples),
               "nonfinite_grads": int(method.nonfinite_grads),
               "student": {k: v for k, v in student.items() if k not in ("kimg", "gen_step")}}  # fmt: skip
    stages = next((c.history for c in trainer.callbacks if isinstance(c, StageEvaluation)), None)
    if stages is not None:
        summary["stages"] = stages
    if cfg.eval.teacher:
        teacher_figures, grid = evaluate_teacher(cfg, teacher, datamodule, metrics, method)
        save_samples_figure(grid, out / "teacher.png", title=f"teacher, {teacher_figures['nfe']} NFE")
        summary["teacher"] = teacher_figures
    write_summary(cfg, summary)
    print_comparison(summary)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@task
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision("high")
    train(cfg)


if __name__ == "__main__":
    main()
