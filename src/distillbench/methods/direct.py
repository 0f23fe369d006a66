"""Direct Distillation (Li & Zhang, §3.2, §3.4, §4.2; docs/algorithms.md §7) of an EDM teacher's trajectory.

The teacher's DPM-Solver++(2M) run over an N-step schedule passes the state x_k (at σ_k) after k steps and
ends at x_N (``python -m distillbench.make_trajectories`` stores the pairs). A time-embedded NAFNet S_θ maps
x_k straight to x_N, read through EDM's preconditioning with the teacher's σ_data (t = c_noise = ln(σ_k)/4):

    x̂_N = c_skip(σ_k)·x_k + c_out(σ_k)·S_θ(c_in(σ_k)·x_k, t, y)
    stage one   min_θ E d(x̂_N, x_N),   d = L1 for the first 5/6 of its iterations, then L2 (§3.4)
    stage two   min_φ E ‖R_φ(x̂_N, t, y) − x_N‖²,   θ frozen (§4.2: "restore texture details")

The paper's student reads Stable Diffusion's variance-preserving latents, of unit scale at every step; an EDM
state x_k = x + σ_k·n is σ_k times larger, so c_in scales it back and c_skip, c_out keep the target at unit
scale. ``conf/method/direct.yaml`` turns it on; the class default, ``preconditioning=False``, is the raw
x̂_N = S_θ(x_k, t, y), so a run whose config lacks the key (evaluated or resumed) keeps the form it was
trained with. y are the teacher's class labels, seen by a NAFNet with ``num_classes`` (the paper's
text-conditioned student sees no prompt: ``num_classes: 0``).

R_φ is a second NAFNet whose blocks sit in the shallow decoder layers; it starts as the identity. Each stage
has its own Adam and a cosine annealing of its lr from ``lr`` to ``eta_min`` over its iterations.

Sampling ("k + 1 steps"): the teacher's first k steps on the same N-step grid, then x̂ = R_φ(x̂_N, t, y).
NFE = k + 1: the refiner runs inside the student's one step, as in the paper's "7 + 1".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from distillbench.data.trajectories import read_manifest
from distillbench.errors import ConfigError
from distillbench.methods.base import evaluating
from distillbench.methods.staged import StagedDistillation
from distillbench.rules import (
    OPTIONAL_POSITIVE,
    POSITIVE,
    SCHEDULE,
    betas,
    boolean,
    check,
    integer,
    number,
)
from distillbench.samplers.partial import first_steps
from distillbench.samplers.schedules import karras
from distillbench.samplers.solvers import DPMSolverPP2MSampler, SampleResult
from distillbench.teachers.denoiser import Denoiser, as_sigma_batch, edm_coefficients


# ---- the math ----------------------------------------------------------------------------------------------
def time_input(sigma: torch.Tensor) -> torch.Tensor:
    """The student's time t = c_noise = ln(σ)/4 (EDM's noise input), one per sample."""
    return sigma.to(torch.float32).log() / 4


def distance(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample mean |·| (``l1``) or mean (·)² (``l2``) of prediction − target."""
    error = (prediction - target).flatten(1)
    return error.abs().mean(1) if kind == "l1" else error.pow(2).mean(1)


def cosine_lr(lr: float, eta_min: float, step: int, total: int) -> float:
    """Cosine annealing (Loshchilov & Hutter): η_min + (η − η_min)·(1 + cos(π·step/total))/2."""
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * min(step, total) / total)) / 2


# ---- configuration checks ----------------------------------------------------------------------------------
def check_net_fits(key: str, net: nn.Module, shape: tuple[int, ...], num_classes: int) -> None:
    """The NAFNet's channels and classes match the teacher's, and H, W divide by its down-sampling."""
    if len(shape) != 3:
        raise ConfigError(f"direct distillation needs image samples (C, H, W), but the teacher makes {shape}")
    if net.in_channels != shape[0]:
        raise ConfigError(
            f"{key}.in_channels={net.in_channels} but the teacher's samples have {shape[0]} channels; "
            f"set {key}.in_channels={shape[0]} (or pick the net preset of this data)"
        )
    if shape[1] % net.multiple or shape[2] % net.multiple:
        raise ConfigError(
            f"{key} has {net.levels} levels of down-sampling, so H and W must be multiples of "
            f"{net.multiple}, but the samples are {shape[1]}×{shape[2]}; use fewer levels in "
            f"{key}.enc_blocks/dec_blocks"
        )
    if net.num_classes not in (0, num_classes):
        raise ConfigError(
            f"{key}.num_classes={net.num_classes} but the teacher has {num_classes} classes; set "
            f"{key}.num_classes={num_classes} (or 0 for a student that does not see the labels)"
        )


def check_together(
    steps: int, k: int, lr: float, eta_min: float, refiner: str | None, refine_iterations: int
):
    """The keys that bound each other: 1 <= k <= steps - 1, 0 <= eta_min < lr, and a refiner (its name, or
    None) exactly when stage two has iterations."""
    check("method.k", k, integer(ge=1, le=steps - 1), "1 <= k <= method.steps - 1")
    check("method.eta_min", eta_min, number(ge=0, lt=lr), "0 <= eta_min < method.lr")
    if (refiner is None) != (refine_iterations == 0):
        raise ConfigError(
            f"method.refine_iterations={refine_iterations} with method.refiner={refiner or 'null'}: stage "
            "two needs both a refiner net and its iterations; set both, or method.refiner=null and "
            "method.refine_iterations=0"
        )


class DirectDistillation(StagedDistillation):
    """Trains ``net`` (stage one) and the optional ``refiner`` (stage two) on trajectory pairs.

    Batches are ``(x_k, σ_k, k, x_N, label)`` of
    :class:`~distillbench.data.trajectories.TrajectoryDataModule`.
    A record per finished stage goes to :attr:`finished_stages` (for ``StageEvaluation``); after the last
    one the trainer is stopped. :attr:`steps` (= :attr:`nfe` = k + 1) is the sampler's NFE.
    """

    ddp_networks = ("net", "refiner")  # one trained per stage: each its own DDP

    #: it trains on the batches of a trajectory data module, not on ``NoiseDataModule``
    trains_on_real_data = True

    settings = {"steps": integer(ge=2), "k": integer(ge=1), "iterations": integer(ge=1),
                "refine_iterations": integer(ge=0), "l1_fraction": number(ge=0, le=1), "lr": POSITIVE,
                "betas": betas, "eps": POSITIVE, "eta_min": number(ge=0), "grad_clip": OPTIONAL_POSITIVE,
                "preconditioning": boolean, **SCHEDULE}  # fmt: skip

    @classmethod
    def check_config(cls, method: DictConfig) -> None:
        refiner = method.get("refiner")
        refiner = None if refiner is None else str(refiner.get("_target_", "<a net>")).rsplit(".", 1)[-1]
        check_together(method.steps, method.k, method.lr, method.eta_min, refiner, method.refine_iterations)

    def __init__(
        self,
        teacher: Denoiser,
        net: nn.Module,
        refiner: nn.Module | None = None,
        student: Denoiser | None = None,
        steps: int = 20,
        k: int = 10,
        schedule: Callable[..., torch.Tensor] = karras,
        iterations: int = 3000,
        refine_iterations: int = 1000,
        l1_fraction: float = 5 / 6,
        lr: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eta_min: float = 1e-7,
        grad_clip: float | None = None,
        preconditioning: bool = False,
        trajectories: str | Path | None = None,
        batch_size: int = 64,
        duration_kimg: float | None = None,
    ):
        self.check_arguments(locals())
        check_together(steps, k, lr, eta_min, None if refiner is None else type(refiner).__name__,
                       refine_iterations)  # fmt: skip
        super().__init__(teacher, batch_size=batch_size, duration_kimg=duration_kimg)
        if student is not None:
            raise ConfigError(
                "direct distillation trains method.net (a NAFNet), not a student=; drop student="
            )
        self.k = k
        self.set_budgets("iterations", [iterations] + ([refine_iterations] if refiner is not None else []))
        check_net_fits("method.net", net, self.sample_shape, self.num_classes)
        if refiner is not None:
            check_net_fits("method.refiner", refiner, self.sample_shape, self.num_classes)
        self.save_hyperparameters(ignore=["teacher", "net", "refiner", "student", "schedule"])
        self.net, self.refiner = net.train(), refiner
        self.sampler = DPMSolverPP2MSampler(steps=steps, schedule=schedule)
        if trajectories is not None:
            self.check_trajectories(read_manifest(Path(trajectories)), f"method.trajectories={trajectories}")

    def check_trajectories(self, manifest: dict, where: str) -> None:
        """The pairs were made by this teacher's sample shape on this method's N-step grid."""
        if tuple(manifest["sample_shape"]) != self.sample_shape:
            raise ConfigError(
                f"{where} holds samples of shape {tuple(manifest['sample_shape'])} but the teacher makes "
                f"{self.sample_shape}; use the teacher= that made them"
            )
        grid = self.sigmas.tolist()
        if len(grid) != len(manifest["sigmas"]) or not torch.allclose(
            torch.tensor(grid, dtype=torch.float64), torch.tensor(manifest["sigmas"], dtype=torch.float64)
        ):
            raise ConfigError(
                f"{where} was made on the {manifest['steps']}-step σ grid {manifest['sigmas']}, but "
                f"method.steps={self.sampler.steps} and method.schedule give {grid}; set them as the "
                f"trajectories command had them (steps={manifest['steps']}, schedule={manifest['schedule']})"
            )
        # allowed (the paper trains on steps 10-12 and samples 7 + 1), but worth a word
        if self.k not in manifest["indices"]:
            warnings.warn(
                f"method.k={self.k} is not among the step indices {manifest['indices']} of {where}: the "
                f"student will map states x_{self.k} it never saw; make pairs with 'indices=[{self.k - 1},"
                f"{self.k},{self.k + 1}]' to train on them",
                stacklevel=2,
            )

    # ---- state ---------------------------------------------------------------------------------------------
    @property
    def sigmas(self) -> torch.Tensor:
        """The teacher's N-step σ grid (float64, N + 1 values ending in 0)."""
        return self.sampler.sigmas(self.teacher)

    @property
    def steps(self) -> int:
        """NFE of :meth:`sample`: k teacher steps plus the student's one."""
        return self.k + 1

    nfe = steps

    @property
    def trained_net(self) -> nn.Module:
        """The network the current stage trains: the student, then the refiner."""
        return self.net if self.current_stage == 0 else self.refiner

    def stage_anatomy(self, stage: int) -> list[tuple[nn.Module, int, int]]:
        """Per pair: stage one trains S_θ (forward, backward); stage two runs S_θ and trains R_φ."""
        return [(self.net, 1, 1)] if stage == 0 else [(self.net, 1, 0), (self.refiner, 1, 1)]

    def loss_kind(self) -> str:
        """L1 for the first ``l1_fraction`` of stage one, L2 after it and in stage two."""
        l1_steps = round(self.hparams.l1_fraction * self.budgets[0])
        return "l1" if self.current_stage == 0 and self.count("stage_step") < l1_steps else "l2"

    def learning_rate(self) -> float:
        h = self.hparams
        return cosine_lr(h.lr, h.eta_min, self.count("stage_step"), self.budgets[self.current_stage])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        manifest = getattr(self.trainer.datamodule, "manifest", None)
        if manifest is not None:
            self.check_trajectories(manifest, f"data.root={self.trainer.datamodule.root}")

    # ---- loss and optimisation -----------------------------------------------------------------------------
    def student(self, net: nn.Module, x_k: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
        """x̂_N = c_skip·x_k + c_out·S_θ(c_in·x_k, t, y) (or S_θ(x_k, t, y) without preconditioning)."""
        if not self.hparams.preconditioning:
            return net(x_k, time_input(sigma), labels)
        c_skip, c_out, c_in, c_noise = edm_coefficients(as_sigma_batch(sigma, x_k), self.teacher.sigma_data)
        return c_skip * x_k + c_out * net(c_in * x_k, c_noise.flatten(), labels)

    def direct(self, x_k: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
        """R_φ(x̂_N, t, y), or x̂_N without a refiner."""
        x = self.student(self.net, x_k, sigma, labels)
        return x if self.refiner is None else self.refiner(x, time_input(sigma), labels)

    def stage_loss(
        self, x_k: torch.Tensor, sigma: torch.Tensor, x_final: torch.Tensor, labels
    ) -> torch.Tensor:
        """Per-sample loss of the current stage: d(x̂_N, x_N), or ‖R_φ(x̂_N) − x_N‖² with θ fixed."""
        if self.current_stage == 0:
            return distance(self.student(self.synced("net"), x_k, sigma, labels), x_final, self.loss_kind())
        with torch.no_grad(), evaluating(self.net):
            student = self.student(self.net, x_k, sigma, labels)
        return distance(self.synced("refiner")(student, time_input(sigma), labels), x_final, "l2")

    def training_step(self, batch, batch_idx):
        if self.stopped():
            return None
        x_k, sigma, _, x_final, labels = batch
        kind, lr = self.loss_kind(), self.learning_rate()
        loss = self.finite_mean(self.stage_loss(x_k, sigma, x_final, labels))
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        self.step_optimizer(optimizers[self.current_stage], loss, self.trained_net.parameters(), lr=lr,
                            grad_clip=self.hparams.grad_clip)  # fmt: skip
        self.log_train(
            {"train/loss": loss.detach(), "train/kimg": self.kimg,
             "train/gen_step": float(self.count("gen_steps")),
             "train/stage": float(self.current_stage), "train/l1": float(kind == "l1"), "train/lr": lr,
             "train/dropped_samples": self.dropped_samples.float(),
             "train/nonfinite_grads": self.nonfinite_grads.float()}
        )  # fmt: skip
        self.advance(x_k.shape[0] * self.trainer.world_size)

    def configure_optimizers(self):
        h = self.hparams
        nets = [self.net] + ([self.refiner] if self.refiner is not None else [])
        return [torch.optim.Adam(n.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps) for n in nets]

    # ---- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, z: torch.Tensor, labels=None, steps: int | None = None) -> SampleResult:
        """k teacher DPM-Solver++(2M) steps on the N-step grid from z, then the student: NFE k + 1.

        ``steps`` (k + 1) defaults to the configured k; any 1 ≤ k ≤ N − 1 works (the paper's 7 + 1 uses a
        student trained at k = 10…12).
        """
        k = self.k if steps is None else steps - 1
        if not 1 <= k <= self.sampler.steps - 1:
            raise ValueError(
                f"steps={steps} means k = {k} teacher steps, outside [1, {self.sampler.steps - 1}]"
            )
        prefix = first_steps(self.teacher, self.sampler, z, labels, k)
        sigma_k = torch.full((z.shape[0],), float(self.sigmas[k]), device=z.device)
        labels = torch.full_like(sigma_k, -1, dtype=torch.long) if labels is None else labels
        with evaluating(self.net, self.refiner):
            x = self.direct(prefix.x.to(torch.float32), sigma_k, labels)
        return SampleResult(x.to(z.dtype), prefix.nfe + 1)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels=None, steps: int | None = None) -> torch.Tensor:
        """Samples of :meth:`generate` (the face ``PeriodicEvaluation`` and ``StageEvaluation`` call)."""
        return self.generate(z, labels, steps).x
