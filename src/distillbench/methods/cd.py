"""Consistency distillation (Song, Dhariwal, Chen & Sutskever, ICML 2023, Alg. 2; docs/algorithms.md §11).

On real data x₀, with N levels σ_0 = σ_max > … > σ_{N−1} = σ_min on the ρ = 7 grid:

    i ~ U{0, …, N − 2},   t = σ_i,   t₂ = σ_{i+1},   x_t = x₀ + t·n
    x̂_{t₂} = one Heun step of the teacher's ODE dx/dσ = (x − D_φ(x; σ))/σ from t to t₂   (two teacher calls)
    L = d(f_θ(x_t, t), sg f_θ⁻(x̂_{t₂}, t₂))                                       (uniform weighting)
    θ⁻ ← μ·θ⁻ + (1 − μ)·θ after every update

f is the consistency function of the student (:func:`~distillbench.methods.consistency.consistency_function`),
θ⁻ the target network, an EMA of the student with its own rate μ (``target_decay``); the evaluation EMA
(``ema_halflife_kimg``) is separate and is what :meth:`sample` uses. The online and target calls share one
dropout mask (both in train mode, under one seed). The distance d is ``l2``, the per-element mean of
(a − b)², or ``pseudo_huber``, √(‖a − b‖² + c²) − c with c = 0.00054·√dim unless set (iCT's rule). The
paper's LPIPS needs hub weights, so it is not offered; a distance is one function of :data:`DISTANCES`.
"""

from __future__ import annotations

import copy
import math

import torch

from distillbench.methods.consistency import ConsistencyMethod, consistency_function, same_dropout
from distillbench.methods.progressive import per_sample
from distillbench.rules import OPTIONAL_POSITIVE, integer, number, one_of
from distillbench.samplers.schedules import karras
from distillbench.teachers.denoiser import Denoiser
from distillbench.utils.ema import update_ema


def l2(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample mean of (a − b)² over the elements."""
    return (a - b).flatten(1).pow(2).mean(1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample √(‖a − b‖² + c²) − c, ‖·‖ over all elements."""
    return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c


DISTANCES = {"l2": l2, "pseudo_huber": pseudo_huber}


@torch.no_grad()
def heun_step(teacher: Denoiser, x, t, t_next, labels=None) -> torch.Tensor:
    """x̂: one Heun step of dx/dσ = (x − D(x; σ))/σ from t to t_next (> 0), in float64."""
    x = x.double()
    h = per_sample(t_next - t, x)
    slope = (x - teacher(x, t, labels).double()) / per_sample(t, x)
    x_euler = x + h * slope
    slope_next = (x_euler - teacher(x_euler, t_next, labels).double()) / per_sample(t_next, x)
    return x + h * (slope + slope_next) / 2


class ConsistencyDistillation(ConsistencyMethod):
    settings = {"levels": integer(ge=2), "target_decay": number(ge=0, lt=1),
                "distance": one_of(*DISTANCES), "c": OPTIONAL_POSITIVE}  # fmt: skip

    def __init__(
        self,
        teacher: Denoiser,
        student: Denoiser | None = None,
        levels: int = 18,
        target_decay: float = 0.95,
        distance: str = "pseudo_huber",
        c: float | None = None,
        **kwargs,
    ):
        self.check_arguments(locals())
        super().__init__(teacher, student, **kwargs)
        self.target_decay, self.distance = float(target_decay), DISTANCES[distance]
        self.c = float(c) if c is not None else 0.00054 * math.sqrt(math.prod(self.sample_shape))
        # N levels σ_max … σ_min in float64 (the schedule's final 0 dropped); not a buffer, which a
        # precision plugin would cast
        self.grid = karras(levels, sigma_min=self.sigma_min, sigma_max=self.sigma_max)[:-1]
        self.target = copy.deepcopy(self.student).requires_grad_(False)

    def consistency_loss(self, x0: torch.Tensor, labels) -> torch.Tensor:
        """Per-sample d(f_θ(x_t, t), sg f_θ⁻(x̂_{t₂}, t₂)) at a uniformly drawn pair of adjacent levels."""
        generator, grid = self.seeded_stream(0), self.grid.to(self.device)
        i = torch.randint(len(grid) - 1, (x0.shape[0],), generator=generator, device=self.device)
        t, t_next = grid[i], grid[i + 1]
        x_t = x0 + per_sample(t, x0).float() * torch.randn(x0.shape, generator=generator, device=self.device)
        x_next = heun_step(self.teacher, x_t, t, t_next, labels).float()
        seed, f = self.dropout_seed(), consistency_function
        with same_dropout(seed, self.device):
            online = f(self.synced("student"), x_t, t.float(), labels, self.sigma_min, self.sigma_data)
        self.target.train(self.student.training)  # dropout on in the target call as in the online one
        with torch.no_grad(), same_dropout(seed, self.device):
            target = f(self.target, x_next, t_next.float(), labels, self.sigma_min, self.sigma_data)
        return self.distance(online, target, self.c)

    def after_update(self) -> None:
        update_ema(self.target, self.student, self.target_decay)

    def anatomy(self) -> list[tuple[torch.nn.Module, int, int]]:
        """Per sample: the student's forward and backward, the target's forward, two teacher forwards."""
        return [(self.student, 1, 1), (self.target, 1, 0), (self.teacher, 2, 0)]
