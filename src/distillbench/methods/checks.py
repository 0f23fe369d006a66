"""Checks of a method's starting network that no setting's rule can express (they need the built networks):
each raises a :class:`~distillbench.errors.ConfigError` naming what to change."""

from __future__ import annotations

from distillbench.errors import ConfigError
from distillbench.teachers.denoiser import Denoiser


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
