"""Config validation before any work: every setting's type and range, the batch over the processes and the
output folder (the teacher against the data: :func:`distillbench.teachers.checkpoint.check_teacher_fits`).

:func:`validate_train_config` walks the shared keys' table below and the rules that the method's class
declares for its own keys (``settings``, rules from :mod:`distillbench.rules`) over the composed ``train``
config (keys that the config lacks are skipped), then the method's checks that tie keys together
(``check_config``). The first bad value raises a :class:`~distillbench.errors.ConfigError` of the form
``<key>=<value> must be <rule> (<why>)``, e.g. ``method.lr=-1 must be a number > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distillbench.errors import ConfigError
from distillbench.rules import (
    ABSENT,
    OPTIONAL_POSITIVE,
    POSITIVE,
    SCHEDULE,
    Rule,
    boolean,
    check,
    devices,
    flag_or_path,
    integer,
    lookup,
    one_of,
    optional,
)
from distillbench.utils.command import exit_on_config_error

# ---- the table ---------------------------------------------------------------------------------------------
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
#: Lightning 2's precision flags (lightning.fabric.plugins.precision.precision._PRECISION_INPUT*)
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16", "64-true",
              "64", "transformer-engine", "transformer-engine-float16", 16, 32, 64)  # fmt: skip

#: the settings every command has
COMMON: dict[str, Rule] = {"seed": integer(ge=0, le=2**32 - 1), "threads": optional(integer(ge=1))}

SETTINGS: dict[str, Rule] = {
    **COMMON,
    "max_bad_steps": integer(ge=1),
    "budget_tfe": OPTIONAL_POSITIVE,
    "resume": flag_or_path,
    "checkpoint.every_kimg": POSITIVE,
    "checkpoint.keep": integer(ge=1),
    "checkpoint.fallback": boolean,
    "checkpoint.best": optional(one_of("fid", "kid", "is", "precision", "recall")),
    "eval.every_kimg": POSITIVE,
    "eval.curve_points": optional(integer(ge=1)),
    "eval.n": integer(ge=2),
    "eval.noise_seed": integer(ge=0),
    "eval.batch_size": integer(ge=1),
    "eval.grid_size": integer(ge=0),
    "eval.teacher": boolean,
    "trainer.accelerator": one_of(*ACCELERATORS),
    "trainer.devices": devices,
    "trainer.num_nodes": integer(ge=1),
    "trainer.precision": one_of(*PRECISIONS),
    "trainer.log_every_n_steps": integer(ge=1),
    "trainer.compile": boolean,
    "trainer.channels_last": boolean,
    "teacher_sampler.steps": integer(ge=1),
    **{f"teacher_sampler.{key}": rule for key, rule in SCHEDULE.items()},
}


# ---- checking ----------------------------------------------------------------------------------------------
def method_class(cfg: DictConfig):
    """The method class that ``method._target_`` names (None without one)."""
    target = OmegaConf.select(cfg, "method._target_", default=None)
    if target is None:
        return None
    try:
        return hydra.utils.get_class(str(target))
    except Exception as err:
        raise ConfigError(
            f"method._target_={target!r} cannot be imported ({err}); choose a method=<name> of conf/method"
        ) from None


def validate_train_config(cfg: DictConfig) -> None:
    """Raise a :class:`ConfigError` on the first bad setting of a composed ``train`` config: the shared keys
    of this module's table, then the method's own keys by the rules its class declares
    (:meth:`~distillbench.methods.DistillationMethod.method_settings`)."""
    method = method_class(cfg)
    own = {f"method.{key}": rule for key, rule in method.method_settings().items()} if method else {}
    validate_settings(cfg, {**SETTINGS, **own})
    check_batch_divides(cfg)
    if lookup(cfg, "eval.curve_points") not in (None, ABSENT) and lookup(cfg, "budget_tfe") in (None, ABSENT):
        raise ConfigError(
            "eval.curve_points spreads evaluations over budget_tfe: set budget_tfe too, or use "
            "eval.every_kimg"
        )
    if method is not None:
        method.check_config(cfg.method)


def check_batch_divides(cfg: DictConfig) -> None:
    """``method.batch_size`` divides over trainer.devices × trainer.num_nodes processes (when known)."""
    batch, count = lookup(cfg, "method.batch_size"), lookup(cfg, "trainer.devices")
    count = len(count) if isinstance(count, list) else count
    if batch is ABSENT or not (isinstance(count, int) and count >= 1):
        return  # no batch, or devices 'auto' / -1: the trainer counts them (per_device_batch checks then)
    nodes = lookup(cfg, "trainer.num_nodes")
    nodes = 1 if nodes is ABSENT else nodes
    processes = count * nodes
    if batch % processes:
        multiple = math.ceil(batch / processes) * processes
        raise ConfigError(
            f"method.batch_size={batch} is not divisible by the {processes} processes (trainer.devices: "
            f"{count} × trainer.num_nodes: {nodes}); choose a multiple of {processes}, e.g. {multiple}"
        )


#: the settings of ``python -m distillbench.sample``
SAMPLE_SETTINGS: dict[str, Rule] = {
    **COMMON,
    "n": integer(ge=1),
    "batch_size": integer(ge=1),
    "noise_seed": integer(ge=0),
    "grid_size": integer(ge=0),
    "evaluate": boolean,
    "sampler.steps": integer(ge=1),
    **{f"sampler.{key}": rule for key, rule in SCHEDULE.items()},
}


def validate_settings(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    """Raise a :class:`ConfigError` on the first of ``cfg``'s keys that breaks its rule (absent keys pass)."""
    for key, rule in rules.items():
        value = lookup(cfg, key)
        if value is not ABSENT:
            check(key, value, rule)


def validate_sample_config(cfg: DictConfig) -> None:
    """Raise a :class:`ConfigError` on the first bad setting of a composed ``sample`` config."""
    validate_settings(cfg, SAMPLE_SETTINGS)
    if cfg.get("evaluate") and cfg.get("metrics") and cfg.n < 2:
        raise ConfigError(f"n={cfg.n} must be >= 2 to measure the samples (or pass evaluate=false)")


VALIDATORS: dict[str, Callable[[DictConfig], None]] = {
    "train": validate_train_config,
    "sample": validate_sample_config,
}


class ValidateOnStart(Callback):
    """Hydra callback: validate a command's config before Hydra makes the run folder (a single run; the jobs
    of a sweep are validated as they start, and leave no folder behind)."""

    def __init__(self, command: str = "train"):
        self.validate = VALIDATORS[command]

    @exit_on_config_error
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.validate(config)
