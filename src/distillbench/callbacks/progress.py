"""The training bar in the unit a distillation run is planned in: generator kimg done of the total, an ETA,
and the step's metrics on the same line (Lightning's own bar counts batches of an endless epoch); under it,
while an evaluation runs, the evaluation's own bar (samples drawn, then its metrics)."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class KimgProgressBar(TQDMProgressBar):
    """``train  42%|████      | 5.12/12.00 kimg [01:10<01:35] loss_fake=… loss_gen=…``.

    ``total_kimg`` is the run's planned duration (:meth:`DistillationMethod.planned_kimg`)."""

    TRAIN_FORMAT = (
        "{desc} {percentage:3.0f}%|{bar:20}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}] {postfix}"
    )
    EVAL_FORMAT = "{desc} {percentage:3.0f}%|{bar:20}| {n}/{total} samples [{elapsed}<{remaining}] {postfix}"

    def __init__(self, total_kimg: float, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.total_kimg = float(total_kimg)

    def init_train_tqdm(self):
        """Lightning's training bar, made with this format and total (a bar prints when it is made)."""
        return Tqdm(desc="train", total=self.total_kimg, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.TRAIN_FORMAT)  # fmt: skip

    def on_train_epoch_start(self, trainer, *_) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description("train", refresh=False)
        bar.reset(total=self.total_kimg)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(batch_idx + 1, None):
            bar.n = min(pl_module.kimg, self.total_kimg)
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        """The step's logged scalars by their short names, without those the bar shows already (kimg) and
        Lightning's version number (the run folder's name says which run)."""
        metrics = super().get_metrics(trainer, pl_module)
        shown = {"v_num", "train/kimg"}
        return {name.removeprefix("train/"): value for name, value in metrics.items() if name not in shown}

    def evaluation_bar(self, total: int, kimg: float) -> Tqdm:
        """The bar of one evaluation at ``kimg``: ``total`` samples to draw; it closes when it is left."""
        return Tqdm(desc=f"eval @ {kimg:.2f} kimg", total=total, position=2 * self.process_position + 1,
                    disable=self.is_disabled, leave=False, dynamic_ncols=True, file=sys.stdout,
                    bar_format=self.EVAL_FORMAT)  # fmt: skip


def evaluation_bar(trainer, total: int, kimg: float) -> Tqdm:
    """The trainer's evaluation bar (:meth:`KimgProgressBar.evaluation_bar`), or a silent one when the run
    shows no bar (disabled, another progress callback, or a rank other than 0)."""
    progress = trainer.progress_bar_callback
    if isinstance(progress, KimgProgressBar) and trainer.is_global_zero:
        return progress.evaluation_bar(total, kimg)
    return Tqdm(total=total, disable=True)
