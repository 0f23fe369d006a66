"""Lightning callbacks: periodic evaluation on fixed noise, per-stage evaluation, the kimg budget, the
non-finite guard and the run's checkpoints."""

from distillbench.callbacks.budget import KimgBudget
from distillbench.callbacks.checkpoints import RunCheckpoints
from distillbench.callbacks.evaluation import PeriodicEvaluation
from distillbench.callbacks.nonfinite import NonFiniteGuard
from distillbench.callbacks.stages import StageEvaluation

__all__ = ["KimgBudget", "NonFiniteGuard", "PeriodicEvaluation", "RunCheckpoints", "StageEvaluation"]
