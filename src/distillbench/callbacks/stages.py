"""Evaluate a progressive-distillation student at the end of every stage, at that stage's step count.

The method appends a record (``stage``, ``steps``, ``kimg``, ``gen_step``) to ``finished_stages`` when a
stage's budget is spent; this callback measures the student's deterministic sampler at the record's step
count (the student's weights at the end of the stage) on the periodic evaluation's fixed inputs, and logs
``stage/<metric>``.
"""

from __future__ import annotations

import functools

import lightning as L

from distillbench.callbacks.evaluation import AXES, PeriodicEvaluation
from distillbench.metrics.suite import PROTOCOL


class StageEvaluation(L.Callback):
    """One measurement per finished stage; rows (record, ``nfe``, figures) go to :attr:`history`."""

    def __init__(self, evaluation: PeriodicEvaluation):
        self.evaluation = evaluation
        self.history: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for record in pl_module.finished_stages[len(self.history) :]:
            sample = functools.partial(pl_module.sample, steps=record["steps"])
            figures, _ = self.evaluation.measure(trainer, pl_module, sample)
            row = {**record, "nfe": record["steps"], **figures}
            self.history.append(row)
            if trainer.is_global_zero:
                self.send_to_loggers(trainer, row)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])

    @staticmethod
    def send_to_loggers(trainer, row: dict) -> None:
        scalars = {f"stage/{k}": v for k, v in row.items() if k not in (*AXES, PROTOCOL)}
        for logger in trainer.loggers:
            logger.log_metrics(scalars | {"train/kimg": row["kimg"]}, step=row["gen_step"])
