"""Checks of a method's constructor arguments that its configuration cannot express alone: each raises a
:class:`~distillbench.errors.ConfigError` naming the key and what it must be."""

from __future__ import annotations

from distillbench.errors import ConfigError
from distillbench.teachers.denoiser import Denoiser


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value} must be > 0")


def choice(key: str, value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}")
    return value


def check_grad_clip(grad_clip: float | None) -> None:
    if grad_clip is not None and not grad_clip > 0:
        raise ConfigError(f"method.grad_clip={grad_clip} must be > 0, or null for no clipping")


def check_same_shape(student: Denoiser, teacher: Denoiser) -> None:
    if tuple(student.sample_shape) != tuple(teacher.sample_shape):
        raise ConfigError(
            f"the student makes samples of shape {tuple(student.sample_shape)} but the teacher "
            f"{tuple(teacher.sample_shape)}; pick a student= that matches the data"
        )


def starting_network(teacher: Denoiser, student: Denoiser | None) -> Denoiser:
    """The network the trained copies start from: ``student``, else the teacher, which must have weights."""
    init = student if student is not None else teacher
    check_same_shape(init, teacher)
    if not any(p.numel() for p in init.parameters()):
        raise ConfigError(
            f"the teacher {getattr(teacher, 'name', type(teacher).__name__)!r} has no weights to start the "
            "trained networks from; give a student config (e.g. student=gmm_digits, student=toy2d)"
        )
    return init
