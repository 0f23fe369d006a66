"""Distillation strategies. Score-based one-step methods share :class:`ScoreDistillation`; each adds only
its generator loss (``sim.py``, ``sid.py``, ``di.py``)."""

from distillbench.methods.base import ScoreDistillation
from distillbench.methods.di import DiffInstruct
from distillbench.methods.sid import SiD
from distillbench.methods.sim import SIM

__all__ = ["DiffInstruct", "SIM", "ScoreDistillation", "SiD"]
