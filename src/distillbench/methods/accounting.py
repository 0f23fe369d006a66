"""Compute accounting: the one rule for the leaderboard's common currency (docs/algorithms.md §8).

A run counts its compute in forward passes of one sample through a *reference network*: a network's forward
counts 1, its backward 2, scaled by its parameter count over the reference's. The reference depends on the
teacher (:func:`compute_unit`):

- a network teacher is its own reference: the unit is the teacher-forward equivalent (**TFE**), as in the
  papers' "teacher calls"; the students, copies of the teacher, then count one unit per forward as well;
- an analytic teacher (an exact mixture denoiser) has no parameters to scale by, and its calls cost a small
  fraction of a network's. It names its reference, the student network the methods start from, and its own
  forward's measured cost in forwards of that network (``teacher.cost``, measured by
  ``python -m benchmarks.forward_cost``): the unit is the student-forward equivalent (**SFE**). Every trained
  or run network counts by its size over the student's, every teacher call at its measured cost, so a method
  that calls the teacher more pays what those calls cost, no more;
- an analytic teacher that names no cost (the 2-D toy mixture) counts every pass as 1.

The same count reads in the other unit by one factor per teacher, :attr:`ComputeUnit.tfe_per_unit`: with a
network teacher TFE and SFE coincide (the reference student is the teacher); with an analytic teacher the
count in TFE is the count in SFE over the teacher's forward cost. Tables show both (``leaderboard.py``).

A method states its passes per training sample (:meth:`ComputeAccounting.anatomy`); the accounting counts
what each step spends (the ``tfe`` buffer, in the run's unit, and its wall time ``train_seconds``), and
:meth:`ComputeAccounting.fit_budget` sets the method's duration from a budget in that unit (``budget_tfe``).
"""

from __future__ import annotations

import abc
import time
from typing import NamedTuple

import torch

from distillbench.teachers.denoiser import Denoiser


class ComputeUnit(NamedTuple):
    """What one unit of compute is: a forward of one sample through the reference network."""

    name: str  # "TFE" | "SFE"
    reference: str  # the reference network, in words
    reference_parameters: int  # 0: every network counts 1 per pass (an analytic teacher without a cost)
    teacher_forward: float  # one teacher forward of one sample, in units

    @property
    def tfe_per_unit(self) -> float:
        """Teacher-forward equivalents in one unit: 1 for TFE, 1 / (teacher's forward cost) for SFE."""
        return 1.0 / self.teacher_forward

    def describe(self) -> str:
        if self.name == "TFE":
            return ("teacher-forward equivalents (TFE: forward 1, backward 2, scaled by parameters over the "
                    "teacher's)")  # fmt: skip
        return (
            f"student-forward equivalents (SFE: forward 1, backward 2, scaled by parameters over the "
            f"{self.reference}'s; one teacher forward = {self.teacher_forward:.3g} SFE, measured)"
        )


def forward_equivalents(
    forwards: float, backwards: float, parameters: int, reference_parameters: int
) -> float:
    """Units of a network's passes on one sample: (forwards + 2·backwards) · P / P_reference (unscaled when
    there is no reference size: an analytic teacher without a stated cost)."""
    scale = parameters / reference_parameters if reference_parameters else 1.0
    return (forwards + 2 * backwards) * scale


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def compute_unit(teacher: Denoiser) -> ComputeUnit:
    """The unit of a run with ``teacher`` (the module docstring gives the rule)."""
    parameters = parameter_count(teacher)
    if parameters:
        return ComputeUnit("TFE", "teacher", parameters, 1.0)
    return unit_of_cost(getattr(teacher, "cost", None))


def unit_of_cost(cost) -> ComputeUnit:
    """The unit an analytic teacher's stated ``cost`` (its config's ``teacher.cost``) defines; TFE with every
    pass counted 1 when it states none."""
    if not cost:
        return ComputeUnit("TFE", "teacher", 0, 1.0)
    return ComputeUnit(
        "SFE", str(cost["reference"]), int(cost["reference_parameters"]), float(cost["forward"])
    )


def unit_of_config(teacher_cfg) -> ComputeUnit:
    """The unit of a run from its recorded teacher config, for tables of finished runs: SFE when the teacher
    states a cost, else TFE (network teachers, and the toy mixture)."""
    return unit_of_cost(teacher_cfg.get("cost") if hasattr(teacher_cfg, "get") else None)


@torch.no_grad()
def measure_forward_cost(teacher: Denoiser, reference: torch.nn.Module, batch_size: int = 64,
                         repeats: int = 20, labels: bool = True) -> dict:  # fmt: skip
    """The teacher's forward in forwards of ``reference`` on the same batch (median wall time of ``repeats``
    timed calls each, after one warm-up, in eval mode): what :func:`compute_unit` charges per teacher call."""
    shape = tuple(teacher.sample_shape)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *shape, generator=generator)
    sigma = torch.exp(torch.randn(batch_size, generator=generator) * 1.2 - 1.2)  # EDM's training σ
    y = torch.randint(0, max(1, teacher.num_classes), (batch_size,), generator=generator) if labels else None
    reference.eval()

    def median_seconds(net) -> float:
        net(x, sigma, y)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            net(x, sigma, y)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    teacher_s, reference_s = median_seconds(teacher), median_seconds(reference)
    return {
        "forward": teacher_s / reference_s,
        "teacher_seconds": teacher_s,
        "reference_seconds": reference_s,
        "batch_size": batch_size,
        "repeats": repeats,
        "reference_parameters": parameter_count(reference),
    }


class ComputeAccounting(abc.ABC):
    """The accounting half of a method's contract; the method holds the ``tfe`` and ``train_seconds``
    buffers (so they go into checkpoints) and its frozen teacher (``_teacher[0]``)."""

    _teacher: list[Denoiser]
    tfe: torch.Tensor
    train_seconds: torch.Tensor

    def init_accounting(self) -> None:
        self.register_buffer("tfe", torch.zeros((), dtype=torch.float64))  # in the run's unit
        self.register_buffer("train_seconds", torch.zeros((), dtype=torch.float64))  # in training steps
        self._parameter_counts: dict[int, int] = {}
        self._step_start = time.perf_counter()

    @abc.abstractmethod
    def anatomy(self) -> list[tuple[torch.nn.Module, int, int]]:
        """(network, forward passes, backward passes) per training sample of the current step."""

    @abc.abstractmethod
    def fit_budget(self, tfe: float) -> float:
        """Set the method's duration so that training spends ``tfe`` (in the run's unit); returns that
        duration in kimg."""

    @property
    def compute_unit(self) -> ComputeUnit:
        """The run's unit, fixed by the original teacher (a progressive stage's teacher is a student)."""
        if not hasattr(self, "_unit"):
            self._unit = compute_unit(self._teacher[0])
        return self._unit

    def parameters_of(self, module: torch.nn.Module) -> int:
        key = id(module)
        if key not in self._parameter_counts:
            self._parameter_counts[key] = parameter_count(module)
        return self._parameter_counts[key]

    def cost_of(self, anatomy) -> float:
        """Units of one sample through ``anatomy``'s passes: the analytic teacher's at its measured cost,
        every network's by its size over the reference's."""
        unit = self.compute_unit
        total = 0.0
        for net, forwards, backwards in anatomy:
            if net is self._teacher[0] and unit.name == "SFE":
                total += (forwards + 2 * backwards) * unit.teacher_forward
            else:
                total += forward_equivalents(forwards, backwards, self.parameters_of(net),
                                             unit.reference_parameters)  # fmt: skip
        return total

    def tfe_per_sample(self) -> float:
        """Units of one training sample of the current step (:meth:`anatomy`)."""
        return self.cost_of(self.anatomy())

    def spend(self, samples: int) -> None:
        """Count a step of ``samples`` (the global batch) at the current step's cost, and its wall time (from
        the batch's start: evaluations and checkpoints, which run after it, are not counted)."""
        self.tfe += samples * self.tfe_per_sample()
        self.train_seconds += time.perf_counter() - self._step_start

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()
