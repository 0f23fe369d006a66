"""The output contract shared by every command: resolved config, summary, clean failures."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distillbench import run_folder
from distillbench.config import resumed
from distillbench.distributed import distributed_state_reset, is_rank_zero
from distillbench.errors import ConfigError, TrainingStopped
from distillbench.utils.io import atomic_write_json, atomic_write_text

RUN_MARKER, RUN_FILES = run_folder.MARKER, run_folder.RUN_FILES


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def write_config(cfg: DictConfig) -> None:
    """Save the resolved config as ``config.yaml`` in the run folder."""
    atomic_write_text(output_dir(cfg) / run_folder.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


def write_summary(cfg: DictConfig, summary: dict) -> None:
    """``summary.json``: the run's final figures; written last, so it marks a finished run."""
    atomic_write_json(output_dir(cfg) / run_folder.SUMMARY, summary)


def _remove_unfinished(folder: Path) -> None:
    """Delete a run folder that holds nothing but Hydra's own bookkeeping."""
    own = {".hydra", run_folder.CONFIG, RUN_MARKER} | {p.name for p in folder.glob("*.log")}
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
        _TASKS_STARTED.append(1)
        try:
            with distributed_state_reset():  # the next job of a sweep starts without this one's ranks
                return fn(cfg)
        except TrainingStopped as err:  # on purpose, with the run folder and its checkpoints kept
            print(f"error: {err}", file=sys.stderr)
            sys.exit(3)
        except Exception as err:
            cause = config_error_in(err)
            full = disk_full_in(err)
            if cause is None and full is None:
                raise
            if full is not None:  # the run's files up to the failed write stay as they were
                print(f"error: {out_of_space_message(full, folder)}", file=sys.stderr)
                sys.exit(3)
            if resumed(cfg.get("resume")):
                _undo_refused_resume(folder)
            _remove_unfinished(folder)
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)
        finally:
            _finish_wandb()
            if folder.is_dir():
                print(f"run folder: {folder}")

    return wrapper


def _undo_refused_resume(folder: Path) -> None:
    """Take back what Hydra wrote for a resume that was then refused: its record under ``.hydra`` and a job
    log that it created empty; the run's own files are untouched."""
    if HydraConfig.initialized() and HydraConfig.get().output_subdir:
        record = folder / str(HydraConfig.get().output_subdir)
        if record.name.startswith("resume-"):
            shutil.rmtree(record, ignore_errors=True)
        log = folder / f"{HydraConfig.get().job.name}.log"
        if log.is_file() and log.stat().st_size == 0 and log.stat().st_ctime >= _IMPORTED_AT:
            log.unlink()


def out_of_space_message(err: OSError, folder: Path) -> str:
    """What a full disk stopped, where, how much space is free and how much a checkpoint needs."""
    where = Path(err.filename).parent if getattr(err, "filename", None) else folder
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    sizes = [p.stat().st_size for p in (folder / run_folder.CHECKPOINTS).glob("step_*.ckpt")]
    need = f"about {max(sizes) / 2**20:.1f} MiB for the next checkpoint" if sizes else "room for a checkpoint"
    return (
        f"the disk holding {where} is full ({free}; {err.strerror or err}). The run stopped; its files up to "
        f"the failed write and its newest whole checkpoint are intact. Free space there ({need}), then "
        f"continue with resume={folder}"
    )


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


# ---- run folders -------------------------------------------------------------------------------------------
def run_files_in(folder: Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``folder``."""
    return [name for name in RUN_FILES if (folder / name).exists()]


def requeued(folder: Path) -> bool:
    """A SLURM job requeued into its own folder, where Lightning continues from its HPC checkpoint."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 or any(folder.glob("hpc_ckpt_*.ckpt"))


def occupied_message(folder: Path, found: list[str]) -> str:
    return (
        f"{folder} already holds a run ({', '.join(found)}); a new run never writes into another's folder. "
        f"Continue that run with resume={folder}, or start a new one in its own folder: leave out "
        "hydra.run.dir (every run gets a new one) or pass hydra.run.dir=<a new folder>"
    )


def claim_run_folder(folder: str | Path) -> None:
    """Make ``folder`` this run's: refuse one that holds a run, check that it can be written, and create
    :data:`RUN_MARKER` exclusively, so that of two runs started into one folder at once only one proceeds."""
    folder = Path(folder)
    found = run_files_in(folder)
    if found:
        raise ConfigError(occupied_message(folder, found))
    check_writable(folder, key="hydra.run.dir")
    facts = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        fd = os.open(folder / RUN_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise ConfigError(occupied_message(folder, [RUN_MARKER])) from None
    with os.fdopen(fd, "w") as f:
        json.dump(facts, f)


def check_writable(path: str | Path, key: str = "paths.output_dir") -> None:
    """Create ``path`` if needed and write and remove a file in it; a :class:`ConfigError` if that fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_check_")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ConfigError(
            f"{key}={str(path)!r} must be a writable folder ({err.strerror or err}); pass "
            "hydra.run.dir=<a writable folder> (hydra.sweep.dir=... under -m)"
        ) from None


def exit_on_config_error(fn):
    """Print a :class:`ConfigError` raised by ``fn`` and exit with status 2 (for Hydra callbacks, which run
    outside the task and its handler)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


class ClaimRunFolder(Callback):
    """Hydra callback: before Hydra writes into a run folder, refuse one that holds another run, and one that
    cannot be written. A resumed run continues in its own folder (``resume``); a SLURM job requeued into its
    folder, and the ranks other than 0 of a launch (they share rank 0's folder), pass. Under ``-m`` the sweep
    folder is checked once, before any job."""

    @exit_on_config_error
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(config.hydra.run.dir)
        if resumed(config.get("resume")) or not is_rank_zero() or requeued(folder):
            return
        claim_run_folder(folder)

    @exit_on_config_error
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(config.hydra.sweep.dir)
        if not resumed(config.get("resume")) and folder.is_dir():
            for job in sorted(p for p in folder.iterdir() if p.is_dir()):
                found = run_files_in(job)
                if found:
                    raise ConfigError(
                        f"{folder} already holds a sweep ({job.name}/: {', '.join(found)}); continue it "
                        f"with resume=true hydra.sweep.dir={folder}, or leave out hydra.sweep.dir to start a "
                        "new sweep in a new folder"
                    )
        check_writable(folder, key="hydra.sweep.dir")


# ---- entry points ------------------------------------------------------------------------------------------
def unparsable_override() -> str | None:
    """The first command-line argument that Hydra's override grammar rejects."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            try:
                parser.parse_overrides([arg])
            except HydraException:
                return arg
    return None


def composition_hint(err: BaseException) -> str:
    """What to do about a Hydra composition error, where the message alone does not say."""
    text = str(err)
    if isinstance(err, OverrideParseException):
        bad = unparsable_override()
        return f"\n(the override {bad!r} does not parse; quote values with brackets or spaces)" if bad else ""
    if "Could not find 'teacher/" in text and "teacher: ${data}" not in text:
        data = text.split("Could not find 'teacher/", 1)[1].split("'", 1)[0]
        return (
            f"\n(the teacher follows data=: no teacher is shipped for data={data}; name one with "
            "teacher=<an option above>, or take an experiment that brings its own; for CIFAR-10: "
            "python -m distillbench.train experiment=paper/cifar10_sid)"
        )
    if "is not in struct" in text or "Could not override" in text:
        return "\n(a key that the config lacks is added with +key=value; check its spelling first)"
    return ""


def cli(main):
    """A ``@hydra.main`` entry point whose composition errors (an unknown option of a group, a key not in
    the config, an override that does not parse) print as ``error: …`` and exit with status 2, like every
    other bad input; errors raised by the task itself pass through unchanged."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        previous = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing and exiting with 1
        started = len(_TASKS_STARTED)
        try:
            return main(*args, **kwargs)
        except (HydraException, OmegaConfBaseException) as err:
            if len(_TASKS_STARTED) > started:  # raised inside a task: a real failure, not the command line
                raise
            message = str(err).split("\nConfig search path:", 1)[0].rstrip()  # Hydra's internals, not the fix
            print(f"error: {message}{composition_hint(err)}", file=sys.stderr)
            sys.exit(2)
        finally:
            if previous is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = previous

    return wrapper


_IMPORTED_AT = time.time()  # before Hydra makes any file of this process's job
_TASKS_STARTED: list[int] = []  # one entry per task started in this process (see cli)


def disk_full_in(err: BaseException) -> OSError | None:
    """The ENOSPC (or EDQUOT) error behind ``err``, however deep in its chain, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None
