"""Hydra/OmegaConf plumbing shared by every entry point."""

from __future__ import annotations

import os
import secrets
from datetime import datetime
from functools import cache
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
CONFIG_DIR = str(PACKAGE_DIR / "conf")  # the repository's conf/, through the link src/distillbench/conf


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_group(experiment: str | None, task_name: str) -> str:
    """W&B group: the experiment (or task) name, plus the sweep folder's name when in a ``-m`` sweep."""
    base = experiment or task_name
    return f"{base}/{Path(HydraConfig.get().sweep.dir).name}" if in_sweep() else base


def swept_keys() -> set[str]:
    """Keys the running sweep varies: sweeps on its command line (``method=sim,sid``) and sweeper params."""
    hc = HydraConfig.get()
    sweep_cfg = OmegaConf.load(Path(hc.sweep.dir) / "multirun.yaml")  # written by Hydra before any job
    parsed = OverridesParser.create().parse_overrides(list(sweep_cfg.hydra.overrides.task))
    params = OmegaConf.select(sweep_cfg, "hydra.sweeper.params") or {}
    return {o.get_key_element() for o in parsed if o.is_sweep_override()} | set(params)


def run_name() -> str | None:
    """W&B run name: the job's swept settings in a sweep (``method=sid,method.lr=1e-5``); else W&B's own."""
    if not in_sweep():
        return None
    keys = swept_keys()
    own = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") in keys]
    return ",".join(own) or None


@cache
def started() -> str:
    """When this process first asked: Hydra resolves the names built from it more than once (when it makes a
    folder, and again when a task reads its config), and every resolution must give the same name."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}"


@cache
def run_id() -> str:
    """This process's run-folder name: its start time to the second and six random hex digits, so that two
    runs started in the same second never share a folder."""
    return f"{started()}_{secrets.token_hex(3)}"


def launch_id(default: str) -> str:
    """A run folder's name that every rank agrees on: the launch's id when a launcher started the ranks
    (torchrun: ``TORCHELASTIC_RUN_ID``; a multi-task SLURM step: job and step id, also after a requeue),
    else ``default`` (:func:`run_id`). Plain torchrun without ``--standalone`` or ``--rdzv-id`` has the id
    ``none``: its ranks on one node share their parent, the torchrun agent, whose process id names the
    folder (a multi-node launch of that kind needs ``hydra.run.dir``)."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID")
    if launch == "none":
        return f"torchrun-{datetime.now():%Y-%m-%d}-{os.getppid()}"
    if launch is not None:
        return f"torchrun-{launch}"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', 0)}"
    return default


def resumed(resume) -> bool:
    return resume not in (False, None, "false", "False")


def resume_dir(resume, default: str) -> str:
    """The job folder: the run folder that ``resume=<folder>`` names, else ``default``."""
    return default if isinstance(resume, bool) or not resumed(resume) or resume == "true" else str(resume)


def hydra_subdir(resume) -> str:
    """Where Hydra keeps a job's composed config: ``.hydra``, or a new ``.hydra/resume-<time>`` on resume (the
    run's original record stays)."""
    return f".hydra/resume-{started()}" if resumed(resume) else ".hydra"


def register_resolvers() -> None:
    """``${distillbench.assets:}`` → the shipped assets; ``run_group``/``run_name`` for W&B; ``run_id`` and
    ``launch_id`` for folder names;
    ``resume_dir`` and ``hydra_subdir`` for ``resume``."""
    resolvers = {
        "distillbench.assets": lambda: str(ASSETS_DIR),
        "distillbench.run_group": run_group,
        "distillbench.run_name": run_name,
        "distillbench.launch_id": launch_id,
        "distillbench.run_id": run_id,
        "distillbench.resume_dir": resume_dir,
        "distillbench.hydra_subdir": hydra_subdir,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


#: how a recorded config names the package's assets folder (shipped teachers, classifiers)
ASSETS_MARK = "<assets>"


def relocatable(node, assets_dir: str | Path | None):
    """``node`` (plain containers) with every path inside ``assets_dir`` written from ``<assets>``, so that a
    record made in one checkout matches the same record made in a moved or reinstalled one (``node`` itself
    without an ``assets_dir``)."""
    if assets_dir is None:
        return node
    assets = str(assets_dir)
    if isinstance(node, dict):
        return {key: relocatable(value, assets) for key, value in node.items()}
    if isinstance(node, list):
        return [relocatable(value, assets) for value in node]
    if isinstance(node, str) and node.startswith(assets):
        return ASSETS_MARK + node[len(assets) :]
    return node
