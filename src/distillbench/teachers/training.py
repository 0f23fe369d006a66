"""Teacher training with the EDM loss (Karras et al. 2022, §5 and Table 1; NVlabs/edm ``EDMLoss``).

    ln σ ~ N(P_mean, P_std²),  λ(σ) = (σ² + σ_d²) / (σ·σ_d)²,  L = λ(σ)·‖D(y + σn; σ) − y‖²

Class labels are dropped with probability ``label_dropout`` (replaced by the "no label" token) so a
conditional teacher also learns the unconditional path that classifier-free guidance needs.
"""

from __future__ import annotations

import copy

import lightning as L
import torch

from distillbench.teachers.denoiser import EDMDenoiser, freeze
from distillbench.utils.ema import ema_beta, update_ema


def edm_loss(
    denoiser, y: torch.Tensor, labels, p_mean: float = -1.2, p_std: float = 1.2, rng=None, normal=None
) -> torch.Tensor:
    """Per-sample EDM loss, averaged over elements. σ and n are standard normals from ``normal(shape)`` when
    given, else drawn from ``rng``."""
    if normal is None:
        normal = lambda shape: torch.randn(shape, device=y.device, generator=rng)  # noqa: E731
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    sigma = (normal(shape) * p_std + p_mean).exp()
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2  # λ(σ)
    noise = normal(y.shape)
    d = denoiser(y + sigma * noise, sigma.flatten(), labels)
    return (weight * (d - y) ** 2).flatten(1).mean(1)


def drop_labels(labels, num_classes: int, p: float):
    """Replace each label by the null token ``num_classes`` with probability p."""
    if labels is None or not num_classes or p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


class TeacherTraining(L.LightningModule):
    """Trains an :class:`EDMDenoiser` and keeps its EMA (half-life in kimg, EDM ramp-up)."""

    def __init__(
        self,
        denoiser: EDMDenoiser,
        lr: float = 1e-3,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        label_dropout: float = 0.1,
        ema_halflife_kimg: float = 20.0,
        ema_rampup_ratio: float = 0.05,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["denoiser"])
        self.denoiser = denoiser
        self.ema = freeze(copy.deepcopy(denoiser))
        self.nimg = 0

    def training_step(self, batch, batch_idx):
        y = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        labels = drop_labels(labels, self.denoiser.num_classes, self.hparams.label_dropout)
        loss = edm_loss(self.denoiser, y, labels, self.hparams.p_mean, self.hparams.p_std).mean()
        self.nimg += y.shape[0] * self.trainer.world_size
        self.log_dict({"train/loss": loss, "train/kimg": self.nimg / 1000}, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        batch_size = batch[0].shape[0] * self.trainer.world_size
        beta = ema_beta(batch_size, self.nimg, self.hparams.ema_halflife_kimg, self.hparams.ema_rampup_ratio)
        update_ema(self.ema, self.denoiser, beta)

    def configure_optimizers(self):
        return torch.optim.Adam(self.denoiser.parameters(), lr=self.hparams.lr)
