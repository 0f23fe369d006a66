"""ECT, easy consistency tuning (Geng, Pokle, Luo, Lin & Kolter, ICLR 2025; docs/algorithms.md §12).

The student starts from the teacher's weights and is tuned on real data y with no further teacher call:

    t ~ exp(N(P_mean, P_std²)),   stage = ⌊kimg / double_kimg⌋
    r = max(0, t·(1 − q^{−(stage+1)}·(1 + k·sigmoid(−b·t))))                      (r → t as the stage grows)
    D_t = D_θ(y + t·ε, t),   D_r = sg D_θ(y + r·ε, r)  (one ε, one dropout mask; D_r = y where r = 0)
    L = (√(‖D_t − D_r‖² + c²) − c) / (t − r)                                       (c = 0: ‖D_t − D_r‖)

Training reads the student's denoiser D as it is (EDM preconditioning: the boundary condition enters through
D_r = y at r = 0); sampling reads its consistency function, as ECT's network does in eval mode
(:mod:`distillbench.methods.consistency`).
"""

from __future__ import annotations

import torch

from distillbench.methods.consistency import ConsistencyMethod, same_dropout
from distillbench.methods.progressive import per_sample
from distillbench.rules import POSITIVE, number
from distillbench.teachers.denoiser import Denoiser


def ect_r(t: torch.Tensor, stage: int, q: float, k: float, b: float) -> torch.Tensor:
    """r = max(0, t·(1 − q^{−(stage+1)}·(1 + k·sigmoid(−b·t))))."""
    return (t * (1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t)))).clamp_min(0)


def ect_loss(d_t: torch.Tensor, d_r: torch.Tensor, t: torch.Tensor, r: torch.Tensor, c: float):
    """Per-sample (√(‖D_t − D_r‖² + c²) − c)/(t − r)."""
    return (((d_t - d_r).flatten(1).pow(2).sum(1) + c**2).sqrt() - c) / (t - r)


class ECT(ConsistencyMethod):
    settings = {"p_mean": number(), "p_std": POSITIVE, "q": number(gt=1), "k": number(ge=0),
                "b": number(ge=0), "c": number(ge=0), "double_kimg": POSITIVE}  # fmt: skip

    def __init__(
        self,
        teacher: Denoiser,
        student: Denoiser | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        c: float = 0.0,
        double_kimg: float = 3200.0,
        **kwargs,
    ):
        self.check_arguments(locals())
        super().__init__(teacher, student, **kwargs)
        self.p_mean, self.p_std, self.q, self.k, self.b, self.c = p_mean, p_std, q, k, b, c
        self.double_kimg = float(double_kimg)

    @property
    def stage(self) -> int:
        """The number of halvings of t − r so far: one every ``double_kimg`` (counted in images, exactly)."""
        return int(self.count("nimg") // (self.double_kimg * 1000))

    def consistency_loss(self, y: torch.Tensor, labels) -> torch.Tensor:
        """Per-sample (√(‖D_t − D_r‖² + c²) − c)/(t − r) at t from the log-normal and r from the stage."""
        generator = self.seeded_stream(0)
        normal = torch.randn(y.shape[0], generator=generator, device=self.device)
        t = (self.p_mean + self.p_std * normal).exp()
        r = ect_r(t, self.stage, self.q, self.k, self.b)
        eps = torch.randn(y.shape, generator=generator, device=self.device)
        seed = self.dropout_seed()
        with same_dropout(seed, self.device):
            d_t = self.synced("student")(y + per_sample(t, y) * eps, t, labels)
        with torch.no_grad(), same_dropout(seed, self.device):
            # at r = 0 the target is y; the call there runs at σ_min (D has no σ = 0) and is not used
            d_r = self.student(y + per_sample(r, y) * eps, r.clamp_min(self.sigma_min), labels)
            d_r = torch.where(per_sample(r > 0, y), d_r, y)
        return ect_loss(d_t, d_r, t, r, self.c)

    def anatomy(self) -> list[tuple[torch.nn.Module, int, int]]:
        """Per sample: two student forwards (at t with grad, at r without), one backward."""
        return [(self.student, 2, 1)]

    def log_train(self, metrics: dict) -> None:
        super().log_train(metrics | {"train/stage": float(self.stage)})
