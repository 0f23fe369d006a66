"""Time a stretch of training batches, then stop (``make bench`` and ``make gpu-check``)."""

from __future__ import annotations

import contextlib
import time

import lightning as L
import torch


class BatchTimer(L.Callback):
    """Times batches ``warmup`` .. ``warmup + steps`` (ends of batches, so the loop between them counts; one
    batch is one generator update of the score methods), inside ``context`` (e.g. a profiler) when given,
    and then stops the trainer. On a GPU the device is synchronised at both ends."""

    def __init__(self, warmup: int, steps: int, context=None):
        self.warmup, self.steps, self.done = warmup, steps, 0
        self.context = context or contextlib.nullcontext()
        self.start: float | None = None
        self.seconds: float | None = None

    def on_train_batch_end(self, trainer, *args) -> None:
        self.done += 1
        if self.done in (self.warmup, self.warmup + self.steps) and torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.done == self.warmup:
            self.context.__enter__()
            self.start = time.perf_counter()
        elif self.done == self.warmup + self.steps:
            self.seconds = time.perf_counter() - self.start
            self.context.__exit__(None, None, None)
            trainer.should_stop = True
