"""Training runs loaded back: ``load_run(folder)`` rebuilds a trained student from its run folder.

A folder written by ``python -m distillbench.train`` holds the resolved ``config.yaml`` and
``checkpoints/last.ckpt`` (the method's weights; the frozen teacher is not in it). Loading rebuilds data,
teacher and method from the config, then loads the checkpoint into the method, on the CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from distillbench import run_folder
from distillbench.errors import ConfigError

CONFIG_FILE = run_folder.CONFIG
CHECKPOINT = Path(run_folder.CHECKPOINTS) / run_folder.LAST_CHECKPOINT


def locate_run(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) of a training run folder, or of a ``.ckpt`` file inside one.

    Raises :class:`ConfigError` naming the files looked for when either is missing.
    """
    path = Path(path)
    if path.suffix == ".ckpt":
        return _run_of_checkpoint(path), path
    if not path.is_dir():
        raise ConfigError(
            f"run={path}: no such run folder; give a training run folder (python -m distillbench.train), "
            "a .ckpt file inside one, or run=teacher"
        )
    missing = [str(p) for p in (path / CHECKPOINT, path / CONFIG_FILE) if not p.is_file()]
    if missing:
        raise ConfigError(
            f"run={path} is not a finished training run: {' and '.join(missing)} not found "
            f"(python -m distillbench.train writes {CHECKPOINT} and {CONFIG_FILE} into its run folder)"
        )
    return path, path / CHECKPOINT


def _run_of_checkpoint(checkpoint: Path) -> Path:
    """The run folder of ``<run>/checkpoints/x.ckpt`` or ``<run>/x.ckpt``: the one with ``config.yaml``."""
    if not checkpoint.is_file():
        raise ConfigError(f"run={checkpoint}: no such checkpoint file")
    configs = [checkpoint.parent / CONFIG_FILE, checkpoint.parent.parent / CONFIG_FILE]
    for config in configs:
        if config.is_file():
            return config.parent
    raise ConfigError(
        f"run={checkpoint}: the checkpoint needs its training run's config, looked for "
        f"{' and '.join(str(c) for c in configs)}"
    )


def run_config(run_dir: Path) -> DictConfig:
    """The run's resolved training config; it must describe a distillation method."""
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    missing = [key for key in ("data", "teacher", "method") if key not in cfg]
    if missing:
        raise ConfigError(f"{run_dir / CONFIG_FILE} is not a training run's config: it lacks {missing}")
    return cfg


#: counters that some checkpoints lack; they load as zero, with a warning
LATER_COUNTERS = ("batches_trained", "tfe", "train_seconds")


def with_later_counters(method: L.LightningModule, state: dict, checkpoint: Path) -> dict:
    """``state`` plus the fresh method's zero counters it predates, with a warning naming them."""
    fresh = method.state_dict()
    missing = [key for key in LATER_COUNTERS if key in fresh and key not in state]
    if missing:
        warnings.warn(f"{checkpoint} predates the counters {missing}; they read 0", stacklevel=2)
    return state | {key: fresh[key] for key in missing}


def load_run(path: str | Path) -> tuple[DictConfig, L.LightningModule, object]:
    """(config, method with the checkpoint's weights in eval mode, data module) of a training run.

    ``path`` is a run folder or a checkpoint inside one. Sample the student with
    ``method.sample(z, labels)`` (EMA weights).
    """
    run_dir, checkpoint = locate_run(path)
    cfg = run_config(run_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.arrays("train")  # missing data or packages fail here, first
    teacher = hydra.utils.instantiate(cfg.teacher, datamodule=datamodule)
    student = hydra.utils.instantiate(cfg.student) if cfg.get("student") else None
    method = hydra.utils.instantiate(cfg.method, teacher=teacher, student=student)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    method.load_state_dict(with_later_counters(method, state, checkpoint))
    return cfg, method.eval(), datamodule
