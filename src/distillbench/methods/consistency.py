"""The shared base of the consistency methods, consistency distillation (``cd.py``) and ECT (``ect.py``).

Both train one network, the student (a copy of the teacher, or of ``student``), on real data, keep an
evaluation EMA of it and sample with its consistency function (docs/algorithms.md §11):

    f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, σ),
    c_skip = σ_d²/((σ − σ_min)² + σ_d²),   c_out = (σ − σ_min)·σ_d/√(σ² + σ_d²),   c_in = 1/√(σ² + σ_d²)

so that f(x, σ_min) = x. The student is an EDM denoiser D = c_skip^EDM·x + c_out^EDM·F with the same c_in
and c_out^EDM = σ·σ_d/√(σ² + σ_d²), so c_out/c_out^EDM = 1 − σ_min/σ and f is read through D without
opening the network:

    f(x, σ) = c_skip(σ)·x + (1 − σ_min/σ)·(D(x; σ) − c_skip^EDM(σ)·x)

For an EDM denoiser this is exactly the consistency parameterisation of its backbone F; for any other
denoiser (an analytic one, a diffusers adapter) it defines F through D.

Multistep sampling (Song et al. 2023, Alg. 1): x ← f(σ_max·z, σ_max); then at each later σ,
x ← f(x + √(σ² − σ_min²)·n, σ). With ``sample_steps`` = k the σ's after the first are ``sample_sigmas``
(k − 1 values), or else the interior of the ρ = 7 grid with k + 1 levels from σ_max to σ_min; NFE = k.

Random draws come from streams seeded by (seed, rank, step, key) (:meth:`seeded_stream`), and the two calls
that must share a dropout mask run under one seed of the device's global generator (:func:`same_dropout`),
so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig

from distillbench.errors import ConfigError
from distillbench.methods.base import DistillationMethod, adam, evaluating
from distillbench.methods.checks import starting_network
from distillbench.methods.progressive import per_sample
from distillbench.rules import (
    OPTIONAL_POSITIVE,
    POSITIVE,
    betas,
    integer,
    lookup,
    number,
    one_of,
    optional,
)
from distillbench.samplers.schedules import karras
from distillbench.teachers.denoiser import Denoiser, freeze
from distillbench.utils.ema import ema_beta, update_ema

OPTIMIZERS = ("adam", "radam")
RENOISE_SEED = 0x5EED  # the multistep sampler's noise stream (the same in every evaluation)


def positive_list(value) -> str | None:
    ok = isinstance(value, list) and all(POSITIVE(v) is None for v in value)
    return None if ok else "must be a list of numbers > 0"


# ---- the consistency function and its sampler --------------------------------------------------------------
def consistency_function(net, x, sigma, labels, sigma_min: float, sigma_data: float) -> torch.Tensor:
    """f(x, σ) = c_skip·x + (1 − σ_min/σ)·(D(x; σ) − c_skip^EDM·x) for a (B,) σ; f(x, σ_min) = x."""
    s = per_sample(sigma, x).to(x.dtype)
    c_skip = sigma_data**2 / ((s - sigma_min) ** 2 + sigma_data**2)
    c_skip_edm = sigma_data**2 / (s**2 + sigma_data**2)
    return c_skip * x + (1 - sigma_min / s) * (net(x, sigma, labels) - c_skip_edm * x)


def multistep(net, z, labels, sigmas: list[float], sigma_min: float, sigma_data: float) -> torch.Tensor:
    """x ← f(σ_0·z, σ_0), then x ← f(x + √(σ_k² − σ_min²)·n_k, σ_k): one call per σ.

    The n_k come from a stream seeded alike at every call, so an evaluation's samples change only with the
    weights (for a batch of the same z)."""
    generator = torch.Generator(device=z.device).manual_seed(RENOISE_SEED)
    x = sigmas[0] * z
    for k, sigma in enumerate(sigmas):
        if k:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            x = x + math.sqrt(sigma**2 - sigma_min**2) * noise
        level = torch.full((z.shape[0],), sigma, device=z.device)
        x = consistency_function(net, x, level, labels, sigma_min, sigma_data)
    return x


def check_sample_count(sigmas: list | None, steps: int) -> None:
    """Given σ's are one per step after the first (the check before any work and the constructor's)."""
    if sigmas is not None and len(sigmas) != steps - 1:
        raise ConfigError(
            f"method.sample_sigmas={list(sigmas)} has {len(sigmas)} entries but method.sample_steps={steps} "
            f"needs {steps - 1} (the σ's after the first step)"
        )


def sampling_sigmas(steps: int, sigmas, sigma_min: float, sigma_max: float) -> list[float]:
    """σ_max, then ``sigmas`` (steps − 1 values, descending in (σ_min, σ_max)) or the interior of the ρ = 7
    grid with steps + 1 levels."""
    check_sample_count(sigmas, steps)
    if sigmas is None:
        sigmas = karras(steps + 1, sigma_min=sigma_min, sigma_max=sigma_max)[1:steps].tolist()
    sigmas = [float(s) for s in sigmas]
    levels = [sigma_max, *sigmas]
    if not all(b < a for a, b in zip(levels, levels[1:], strict=False)) or levels[-1] <= sigma_min:
        raise ConfigError(
            f"method.sample_sigmas={sigmas} must be descending, between σ_min={sigma_min} and "
            f"σ_max={sigma_max} (or null for the ρ = 7 grid)"
        )
    return levels


@contextmanager
def same_dropout(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the device's global generator (which dropout draws from) seeded by ``seed``, and
    restore it afterwards: two calls of equal networks under one seed draw the same dropout masks."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type):
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


# ---- the method --------------------------------------------------------------------------------------------
class ConsistencyMethod(DistillationMethod):
    """A student trained on real data with one guarded update per batch, its evaluation EMA, and
    multistep sampling with the EMA's consistency function. A subclass implements :meth:`consistency_loss`
    (per sample) and :meth:`anatomy`, and may act after each update (:meth:`after_update`)."""

    trains_on_real_data = True
    ddp_networks = ("student",)
    evaluated_with = "ema"

    settings = {"sample_steps": integer(ge=1), "sample_sigmas": optional(positive_list),
                "optimizer": one_of(*OPTIMIZERS), "lr": POSITIVE, "betas": betas, "eps": POSITIVE,
                "warmup_kimg": number(ge=0), "grad_clip": OPTIONAL_POSITIVE,
                "ema_halflife_kimg": number(ge=0), "ema_rampup_ratio": optional(number(ge=0)),
                "duration_kimg": POSITIVE}  # fmt: skip

    @classmethod
    def check_config(cls, method: DictConfig) -> None:
        """The sampling σ's against the step count (the teacher's σ range is checked when it is known)."""
        sigmas = lookup(method, "sample_sigmas")
        check_sample_count(sigmas if isinstance(sigmas, list) else None, lookup(method, "sample_steps"))

    def __init__(
        self,
        teacher: Denoiser,
        student: Denoiser | None = None,
        sample_steps: int = 1,
        sample_sigmas: list[float] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_kimg: float = 0.0,
        grad_clip: float | None = None,
        ema_halflife_kimg: float = 2.0,
        ema_rampup_ratio: float | None = 0.05,
        batch_size: int = 64,
        duration_kimg: float = 12.0,
        seed: int = 0,
    ):
        self.check_arguments(locals())
        super().__init__(teacher, seed, batch_size, duration_kimg)
        sample_sigmas = None if sample_sigmas is None else list(sample_sigmas)
        self.save_hyperparameters(ignore=["teacher", "student"])
        self.sigma_min, self.sigma_max = float(teacher.sigma_min), float(teacher.sigma_max)
        self.sample_levels = sampling_sigmas(sample_steps, sample_sigmas, self.sigma_min, self.sigma_max)
        init = starting_network(teacher, student)
        self.student = copy.deepcopy(init).requires_grad_(True).train()
        self.ema = freeze(copy.deepcopy(self.student))
        self.sigma_data = float(self.student.sigma_data)

    # ---- contract ------------------------------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        """One call of the consistency function per sampling step."""
        return len(self.sample_levels)

    def fit_budget(self, tfe: float) -> float:
        """Train for the whole steps that spend at most ``tfe`` (at least one); their kimg."""
        steps = max(1, math.floor(tfe / (self.batch_size * self.tfe_per_sample())))
        self.duration_kimg = steps * self.batch_size / 1000
        return self.duration_kimg

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels=None, steps: int | None = None) -> torch.Tensor:
        """Multistep samples of the EMA's consistency function (``steps``: another step count, on the ρ = 7
        grid unless it is the configured one)."""
        levels = self.sample_levels
        if steps is not None and steps != self.nfe:
            levels = sampling_sigmas(steps, None, self.sigma_min, self.sigma_max)
        with evaluating(self.ema):
            return multistep(self.ema, z, labels, levels, self.sigma_min, self.sigma_data)

    # ---- one update ----------------------------------------------------------------------------------------
    def consistency_loss(self, x0: torch.Tensor, labels) -> torch.Tensor:
        """The per-sample loss of a batch of real samples (with grad). Implemented by each method."""
        raise NotImplementedError

    def after_update(self) -> None:
        """What follows each update, after the EMA (nothing here)."""

    def dropout_seed(self) -> int:
        """This step's seed of the dropout masks (stream 1's seed, read without touching the device)."""
        return self.seeded_stream(1).initial_seed()

    def learning_rate(self) -> float:
        """``lr``, ramped up linearly over the first ``warmup_kimg``."""
        h = self.hparams
        return h.lr * min(1.0, self.kimg / h.warmup_kimg) if h.warmup_kimg > 0 else h.lr

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        labels = batch[1] if self.num_classes and len(batch) > 1 else None
        h = self.hparams
        loss = self.finite_mean(self.consistency_loss(x0, labels))
        lr = self.learning_rate()
        self.step_optimizer(self.optimizers(), loss, self.student.parameters(), lr=lr, grad_clip=h.grad_clip)
        images = x0.shape[0] * self.rank_and_world()[1]
        self.spend(images)
        self.advance_count("gen_steps", 1)
        self.advance_count("nimg", images)
        update_ema(self.ema, self.student,
                   ema_beta(images, self.count("nimg"), h.ema_halflife_kimg, h.ema_rampup_ratio))  # fmt: skip
        self.after_update()
        self.log_train(
            {"train/loss": loss.detach(), "train/kimg": self.kimg, "train/lr": lr,
             "train/gen_step": float(self.count("gen_steps")),
             "train/dropped_samples": self.dropped_samples.float(),
             "train/nonfinite_grads": self.nonfinite_grads.float()}
        )  # fmt: skip

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "radam":
            return torch.optim.RAdam(self.student.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps)
        return adam(self.student.parameters(), h.lr, h.betas, h.eps)
