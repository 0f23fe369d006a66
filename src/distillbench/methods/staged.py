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

    A subclass sets :attr:`budgets` (one per stage, in ``budget_unit``: ``steps`` or ``kimg``) and
    :attr:`nfe` (its sampler's NFE at the current stage). A spent budget appends (``stage``, ``steps``,
    ``kimg``, ``gen_step``) to :attr:`finished_stages` for :class:`~distillbench.callbacks.StageEvaluation`,
    then :meth:`start_next_stage` runs, or after the last stage the trainer stops.
    """

    budget_unit: str = "steps"
    staged = True

    def __init__(self, teacher: Denoiser, seed: int = 0):
        super().__init__(teacher, seed)
        self.budgets: list[float] = []
        for name in ("stage", "stage_step"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.register_buffer("stage_nimg", torch.zeros((), dtype=torch.float64))

    def planned_kimg(self, duration_kimg: float) -> float | None:
        return sum(self.budgets) if self.budget_unit == "kimg" else None

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

    def fit_budget(self, tfe: float, batch_size: int) -> float:
        """Scale every stage's budget by one factor, so that the stages together spend ``tfe`` (at most)."""
        samples_per_unit = 1000 if self.budget_unit == "kimg" else batch_size
        costs = [self.cost_of(self.stage_anatomy(stage)) for stage in range(len(self.budgets))]
        planned = sum(b * samples_per_unit * c for b, c in zip(self.budgets, costs, strict=True))
        # whole steps per stage, so that the stages spend at most tfe
        steps = [max(1, math.floor(b * tfe / planned * samples_per_unit / batch_size)) for b in self.budgets]
        self.budgets = steps if self.budget_unit == "steps" else [n * batch_size / 1000 for n in steps]
        return sum(steps) * batch_size / 1000

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["finished_stages"] = self.finished_stages

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.finished_stages = list(checkpoint.get("finished_stages", []))
