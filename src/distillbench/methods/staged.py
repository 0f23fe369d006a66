"""Methods trained in stages that finish themselves (progressive halving; direct distillation's two
networks)."""

from __future__ import annotations

import abc
import math

import torch

from distillbench.methods.base import DistillationMethod
from distillbench.teachers.denoiser import Denoiser


class StagedDistillation(DistillationMethod):
    """A method trained in stages, each with its own budget (progressive halving; direct's two networks).

    A subclass sets its stages' budgets with :meth:`set_budgets` (one per stage, in ``iterations`` or
    ``kimg``; with ``duration_kimg`` they are scaled together to it) and :attr:`nfe` (its sampler's NFE at the
    current stage). A spent budget appends (``stage``, ``steps``,
    ``kimg``, ``gen_step``) to :attr:`finished_stages` for :class:`~distillbench.callbacks.StageEvaluation`,
    then :meth:`start_next_stage` runs, or after the last stage the trainer stops.
    """

    budget_unit: str = "iterations"
    staged = True

    def __init__(
        self, teacher: Denoiser, seed: int = 0, batch_size: int = 64, duration_kimg: float | None = None
    ):
        super().__init__(teacher, seed, batch_size, duration_kimg)
        self.budgets: list[float] = []
        for name in ("stage", "stage_step"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.register_buffer("stage_nimg", torch.zeros((), dtype=torch.float64))

    def set_budgets(self, unit: str, budgets: list[float]) -> None:
        """The stages' budgets in ``unit`` (``iterations``, i.e. optimiser steps, or ``kimg``), scaled
        together to ``duration_kimg`` when it is set (in whole iterations of every stage, at least one)."""
        self.budget_unit, self.budgets = unit, list(budgets)
        if self.duration_kimg is not None:
            self.scale_budgets(lambda stage: 1.0, self.duration_kimg * 1000)

    def planned_kimg(self) -> float:
        return sum(self.budgets) if self.budget_unit == "kimg" else sum(self.budgets) * self.batch_size / 1000

    @property
    def done(self) -> bool:
        return self.count("stage") >= len(self.budgets)

    @property
    def current_stage(self) -> int:
        return min(self.count("stage"), len(self.budgets) - 1)

    def stage_progress(self) -> float:
        """The fraction of the current stage's budget spent."""
        spent = self.count("stage_nimg") / 1000 if self.budget_unit == "kimg" else self.count("stage_step")
        return spent / self.budgets[self.current_stage]

    def stopped(self) -> bool:
        """True (and the trainer told to stop) once every stage is done."""
        if self.done:
            self.trainer.should_stop = True
        return self.done

    def advance(self, images: int) -> None:
        """Count the step and, once the stage's budget is spent, finish the stage."""
        self.spend(images)
        for name, amount in (("gen_steps", 1), ("stage_step", 1), ("nimg", images), ("stage_nimg", images)):
            self.advance_count(name, amount)
        if self.stage_progress() >= 1.0:
            self.finish_stage()

    def finish_stage(self) -> None:
        record = {"stage": self.current_stage, "steps": self.nfe, "kimg": self.kimg,
                  "gen_step": self.count("gen_steps"), "tfe": float(self.tfe)}  # fmt: skip
        self.finished_stages.append(record)
        self.advance_count("stage", 1)
        self.stage_step.zero_()
        self.stage_nimg.zero_()
        if not self.stopped():
            self.start_next_stage()

    def start_next_stage(self) -> None:
        """What changes between stages (nothing here)."""

    @abc.abstractmethod
    def stage_anatomy(self, stage: int) -> list[tuple[torch.nn.Module, int, int]]:
        """:meth:`anatomy` of stage ``stage``."""

    def anatomy(self) -> list[tuple[torch.nn.Module, int, int]]:
        return self.stage_anatomy(self.current_stage)

    def scale_budgets(self, cost, total: float) -> float:
        """Scale every stage's budget by one factor so that the stages together spend at most ``total``, a
        stage's training sample costing ``cost(stage)``, in whole steps (at least one a stage); their kimg."""
        batch = self.batch_size
        samples_per_unit = 1000 if self.budget_unit == "kimg" else batch
        planned = sum(b * samples_per_unit * cost(stage) for stage, b in enumerate(self.budgets))
        steps = [max(1, math.floor(b * total / planned * samples_per_unit / batch)) for b in self.budgets]
        self.budgets = steps if self.budget_unit == "iterations" else [n * batch / 1000 for n in steps]
        return sum(steps) * batch / 1000

    def fit_budget(self, tfe: float) -> float:
        """Scale the stages' budgets together so that they spend ``tfe`` (at most)."""
        return self.scale_budgets(lambda stage: self.cost_of(self.stage_anatomy(stage)), tfe)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["finished_stages"] = self.finished_stages

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.finished_stages = list(checkpoint.get("finished_stages", []))
