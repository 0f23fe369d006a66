"""Lightning callbacks: periodic evaluation on fixed noise and the kimg budget."""

from distillbench.callbacks.budget import KimgBudget
from distillbench.callbacks.evaluation import PeriodicEvaluation

__all__ = ["KimgBudget", "PeriodicEvaluation"]
