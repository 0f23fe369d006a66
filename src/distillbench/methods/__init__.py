"""Distillation strategies. Score-based one-step methods share :class:`ScoreDistillation`; each adds only
its generator loss (``sim.py``, ``sid.py``, ``di.py``), or also its fake-score loss and step (``dmd2.py``,
``sida.py``, with an adversarial term on the fake network's bottleneck). Progressive (and guided)
distillation train a few-step student on real data (``progressive.py``, ``guided.py``). Direct distillation
trains a NAFNet on teacher trajectories (``direct.py``). The consistency methods, consistency distillation
(``cd.py``) and ECT (``ect.py``), train a few-step student on real data over :class:`ConsistencyMethod`
(``consistency.py``)."""

from distillbench.methods.base import DistillationMethod
from distillbench.methods.cd import ConsistencyDistillation
from distillbench.methods.consistency import ConsistencyMethod
from distillbench.methods.di import DiffInstruct
from distillbench.methods.direct import DirectDistillation
from distillbench.methods.dmd2 import DMD2
from distillbench.methods.ect import ECT
from distillbench.methods.guided import GuidedDistillation
from distillbench.methods.progressive import ProgressiveDistillation
from distillbench.methods.score import ScoreDistillation
from distillbench.methods.sid import SiD
from distillbench.methods.sida import SiDA
from distillbench.methods.sim import SIM

__all__ = [
    "ConsistencyDistillation",
    "ConsistencyMethod",
    "DMD2",
    "DistillationMethod",
    "DiffInstruct",
    "DirectDistillation",
    "ECT",
    "GuidedDistillation",
    "ProgressiveDistillation",
    "SIM",
    "ScoreDistillation",
    "SiD",
    "SiDA",
]
