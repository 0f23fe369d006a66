"""Continue a killed or finished run in its own folder, as if it had never stopped.

``python -m distillbench.train resume=<run folder>`` (or ``resume=true`` with ``hydra.run.dir=<run folder>``,
or in a ``-m`` sweep with ``hydra.sweep.dir=<sweep folder>``):

- the run's own ``config.yaml`` is used; only the settings in :data:`CHANGEABLE_ON_RESUME` may be given
  again with other values (e.g. a longer ``method.duration_kimg``), anything else is an error;
- the newest good checkpoint is picked (a broken newest one is an error unless ``checkpoint.fallback=true``);
- ``metrics.csv`` is cut back to the rows it had at that checkpoint (the rows after it are made again),
  the W&B run id is restored, and the teacher must be the one the run was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from distillbench import run_folder
from distillbench.callbacks.checkpoints import KEY
from distillbench.errors import ConfigError
from distillbench.sweeps import EVAL_FILE
from distillbench.utils.checkpoints import newest_good_checkpoint
from distillbench.utils.io import atomic_write_text
from distillbench.utils.logging import WANDB_ID_FILE, truncate_rows

#: settings a resumed run may change (a key or a group of keys)
CHANGEABLE_ON_RESUME = ("resume", "threads", "method.duration_kimg", "max_bad_steps", "checkpoint",
                        "eval.every_kimg", "eval.teacher", "method.lr", "method.fake_lr", "trainer.devices",
                        "trainer.num_nodes", "logger")  # fmt: skip


def run_folder_to_resume(cfg: DictConfig) -> Path:
    """The folder named by ``resume`` (a path), or this job's folder (``resume=true``)."""
    folder = Path(cfg.paths.output_dir)
    if not (folder / run_folder.CONFIG).is_file():
        raise ConfigError(
            f"resume={cfg.resume}: {folder} is not a run folder (no config.yaml); pass resume=<run folder>, "
            "e.g. resume=outputs/train/runs/<date_time>"
        )
    return folder


def changeable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in CHANGEABLE_ON_RESUME)


def plain(cfg: DictConfig, key: str):
    """The resolved value (or group) at ``key``, as plain Python."""
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def saved_config(folder: Path) -> DictConfig:
    """The run's resolved ``config.yaml``, its paths moved to ``folder`` (a run folder may be moved)."""
    text = (folder / run_folder.CONFIG).read_text()
    old = OmegaConf.create(text).paths.output_dir
    return OmegaConf.create(text.replace(str(old), str(folder)))


def resumed_config(cfg: DictConfig) -> DictConfig:
    """The run's saved config with the command line's changeable settings applied (the others may be given
    again, with their saved values)."""
    folder = run_folder_to_resume(cfg)
    saved = saved_config(folder)
    given = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    fixed = [key for key in given if not changeable(key) and plain(cfg, key) != plain(saved, key)]
    if fixed:
        raise ConfigError(
            f"resume continues the run as {folder / 'config.yaml'} configures it; {', '.join(fixed)} cannot "
            "change on resume (give them their saved values or leave them out; these can: "
            f"{', '.join(CHANGEABLE_ON_RESUME)}). Start a new run instead"
        )
    references = interpolations(folder)
    for key in given:
        value = OmegaConf.select(cfg, key)
        OmegaConf.update(saved, key, value, merge=False)
        for derived in references.get(key, []):  # config.yaml is resolved: ``${lr}`` reads as a value
            OmegaConf.update(saved, derived, value, merge=False)
    return saved


def interpolations(folder: Path) -> dict[str, list[str]]:
    """Key → the keys that the run's composed config (Hydra's unresolved record) sets to exactly ``${key}``,
    such as ``lr`` → ``[method.lr, method.fake_lr]`` in a config that interpolates one learning rate."""
    record = folder / ".hydra" / "config.yaml"
    found: dict[str, list[str]] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for name, child in node.items():
                walk(child, f"{path}.{name}" if path else str(name))
        elif isinstance(node, str) and node.startswith("${") and node.endswith("}") and node.count("$") == 1:
            found.setdefault(node[2:-1], []).append(path)

    if record.is_file():
        walk(OmegaConf.to_container(OmegaConf.load(record), resolve=False), "")
    return found


def checkpoint_to_resume(cfg: DictConfig) -> tuple[Path, dict]:
    """The newest good checkpoint of the run and its contents."""
    folder = Path(cfg.paths.output_dir) / run_folder.CHECKPOINTS
    return newest_good_checkpoint(folder, bool(cfg.checkpoint.fallback))


def check_same_run(checkpoint: dict, run: dict) -> None:
    """The facts a resumed run must share with its checkpoint (the teacher, the evaluation noise)."""
    saved = checkpoint.get(KEY, {})
    for key, value in run.items():
        if key in saved and json.dumps(saved[key], sort_keys=True, default=str) != json.dumps(
            value, sort_keys=True, default=str
        ):
            raise ConfigError(
                f"the run was trained with {key}={saved[key]!r} but now has {value!r}; resume with the "
                "run's own, or start a new run"
            )


def restore_run_files(folder: Path, checkpoint: dict) -> None:
    """Cut ``metrics.csv`` back to the checkpoint's rows and put back a lost W&B run id. Without a
    checkpoint the run starts again: its tables and its W&B run id (W&B refuses steps that go back) go."""
    saved = checkpoint.get(KEY, {})
    if not checkpoint:
        for name in (run_folder.METRICS, EVAL_FILE, WANDB_ID_FILE):
            (folder / name).unlink(missing_ok=True)
        return
    if saved.get("csv_rows") is not None:
        truncate_rows(folder / run_folder.METRICS, int(saved["csv_rows"]))
    wandb_id = folder / WANDB_ID_FILE
    if saved.get("wandb_id") and not wandb_id.is_file():
        atomic_write_text(wandb_id, saved["wandb_id"] + "\n")
