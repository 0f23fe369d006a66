"""Loggers from config: CSV always (appending on resume); W&B offline without an API key, its run id kept
with the checkpoints."""

from __future__ import annotations

import csv
import importlib.util
import netrc
import os
import secrets
from pathlib import Path

import hydra
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig

from distillbench import run_folder
from distillbench.distributed import is_rank_zero
from distillbench.errors import MissingPackageError
from distillbench.utils.io import atomic_write_text, atomic_writer

WANDB_ID_FILE = run_folder.WANDB_ID


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept and appended to (Lightning's
    deletes it), its header read as the known columns."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """``metrics.csv`` that a resumed run continues (``train`` first cuts it back to its checkpoint)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def csv_files(loggers) -> list[Path]:
    """The ``metrics.csv`` of every CSV logger, after writing out what they hold."""
    files = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            logger.save()
            files.append(Path(logger.experiment.metrics_file_path))
    return files


def count_rows(path: Path) -> int:
    """Data rows of a CSV file (0 when it does not exist)."""
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def truncate_rows(path: Path, rows: int) -> None:
    """Keep the header and the first ``rows`` data rows of a CSV file (atomically)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        kept = list(csv.reader(f))[: rows + 1]
    with atomic_writer(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run folder: read from ``checkpoints/wandb_id.txt``, or made and saved there.

    A resumed run (same folder) thus continues the same W&B run.
    """
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if not is_rank_zero():  # W&B logs from rank 0 only; the other ranks never write the file
        return ""
    run_id = secrets.token_hex(4)
    atomic_write_text(path, run_id + "\n")
    return run_id


def wandb_kwargs(conf: DictConfig, run_dir: Path | None) -> dict | None:
    """Extra W&B arguments (offline without a key, the run id of the folder); None when W&B is disabled."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode == "disabled":
        return None
    kwargs = {} if run_dir is None else {"id": wandb_run_id(run_dir)}
    if mode != "online" and not wandb_has_credentials():
        kwargs["offline"] = True
        print(
            f"W&B: no API key, logging offline under {conf.save_dir}/wandb; "
            "upload later with `wandb sync <that folder>/offline-run-*`"
        )
    return kwargs


def check_tensorboard() -> None:
    if not any(importlib.util.find_spec(m) for m in ("tensorboardX", "tensorboard")):
        raise MissingPackageError(
            "logger=tensorboard needs tensorboardX (or tensorboard): pip install -e '.[tensorboard]'"
        )


def instantiate_loggers(logger_cfg: DictConfig | None, run_dir: str | Path | None = None) -> list:
    """Build every ``_target_`` logger in the group."""
    loggers = []
    for name, conf in (logger_cfg or {}).items():
        if conf is None or "_target_" not in conf:
            continue
        if conf._target_.endswith("TensorBoardLogger"):
            check_tensorboard()
        kwargs = wandb_kwargs(conf, None if run_dir is None else Path(run_dir)) if name == "wandb" else {}
        if kwargs is not None:
            logger = hydra.utils.instantiate(conf, **kwargs)
            init = getattr(logger, "_wandb_init", {})
            if init.get("anonymous", False) is None:
                # Lightning passes anonymous=None, which W&B answers with a warning nobody can act on
                del init["anonymous"]
            loggers.append(logger)
    return loggers
