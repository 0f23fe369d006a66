"""Progressive distillation (Salimans & Ho, ICLR 2022, Alg. 2 and §4) in EDM's σ-parameterisation.

docs/algorithms.md §6 translated to x_σ = x + σ·n: DDIM is the Euler step of the probability-flow ODE,

    step(x, D; σ → σ') = D + (σ'/σ)·(x − D).

At a stage with N student steps on the grid σ_0 > … > σ_N = 0, the teacher's grid has 2N steps: it adds
σ_{i+½} inside every student step i. For x_σ = x + σ_i·n (paper: z_t) the teacher takes two steps,

    x_{i+½} = step(x_σ, D_T(x_σ; σ_i); σ_i → σ_{i+½})                     (paper: z_{t'})
    x_{i+1} = step(x_{i+½}, D_T(x_{i+½}; σ_{i+½}); σ_{i+½} → σ_{i+1})     (paper: z_{t''})

and the student's target x̃ is the D with which one student step from x_σ lands on x_{i+1}:

    x̃ = (x_{i+1} − (σ_{i+1}/σ_i)·x_σ) / (1 − σ_{i+1}/σ_i)          (σ_{i+1} = 0: x̃ = x_{i+1})

The loss is w(σ)·mean‖D_θ(x_σ; σ) − x̃‖² with SNR = 1/σ² (the VP α²/σ² at σ_EDM = σ_VP/α):
``snr_trunc`` w = max(1, SNR) = max(x-MSE, ε-MSE) (the paper's CIFAR choice), ``v`` w = 1 + SNR (v-MSE).

Every stage's grid is a sub-grid of the finest grid ``schedule(2·n_start)``, so a stage's teacher grid is
exactly the grid its teacher (the previous student) was trained on, as t = i/N nests in the paper. After a
stage's budget the student is copied into a frozen teacher, N ← N/2 and Adam restarts (the paper restarts
its linearly decaying learning rate with every halving); no EMA (the paper's distillation uses none).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence

import torch
from omegaconf import DictConfig

from distillbench.errors import ConfigError
from distillbench.methods.base import evaluating
from distillbench.methods.checks import starting_network
from distillbench.methods.staged import StagedDistillation
from distillbench.rules import (
    OPTIONAL_POSITIVE,
    POSITIVE,
    SCHEDULE,
    betas,
    lookup,
    one_of,
    optional,
    positive_per_stage,
    power_of_two,
)
from distillbench.samplers.schedules import karras
from distillbench.samplers.solvers import EulerSampler
from distillbench.teachers.denoiser import Denoiser, freeze

WEIGHTINGS = ("snr_trunc", "v")
LR_SCHEDULES = ("linear", "constant")


# ---- the math of one student step --------------------------------------------------------------------------
def per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) σ to (B, 1, …, 1) for broadcasting against ``x``, keeping its dtype."""
    return sigma.reshape(-1, *[1] * (x.ndim - 1))


def euler_step(x, denoised, sigma, sigma_next) -> torch.Tensor:
    """The deterministic (DDIM) step x' = D + (σ'/σ)(x − D) for (B,) tensors σ, σ'."""
    return denoised + per_sample(sigma_next / sigma, x) * (x - denoised)


@torch.no_grad()
def teacher_two_steps(teacher: Denoiser, x, sigma, sigma_mid, sigma_next, labels=None) -> torch.Tensor:
    """x_{i+1}: two teacher Euler steps σ → σ_mid → σ_next from x, in float64."""
    x = x.double()
    x_mid = euler_step(x, teacher(x, sigma, labels).double(), sigma, sigma_mid)
    return euler_step(x_mid, teacher(x_mid, sigma_mid, labels).double(), sigma_mid, sigma_next)


def student_target(x, x_next, sigma, sigma_next) -> torch.Tensor:
    """x̃ = (x_next − r·x)/(1 − r), r = σ'/σ: the denoised value whose Euler step from x lands on x_next."""
    ratio = per_sample(sigma_next / sigma, x)
    return (x_next - ratio * x) / (1 - ratio)


def loss_weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(σ) of the x-MSE: max(1, SNR) (``snr_trunc``) or 1 + SNR (``v``), SNR = 1/σ²."""
    snr = sigma.double() ** -2
    return (snr.clamp(min=1.0) if weighting == "snr_trunc" else 1.0 + snr).float()


# ---- grids -------------------------------------------------------------------------------------------------
def nested_schedule(
    steps: int, sigma_min: float, sigma_max: float, finest: int, base: Callable
) -> torch.Tensor:
    """Every (finest/steps)-th point of ``base(finest)``: steps + 1 values from σ_max down to 0."""
    if steps < 1 or finest % steps:
        raise ValueError(f"steps={steps} must divide the finest grid's {finest} steps")
    return base(finest, sigma_min=sigma_min, sigma_max=sigma_max)[:: finest // steps]


# ---- configuration checks ----------------------------------------------------------------------------------
def per_stage(key: str, value, stages: int, fix: str) -> list[float]:
    """A positive value per stage from one number (every stage) or a list of one per stage."""
    is_list = isinstance(value, Sequence) and not isinstance(value, str)
    values = list(value) if is_list else [value] * stages
    if len(values) != stages:
        raise ConfigError(f"{key}={values} has {len(values)} entries but there are {stages} stages; {fix}")
    for index, v in enumerate(values):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{key}{f'[{index}]' if is_list else ''}={v!r} must be > 0; {fix}")
    return [float(v) for v in values]


def stage_budgets(kimg, iterations, stages: int, prefix: str = "method.stage") -> tuple[str, list[float]]:
    """The budget unit (``kimg`` or ``iterations``, i.e. optimiser steps) and one budget per stage from one
    number (every stage) or a list of one per stage; exactly one of the two is set."""
    if (kimg is None) == (iterations is None):
        raise ConfigError(
            f"{prefix}_kimg={kimg} and {prefix}_iterations={iterations}: set exactly one of them (the other "
            "null)"
        )
    if kimg is not None:
        return "kimg", per_stage(f"{prefix}_kimg", kimg, stages, "give every stage a positive kimg")
    return "iterations", per_stage(
        f"{prefix}_iterations", iterations, stages, "give every stage a positive number of iterations"
    )


class ProgressiveDistillation(StagedDistillation):
    """Halves a deterministic sampler's step count stage by stage, from ``n_start`` student steps to 1.

    Stage k trains the student for n_start/2^k steps against two steps of its teacher. Finished stages are
    appended to :attr:`finished_stages` (``stage``, ``steps``, ``kimg``, ``gen_step``) for
    :class:`~distillbench.callbacks.stages.StageEvaluation`; after the last one the trainer is stopped.
    """

    #: it trains on batches ``[x]`` or ``[x, labels]`` of a real data module, not on ``NoiseDataModule``
    trains_on_real_data = True

    ddp_networks = ("student",)  # the frozen previous student needs no DDP

    settings = {"n_start": power_of_two, "stage_kimg": optional(positive_per_stage),
                "stage_iterations": optional(positive_per_stage), "lr": positive_per_stage,
                "lr_schedule": one_of(*LR_SCHEDULES), "betas": betas, "eps": POSITIVE,
                "grad_clip": OPTIONAL_POSITIVE, "weighting": one_of(*WEIGHTINGS), **SCHEDULE}  # fmt: skip

    @classmethod
    def check_config(cls, method: DictConfig) -> str:
        """The stage budgets and learning rates, one per stage; returns the budgets' unit."""
        stages = method.n_start.bit_length()  # n_start, n_start/2, …, 1 student steps
        per_stage("method.lr", lookup(method, "lr"), stages, "give every stage a positive learning rate")
        return stage_budgets(lookup(method, "stage_kimg"), lookup(method, "stage_iterations"), stages)[0]

    def __init__(
        self,
        teacher: Denoiser,
        student: Denoiser | None = None,
        n_start: int = 64,
        stage_kimg: float | Sequence[float] | None = None,
        stage_iterations: int | Sequence[int] | None = None,
        lr: float | Sequence[float] = 5e-5,
        lr_schedule: str = "linear",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        grad_clip: float | None = 1.0,
        weighting: str = "snr_trunc",
        schedule: Callable[..., torch.Tensor] = karras,
        batch_size: int = 64,
        duration_kimg: float | None = None,
        seed: int = 0,
    ):
        self.check_arguments(locals())
        super().__init__(teacher, seed, batch_size, duration_kimg)
        self.n_start = n_start
        self.stage_steps_list = [n_start >> k for k in range(n_start.bit_length())]  # n_start, …, 2, 1
        stages = len(self.stage_steps_list)
        self.set_budgets(*stage_budgets(stage_kimg, stage_iterations, stages))
        self.lrs = per_stage("method.lr", lr, stages, "give every stage a positive learning rate")
        self.lr_schedule, self.weighting = lr_schedule, weighting
        self.save_hyperparameters(ignore=["teacher", "student", "schedule"])
        init = starting_network(teacher, student)
        self.student = copy.deepcopy(init).requires_grad_(True).train()
        self.previous_student = freeze(copy.deepcopy(self.student))  # the teacher of stages ≥ 1
        self.schedule = functools.partial(
            nested_schedule, finest=2 * n_start, base=schedule,
            sigma_min=float(teacher.sigma_min), sigma_max=float(teacher.sigma_max),
        )  # fmt: skip

    # ---- state ---------------------------------------------------------------------------------------------
    @property
    def teacher(self) -> Denoiser:
        """The original teacher in stage 0, the previous stage's frozen student afterwards."""
        return self._teacher[0] if self.count("stage") == 0 else self.previous_student

    @property
    def steps(self) -> int:
        """The student's step count (= its NFE) at the current stage."""
        return self.stage_steps_list[self.current_stage]

    @property
    def nfe(self) -> int:
        """NFE of :meth:`sample`: the student's step count at the current stage (one evaluation a step)."""
        return self.steps

    def stage_anatomy(self, stage: int) -> list[tuple[torch.nn.Module, int, int]]:
        """Per sample: the stage's teacher takes two steps (2 forwards), the student trains (1 and 1)."""
        return [(self.student, 1, 1), (self._teacher[0] if stage == 0 else self.previous_student, 2, 0)]

    def grids(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(student grid with steps + 1 points, teacher grid with 2·steps + 1 points), float64."""
        return self.schedule(steps).to(self.device), self.schedule(2 * steps).to(self.device)

    def sampler(self, steps: int | None = None) -> EulerSampler:
        """The student's deterministic sampler on its own grid (NFE = steps)."""
        return EulerSampler(steps=steps or self.steps, schedule=self.schedule)

    # ---- loss ----------------------------------------------------------------------------------------------
    def distillation_loss(self, x0: torch.Tensor, labels, rng: torch.Generator) -> torch.Tensor:
        """Per-sample w(σ)·mean‖D_θ(x_σ; σ_i) − x̃‖² at a uniformly drawn student step i."""
        student_grid, teacher_grid = self.grids(self.steps)
        i = torch.randint(self.steps, (x0.shape[0],), generator=rng, device=self.device)
        sigma, sigma_mid, sigma_next = student_grid[i], teacher_grid[2 * i + 1], student_grid[i + 1]
        noise = torch.randn(x0.shape, generator=rng, device=self.device)
        x = x0 + per_sample(sigma, x0).float() * noise
        x_next = teacher_two_steps(self.teacher, x, sigma, sigma_mid, sigma_next, labels)
        target = student_target(x.double(), x_next, sigma, sigma_next).float()
        error = (self.synced("student")(x, sigma.float(), labels) - target) ** 2
        return loss_weight(sigma, self.weighting) * error.flatten(1).mean(1)

    # ---- optimisation --------------------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """The stage's lr, decayed linearly to 0 over the stage's budget when ``lr_schedule=linear``."""
        lr = self.lrs[self.current_stage]
        return lr * max(0.0, 1.0 - self.stage_progress()) if self.lr_schedule == "linear" else lr

    def training_step(self, batch, batch_idx):
        if self.stopped():
            return None
        x0 = batch[0]
        labels = batch[1] if self.num_classes and len(batch) > 1 else None
        loss = self.finite_mean(self.distillation_loss(x0, labels, self.seeded_stream()))
        lr = self.learning_rate()
        self.step_optimizer(self.optimizers(), loss, self.student.parameters(), lr=lr,
                            grad_clip=self.hparams.grad_clip)  # fmt: skip
        self.log_train(
            {"train/loss": loss.detach(), "train/kimg": self.kimg,
             "train/gen_step": float(self.count("gen_steps")),
             "train/student_steps": float(self.steps), "train/lr": lr,
             "train/dropped_samples": self.dropped_samples.float(),
             "train/nonfinite_grads": self.nonfinite_grads.float()}
        )  # fmt: skip
        self.advance(x0.shape[0] * self.trainer.world_size)

    def start_next_stage(self) -> None:
        """The student becomes the frozen teacher of the next stage; Adam restarts for the new student."""
        self.previous_student.load_state_dict(self.student.state_dict())
        self.optimizers().optimizer.state.clear()

    def configure_optimizers(self):
        h = self.hparams
        return torch.optim.Adam(self.student.parameters(), lr=self.lrs[0], betas=tuple(h.betas), eps=h.eps)

    # ---- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels=None, steps: int | None = None) -> torch.Tensor:
        """Deterministic samples of the student on its grid, at the current (or given) step count."""
        with evaluating(self.student):
            return self.sampler(steps).sample(self.student, z, labels).x
