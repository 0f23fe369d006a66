"""Compute accounting in teacher-forward equivalents (TFE), the leaderboard's common currency
(docs/algorithms.md §8): each network's forward pass of one sample is 1, its backward 2, scaled by its
parameter count over the teacher's. A method states its passes per training sample (:meth:`anatomy`); the
accounting counts what each step spends (``tfe``, and its wall time ``train_seconds``), and
:meth:`fit_budget` sets the method's duration from a TFE budget.
"""

from __future__ import annotations

import abc
import time

import torch

from distillbench.teachers.denoiser import Denoiser


def forward_equivalents(forwards: float, backwards: float, parameters: int, teacher_parameters: int) -> float:
    """Teacher-forward equivalents of a network's passes on one sample: (forwards + 2·backwards) · P / P_φ.
    A teacher without parameters (the analytic toy2d mixture) counts every network at its size."""
    scale = parameters / teacher_parameters if teacher_parameters else 1.0
    return (forwards + 2 * backwards) * scale


class ComputeAccounting(abc.ABC):
    """The accounting half of a method's contract; the method holds the ``tfe`` and ``train_seconds``
    buffers (so they go into checkpoints) and its frozen ``teacher``."""

    teacher: Denoiser
    tfe: torch.Tensor
    train_seconds: torch.Tensor

    def init_accounting(self) -> None:
        self.register_buffer("tfe", torch.zeros((), dtype=torch.float64))
        self.register_buffer("train_seconds", torch.zeros((), dtype=torch.float64))  # in training steps
        self._parameter_counts: dict[int, int] = {}
        self._step_start = time.perf_counter()

    @abc.abstractmethod
    def anatomy(self) -> list[tuple[torch.nn.Module, int, int]]:
        """(network, forward passes, backward passes) per training sample of the current step."""

    @abc.abstractmethod
    def fit_budget(self, tfe: float) -> float:
        """Set the method's duration so that training spends ``tfe``; returns that duration in kimg."""

    def parameters_of(self, module: torch.nn.Module) -> int:
        key = id(module)
        if key not in self._parameter_counts:
            self._parameter_counts[key] = sum(p.numel() for p in module.parameters())
        return self._parameter_counts[key]

    def cost_of(self, anatomy) -> float:
        """Teacher-forward equivalents of one sample through ``anatomy``'s passes."""
        teacher = self.parameters_of(self.teacher)
        return sum(forward_equivalents(f, b, self.parameters_of(net), teacher) for net, f, b in anatomy)

    def tfe_per_sample(self) -> float:
        """Teacher-forward equivalents of one training sample of the current step (:meth:`anatomy`)."""
        return self.cost_of(self.anatomy())

    def spend(self, samples: int) -> None:
        """Count a step of ``samples`` (the global batch) at the current step's cost, and its wall time (from
        the batch's start: evaluations and checkpoints, which run after it, are not counted)."""
        self.tfe += samples * self.tfe_per_sample()
        self.train_seconds += time.perf_counter() - self._step_start

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()
