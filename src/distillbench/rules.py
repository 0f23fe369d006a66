"""Rules for settings, declared once and used by both the check before any work (``distillbench.validation``)
and the classes that own the settings (a method declares its keys' rules in ``settings``).

A rule returns None for a good value, else what the value must be ("must be a number > 0"); :func:`check`
turns that into a :class:`~distillbench.errors.ConfigError` naming the key as the user types it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from distillbench.errors import ConfigError

#: a rule returns None for a good value, else what the value must be ("must be a number > 0")
Rule = Callable[[Any], str | None]

ABSENT = object()  # a key that the config lacks


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


def positive_per_stage(value) -> str | None:
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


POSITIVE = number(gt=0)
OPTIONAL_POSITIVE = optional(POSITIVE)
SCHEDULE = {"schedule.rho": POSITIVE, "schedule.p": POSITIVE}  # a sampler's σ schedule (rho, improved's p)


def check(key: str, value, rule: Rule, why: str = "") -> None:
    """A :class:`~distillbench.errors.ConfigError` ``<key>=<value> <what it must be> (<why>)`` when ``value``
    breaks ``rule``. A config's lists and a constructor's tuples are checked as plain lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    value = list(value) if isinstance(value, tuple) else value
    want = rule(value)
    if want is not None:
        raise ConfigError(f"{key}={value!r} {want}{f' ({why})' if why else ''}")


def lookup(cfg: DictConfig, key: str):
    """The plain value at ``key`` (lists as lists), or ABSENT."""
    value = OmegaConf.select(cfg, key, default=ABSENT)
    is_node = isinstance(value, (DictConfig, ListConfig))
    return OmegaConf.to_container(value, resolve=True) if is_node else value
