"""Lightning callbacks: periodic evaluation on fixed noise, per-stage evaluation, the kimg budget, the
non-finite guard, the run's checkpoints, the kimg progress bar and a batch timer."""

from distillbench.callbacks.budget import KimgBudget
from distillbench.callbacks.checkpoints import BestCheckpoint, RunCheckpoints
from distillbench.callbacks.evaluation import PeriodicEvaluation
from distillbench.callbacks.nonfinite import NonFiniteGuard
from distillbench.callbacks.progress import KimgProgressBar
from distillbench.callbacks.stages import StageEvaluation
from distillbench.callbacks.timer import BatchTimer

__all__ = [
    "BatchTimer",
    "KimgBudget",
    "KimgProgressBar",
    "NonFiniteGuard",
    "PeriodicEvaluation",
    "BestCheckpoint",
    "RunCheckpoints",
    "StageEvaluation",
]
