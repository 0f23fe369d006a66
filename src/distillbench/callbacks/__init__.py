"""Lightning callbacks: periodic evaluation on fixed noise, per-stage evaluation and the kimg budget."""

from distillbench.callbacks.budget import KimgBudget
from distillbench.callbacks.evaluation import PeriodicEvaluation
from distillbench.callbacks.stages import StageEvaluation

__all__ = ["KimgBudget", "PeriodicEvaluation", "StageEvaluation"]
