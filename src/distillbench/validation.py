"""Config validation before any work: every setting's type and range, the batch over the processes and the
output folder (the teacher against the data: :func:`distillbench.teachers.checkpoint.check_teacher_fits`).

:func:`validate_train_config` walks a table of key → rule over the composed ``train`` config (keys that
the config lacks are skipped), then the checks that tie keys together. The first bad value raises a
:class:`~distillbench.errors.ConfigError` of the form ``<key>=<value> must be <rule> (<why>)``, e.g.
``optim.lr=-1 must be a number > 0``. The methods' own runtime checks stay; these mirror them up front.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from distillbench.errors import ConfigError

#: a rule returns None for a good value, else what the value must be ("must be a number > 0")
Rule = Callable[[Any], str | None]

ABSENT = object()  # a key that the config lacks


# ---- rules -------------------------------------------------------------------------------------------------
def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def bounds_text(gt=None, ge=None, lt=None, le=None) -> str:
    """``> 0``, ``>= 1``, ``in (0, 1]`` ... for the given bounds ('' for none)."""
    low = f"({gt}" if gt is not None else f"[{ge}" if ge is not None else None
    high = f"{lt})" if lt is not None else f"{le}]" if le is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" > {gt}" if gt is not None else f" >= {ge}"
    if high:
        return f" < {lt}" if lt is not None else f" <= {le}"
    return ""


def number(gt=None, ge=None, lt=None, le=None, integer: bool = False) -> Rule:
    """A finite number (an int when ``integer``; never a bool) within the given bounds."""
    want = f"must be {'an integer' if integer else 'a number'}{bounds_text(gt, ge, lt, le)}"

    def rule(value):
        ok = is_number(value) and (isinstance(value, int) or not integer)
        ok = ok and (gt is None or value > gt) and (ge is None or value >= ge)
        ok = ok and (lt is None or value < lt) and (le is None or value <= le)
        return None if ok else want

    return rule


def integer(**bounds) -> Rule:
    return number(integer=True, **bounds)


def one_of(*choices) -> Rule:
    """One of ``choices``, of the same type (so that True is not 1 and 16.0 is not 16)."""

    def rule(value):
        ok = any(type(value) is type(c) and value == c for c in choices)
        return None if ok else f"is not one of {list(choices)}"

    return rule


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""
    return lambda value: None if value is None or rule(value) is None else f"{rule(value)}, or null"


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def flag_or_path(value) -> str | None:
    ok = isinstance(value, bool) or (isinstance(value, str) and value.strip() != "")
    return None if ok else "must be true, false or a run folder path"


def betas(value) -> str | None:
    in_range = number(ge=0, lt=1)
    ok = isinstance(value, list) and len(value) == 2 and all(in_range(b) is None for b in value)
    return None if ok else "must be two numbers [beta1, beta2], each in [0, 1)"


def per_stage(value) -> str | None:
    positive = number(gt=0)
    values = value if isinstance(value, list) else [value]
    ok = len(values) > 0 and all(positive(v) is None for v in values)
    return None if ok else "must be a number > 0 or a list of them (one per stage)"


def power_of_two(value) -> str | None:
    ok = integer(ge=1)(value) is None and value & (value - 1) == 0
    return None if ok else "must be a power of two >= 1 (1, 2, 4, …, 64, …), so that it halves down to 1 step"


def devices(value) -> str | None:
    index = integer(ge=0)
    ok = (
        one_of("auto", -1)(value) is None
        or integer(ge=1)(value) is None
        or (isinstance(value, list) and len(value) > 0 and all(index(d) is None for d in value))
    )
    return None if ok else "must be an integer >= 1, -1 (all), 'auto' or a non-empty list of device indices"


# ---- the table ---------------------------------------------------------------------------------------------
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
#: Lightning 2's precision flags (lightning.fabric.plugins.precision.precision._PRECISION_INPUT*)
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16", "64-true",
              "64", "transformer-engine", "transformer-engine-float16", 16, 32, 64)  # fmt: skip
POSITIVE = number(gt=0)
OPTIONAL_POSITIVE = optional(POSITIVE)
SCHEDULE = {"schedule.rho": POSITIVE, "schedule.p": POSITIVE}  # a sampler's σ schedule (rho, improved's p)

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
    "distill.batch_size": integer(ge=1),
    "distill.sigma_init": POSITIVE,
    "distill.fake_updates": integer(ge=1),
    "distill.duration_kimg": POSITIVE,
    "distill.ema_halflife_kimg": number(ge=0),
    "distill.ema_rampup_ratio": optional(number(ge=0)),
    "distill.loss_scaling": POSITIVE,
    "distill.loss_scaling_g": POSITIVE,
    "distill.t_max": number(gt=0, le=1),
    "optim.lr": POSITIVE,
    "optim.fake_lr": OPTIONAL_POSITIVE,
    "optim.betas": betas,
    "optim.eps": POSITIVE,
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

PROGRESSIVE: dict[str, Rule] = {
    "n_start": power_of_two,
    "stage_kimg": optional(per_stage),
    "stage_steps": optional(per_stage),
    "lr": per_stage,
    "lr_schedule": one_of("linear", "constant"),
    "betas": betas,
    "eps": POSITIVE,
    "grad_clip": OPTIONAL_POSITIVE,
    "weighting": one_of("snr_trunc", "v"),
    **SCHEDULE,
}
#: rules of each method's own keys (under ``method.``), by the class name that its ``_target_`` ends in
METHODS: dict[str, dict[str, Rule]] = {
    "SIM": {
        "distance": one_of("pseudo_huber", "l2"),
        "c": OPTIONAL_POSITIVE,
        "weighting": one_of("sid", "unit"),
        "time_law": one_of("p_sim", "p_edm"),
        "detach_normaliser": boolean,
    },
    "SiD": {"alpha": number(ge=0, le=2)},
    "DiffInstruct": {},
    "ProgressiveDistillation": PROGRESSIVE,
    "GuidedDistillation": {
        **PROGRESSIVE,
        "w": number(ge=0),
        "w_min": number(ge=0),
        "w_max": number(ge=0),
        "guidance_kimg": optional(per_stage),
        "guidance_steps": optional(per_stage),
        "guidance_lr": OPTIONAL_POSITIVE,
    },
    "DirectDistillation": {
        "steps": integer(ge=2),
        "k": integer(ge=1),
        "iterations": integer(ge=1),
        "refine_iterations": integer(ge=0),
        "l1_fraction": number(ge=0, le=1),
        "lr": POSITIVE,
        "betas": betas,
        "eps": POSITIVE,
        "eta_min": number(ge=0),
        "grad_clip": OPTIONAL_POSITIVE,
        "preconditioning": boolean,
        **SCHEDULE,
    },
}


# ---- checking ----------------------------------------------------------------------------------------------
def lookup(cfg: DictConfig, key: str):
    """The plain value at ``key`` (lists as lists), or ABSENT."""
    value = OmegaConf.select(cfg, key, default=ABSENT)
    is_node = isinstance(value, (DictConfig, ListConfig))
    return OmegaConf.to_container(value, resolve=True) if is_node else value


def check(key: str, value, rule: Rule, why: str = "") -> None:
    want = rule(value)
    if want is not None:
        raise ConfigError(f"{key}={value!r} {want}{f' ({why})' if why else ''}")


def method_name(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "method._target_", default="")).rsplit(".", 1)[-1]


def validate_train_config(cfg: DictConfig) -> None:
    """Raise a :class:`ConfigError` on the first bad setting of a composed ``train`` config."""
    name = method_name(cfg)
    own = {f"method.{key}": rule for key, rule in METHODS.get(name, {}).items()}
    validate_settings(cfg, {**SETTINGS, **own})
    check_batch_divides(cfg)
    if lookup(cfg, "eval.curve_points") not in (None, ABSENT) and lookup(cfg, "budget_tfe") in (None, ABSENT):
        raise ConfigError(
            "eval.curve_points spreads evaluations over budget_tfe: set budget_tfe too, or use "
            "eval.every_kimg"
        )
    for cross_check in CROSS_CHECKS.get(name, ()):
        cross_check(cfg.method)


def check_batch_divides(cfg: DictConfig) -> None:
    """``distill.batch_size`` divides over trainer.devices × trainer.num_nodes processes (when known)."""
    batch, count = lookup(cfg, "distill.batch_size"), lookup(cfg, "trainer.devices")
    count = len(count) if isinstance(count, list) else count
    if batch is ABSENT or not (isinstance(count, int) and count >= 1):
        return  # no batch, or devices 'auto' / -1: the trainer counts them (per_device_batch checks then)
    nodes = lookup(cfg, "trainer.num_nodes")
    nodes = 1 if nodes is ABSENT else nodes
    processes = count * nodes
    if batch % processes:
        multiple = math.ceil(batch / processes) * processes
        raise ConfigError(
            f"distill.batch_size={batch} is not divisible by the {processes} processes (trainer.devices: "
            f"{count} × trainer.num_nodes: {nodes}); choose a multiple of {processes}, e.g. {multiple}"
        )


# ---- the checks that tie a method's keys together (after every key passed its own rule) --------------------
def check_one_budget(m: DictConfig, prefix: str, stages: int) -> str:
    """Exactly one of ``<prefix>_kimg`` and ``<prefix>_steps`` is set, one entry per stage; its unit."""
    kimg, steps = m.get(f"{prefix}_kimg"), m.get(f"{prefix}_steps")
    if (kimg is None) == (steps is None):
        raise ConfigError(
            f"method.{prefix}_kimg={kimg} and method.{prefix}_steps={steps}: set exactly one of them (the "
            "other null)"
        )
    unit = "kimg" if kimg is not None else "steps"
    check_stage_count(f"method.{prefix}_{unit}", lookup(m, f"{prefix}_{unit}"), stages)
    return unit


def check_stage_count(key: str, value, stages: int) -> None:
    if isinstance(value, list) and len(value) != stages:
        raise ConfigError(f"{key}={value} has {len(value)} entries but must have {stages}, one per stage")


def check_progressive(m: DictConfig) -> str:
    """The stage budgets and learning rates; the budgets' unit."""
    stages = m.n_start.bit_length()  # n_start, n_start/2, …, 1 student steps
    unit = check_one_budget(m, "stage", stages)
    check_stage_count("method.lr", lookup(m, "lr"), stages)
    return unit


def check_guided(m: DictConfig) -> None:
    unit = check_progressive(m)
    check("method.w_min", m.w_min, number(ge=0, le=m.w_max), "0 <= w_min <= w_max")
    check("method.w", m.w, number(ge=m.w_min, le=m.w_max), "method.w_min <= w <= method.w_max")
    guidance_unit = check_one_budget(m, "guidance", 1)
    if guidance_unit != unit:
        key = f"method.guidance_{guidance_unit}"
        raise ConfigError(
            f"{key}={lookup(m, f'guidance_{guidance_unit}')!r} is in {guidance_unit} but the stage budgets "
            f"in {unit}; give method.guidance_{unit} instead (and {key}=null)"
        )


def check_direct(m: DictConfig) -> None:
    check("method.k", m.k, integer(ge=1, le=m.steps - 1), "1 <= k <= method.steps - 1")
    check("method.eta_min", m.eta_min, number(ge=0, lt=m.lr), "0 <= eta_min < method.lr")
    if (m.get("refiner") is None) != (m.refine_iterations == 0):
        refiner = (
            "null" if m.get("refiner") is None else m.refiner.get("_target_", "<a net>").rsplit(".", 1)[-1]
        )
        raise ConfigError(
            f"method.refine_iterations={m.refine_iterations} with method.refiner={refiner}: stage two needs "
            "both a refiner net and its iterations; set both, or method.refiner=null and "
            "method.refine_iterations=0"
        )


CROSS_CHECKS: dict[str, tuple[Callable[[DictConfig], None], ...]] = {
    "ProgressiveDistillation": (check_progressive,),
    "GuidedDistillation": (check_guided,),
    "DirectDistillation": (check_direct,),
}


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

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            self.validate(config)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
