"""The output contract shared by every command: resolved config, summary, clean failures."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from distillbench.distributed import distributed_state_reset
from distillbench.errors import ConfigError, TrainingStopped
from distillbench.utils.io import atomic_write_json, atomic_write_text


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def write_config(cfg: DictConfig) -> None:
    """Save the resolved config as ``config.yaml`` in the run folder."""
    atomic_write_text(output_dir(cfg) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def write_summary(cfg: DictConfig, summary: dict) -> None:
    """``summary.json``: the run's final figures; written last, so it marks a finished run."""
    atomic_write_json(output_dir(cfg) / "summary.json", summary)


def _remove_unfinished(folder: Path) -> None:
    """Delete a run folder that holds nothing but Hydra's own bookkeeping."""
    own = {".hydra", "config.yaml"} | {p.name for p in folder.glob("*.log")}
    if folder.is_dir() and all(p.name in own for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def task(fn):
    """Wrap a Hydra task: seed, threads, clean exits (``ConfigError``: 2, ``TrainingStopped``: 3),
    ``wandb.finish()``, folder print."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        quiet_known_warnings()
        torch.set_num_threads(int(cfg.get("threads") or os.cpu_count() or 1))
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        folder = output_dir(cfg)
        try:
            with distributed_state_reset():  # the next job of a sweep starts without this one's ranks
                return fn(cfg)
        except TrainingStopped as err:  # on purpose, with the run folder and its checkpoints kept
            print(f"error: {err}", file=sys.stderr)
            sys.exit(3)
        except Exception as err:
            cause = config_error_in(err)
            if cause is None:
                raise
            _remove_unfinished(folder)
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)
        finally:
            _finish_wandb()
            if folder.is_dir():
                print(f"run folder: {folder}")

    return wrapper


def require_at_least_one(cfg: DictConfig, keys) -> None:
    """A :class:`ConfigError` naming the first of ``keys`` whose setting is below 1."""
    for key in keys:
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")


def config_error_in(err: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` behind ``err`` (Hydra wraps errors raised while instantiating), if any."""
    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__
    return None


def quiet_known_warnings() -> None:
    """Silence Lightning notices that are expected here (frozen EMA/teacher modules, no epochs, tips)."""
    for message in [
        ".*module\\(s\\) in eval mode.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
        ".*max_epochs.* was not set.*",
        ".*does not have many workers.*",
        ".*weights_only.*",
    ]:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def _finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def hydra_choice(group: str) -> str | None:
    """The chosen option of a config group in the running Hydra job (None outside Hydra)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def resolve_device(name: str) -> torch.device:
    """A command's ``device`` setting: ``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
