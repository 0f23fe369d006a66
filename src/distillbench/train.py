"""``python -m distillbench.train``: distil a teacher into a one-step generator (SIM by default, on digits).

Writes the output contract into its run folder: ``config.yaml``, ``metrics.csv`` (losses and the periodic
evaluation of the EMA generator against kimg), ``student.png`` beside ``teacher.png`` (same noise and
labels), ``curves.png``, ``checkpoints/step_<generator step>.ckpt`` with ``checkpoints/last.ckpt``,
``samples.npz`` and ``summary.json`` (with the metric suite's protocol record), then prints a table of
teacher versus one-step student.
``resume=<run folder>`` continues a killed (or finished) run there (:mod:`distillbench.resume`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import NamedTuple

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from distillbench import run_folder
from distillbench.callbacks import (
    BestCheckpoint,
    KimgBudget,
    KimgProgressBar,
    NonFiniteGuard,
    PeriodicEvaluation,
    RunCheckpoints,
    StageEvaluation,
)
from distillbench.config import CONFIG_DIR, resumed
from distillbench.data.base import per_device_batch
from distillbench.data.noise import NoiseDataModule
from distillbench.data.trajectories import check_held_out, teacher_forwards
from distillbench.distributed import is_rank_zero, slurm_plugins
from distillbench.errors import ConfigError
from distillbench.metrics.suite import PROTOCOL
from distillbench.resume import check_same_run, checkpoint_to_resume, restore_run_files, resumed_config
from distillbench.samplers.generate import generate
from distillbench.sweeps import AXES
from distillbench.teachers.checkpoint import check_teacher_fits
from distillbench.utils.checkpoints import AtomicCheckpointIO, checkpoint_files, remove_orphans
from distillbench.utils.command import check_writable, cli, output_dir, task, write_config, write_summary
from distillbench.utils.images import save_samples_figure
from distillbench.utils.io import atomic_writer
from distillbench.utils.logging import instantiate_loggers
from distillbench.utils.plots import plot_curves
from distillbench.utils.tables import print_comparison
from distillbench.validation import validate_train_config


def run_facts(cfg: DictConfig, teacher) -> dict:
    """What a resumed run must share with its checkpoints: the teacher (by reference: its class and training
    record, not its path, so a moved checkout still resumes) and the evaluation noise."""
    reference = {"target": cfg.teacher._target_, "info": getattr(teacher, "info", {})}
    return {"teacher": reference, "eval.noise_seed": int(cfg.eval.noise_seed)}


def plan_budget(cfg: DictConfig, method, datamodule) -> None:
    """``budget_tfe``: what making the data cost (direct's trajectories) is spent first; the method's duration
    is set to spend the rest, and ``eval.curve_points`` evaluations are spread over it."""
    calls = teacher_forwards(datamodule.manifest) if hasattr(datamodule, "manifest") else 0.0
    data_tfe = calls * method.compute_unit.teacher_forward  # teacher calls in the run's unit
    if data_tfe >= cfg.budget_tfe:
        raise ConfigError(
            f"making the trajectories cost {data_tfe:.4g} compute units ({calls:.4g} teacher forwards), more "
            f"than budget_tfe="
            f"{cfg.budget_tfe}; raise budget_tfe or make fewer trajectories"
        )
    kimg = method.fit_budget(cfg.budget_tfe - data_tfe)
    method.tfe.fill_(data_tfe)  # a resumed run's count comes from its checkpoint
    with open_dict(cfg):
        if not method.staged:  # the run's config records the duration it trains for
            cfg.method.duration_kimg = kimg
        if cfg.eval.get("curve_points"):
            cfg.eval.every_kimg = kimg / cfg.eval.curve_points


class Run(NamedTuple):
    datamodule: object
    teacher: object
    method: object
    train_data: object
    metrics: object
    evaluation: PeriodicEvaluation
    trainer: object
    ckpt_path: str | None  # the checkpoint a resumed run continues from


def build(cfg: DictConfig) -> Run:
    """Instantiate everything, so that every bad-input check runs before any work."""
    validate_train_config(cfg)
    check_writable(output_dir(cfg))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.arrays("train")  # missing data or packages fail here, first
    if hasattr(datamodule, "manifest"):  # direct distillation's trajectory pairs
        check_held_out(datamodule.manifest, datamodule.root, cfg.eval.noise_seed)
    teacher = hydra.utils.instantiate(cfg.teacher, datamodule=datamodule)
    check_teacher_fits(teacher, datamodule)
    student = hydra.utils.instantiate(cfg.student) if cfg.get("student") else None
    method = hydra.utils.instantiate(cfg.method, teacher=teacher, student=student)
    if cfg.get("budget_tfe") is not None:
        plan_budget(cfg, method, datamodule)
    if method.trains_on_real_data:
        datamodule.batch_size = method.batch_size
        train_data = datamodule
    else:
        train_data = NoiseDataModule(like=datamodule, batch_size=method.batch_size, seed=cfg.seed)
    metrics = hydra.utils.instantiate(cfg.metrics, n=cfg.eval.n)
    evaluation = PeriodicEvaluation(metrics, datamodule, cfg.eval.every_kimg, cfg.eval.n, cfg.eval.noise_seed,
                                    cfg.eval.batch_size, cfg.eval.grid_size, output_dir(cfg))  # fmt: skip
    callbacks = [evaluation]
    if cfg.checkpoint.best is not None:  # after the evaluation, whose rows it reads
        callbacks.append(
            BestCheckpoint(output_dir(cfg) / run_folder.CHECKPOINTS, evaluation, cfg.checkpoint.best)
        )
    if method.staged:  # it stops itself after its last stage
        callbacks.append(StageEvaluation(evaluation))
    else:
        callbacks.append(KimgBudget(method.planned_kimg()))
    ckpt_path = resume_point(cfg, teacher)  # before the loggers: it may restore the W&B run id
    guard = NonFiniteGuard(cfg.max_bad_steps, output_dir(cfg) / run_folder.CHECKPOINTS)
    checkpoints = RunCheckpoints(output_dir(cfg) / run_folder.CHECKPOINTS, cfg.checkpoint.every_kimg,
                                 cfg.checkpoint.keep, run_facts(cfg, teacher), guard)  # fmt: skip
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(KimgProgressBar(method.planned_kimg()))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[*callbacks, guard, checkpoints],
        logger=instantiate_loggers(cfg.get("logger"), output_dir(cfg)), max_steps=-1, max_epochs=-1,
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
    )  # fmt: skip
    per_device_batch(method.batch_size, trainer.world_size, key="method.batch_size")
    return Run(datamodule, teacher, method, train_data, metrics, evaluation, trainer, ckpt_path)


def resume_point(cfg: DictConfig, teacher) -> str | None:
    """On resume: the checkpoint to continue from, after checking it belongs to this run and cutting the
    run's files back to it; None for a new run, and for a run killed before its first checkpoint, which
    starts again from the beginning in its own folder."""
    if not resumed(cfg.resume):
        return None
    folder = output_dir(cfg)
    if is_rank_zero():
        remove_orphans(folder / run_folder.CHECKPOINTS)
        remove_orphans(folder)
    if not checkpoint_files(folder / run_folder.CHECKPOINTS):
        if is_rank_zero():
            restore_run_files(folder, {})
        print(f"resuming {folder}: it has no checkpoint yet, so it starts again from the beginning")
        return None
    path, checkpoint = checkpoint_to_resume(cfg)
    check_same_run(checkpoint, run_facts(cfg, teacher))
    if is_rank_zero():
        restore_run_files(folder, checkpoint)
    print(f"resuming from {path} (generator step {int(checkpoint['state_dict']['gen_steps'])})")
    return str(path)


def throughput(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def evaluate_teacher(cfg, teacher, datamodule, metrics, method) -> tuple[dict, torch.Tensor]:
    """The teacher's sampler on the evaluation noise and labels: figures and a grid, cached on disk.

    The cache key is the teacher (config and training record), its sampler, the metric suite and its
    protocol record, and what is measured (n, noise seed, grid size; not the evaluation cadence), so a
    sweep pays once.
    """
    groups = ("teacher", "teacher_sampler", "metrics")
    configs = [OmegaConf.to_container(cfg[k], resolve=True) for k in groups]
    measured = [cfg.eval.n, cfg.eval.noise_seed, cfg.eval.grid_size]
    parts = [*configs, measured, datamodule.name, getattr(teacher, "info", {}), metrics.protocol(datamodule)]
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
    cfg = resumed_config(cfg) if resumed(cfg.resume) else cfg
    datamodule, teacher, method, train_data, metrics, evaluation, trainer, ckpt_path = build(cfg)
    if is_rank_zero():  # on resume: the saved config with the settings changed for the rest of the run
        write_config(cfg)
    out = output_dir(cfg)
    trainer.fit(method, datamodule=train_data, ckpt_path=ckpt_path)
    if trainer.global_rank != 0:  # ranks started by Lightning's popen launcher or torchrun end here
        return {}

    student_x = evaluation.samples(method)
    z, labels = evaluation.fixed_inputs(method)
    rate = throughput(
        lambda: method.sample(z[:256], None if labels is None else labels[:256]), min(256, len(z))
    )
    nfe = method.nfe
    student = {"nfe": nfe, "samples_per_second": rate, **evaluation.history[-1]}
    arrays = {"x": student_x.numpy()} | ({} if labels is None else {"labels": labels.numpy()})
    np.savez(out / run_folder.SAMPLES, **arrays)
    save_samples_figure(student_x[: cfg.eval.grid_size], out / "student.png", title=f"{nfe}-step student")
    plot_curves(evaluation.history, out / "curves.png", title=f"{type(method).__name__} on {datamodule.name}")

    summary = {"method": type(method).__name__, "data": datamodule.name, "kimg": method.kimg,
               "evaluated_with": method.evaluated_with,
               "gen_steps": int(method.gen_steps), "tfe": float(method.tfe),
               "train_seconds": float(method.train_seconds), "dropped_samples": int(method.dropped_samples),
               "nonfinite_grads": int(method.nonfinite_grads),
               "student": {k: v for k, v in student.items() if k not in (*AXES, PROTOCOL)},
               PROTOCOL: metrics.protocol(datamodule)}  # fmt: skip
    stages = next((c.history for c in trainer.callbacks if isinstance(c, StageEvaluation)), None)
    if stages is not None:
        summary["stages"] = stages
    # the figures above are the final weights' (last.ckpt); the best evaluation's weights are best.ckpt
    summary["figures_from"] = f"{run_folder.CHECKPOINTS}/{run_folder.LAST_CHECKPOINT}"
    best = next((c.best for c in trainer.callbacks if isinstance(c, BestCheckpoint)), None)
    if best is not None:
        summary["best"] = best
    if cfg.eval.teacher:
        teacher_figures, grid = evaluate_teacher(cfg, teacher, datamodule, metrics, method)
        save_samples_figure(grid, out / "teacher.png", title=f"teacher, {teacher_figures['nfe']} NFE")
        summary["teacher"] = teacher_figures
    write_summary(cfg, summary)
    print_comparison(summary)
    return summary


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@task
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision("high")
    train(cfg)


if __name__ == "__main__":
    main()
