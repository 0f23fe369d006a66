"""The shared base of the score-based one-step methods (SiD, SIM, Diff-Instruct).

It owns what the three share (docs/algorithms.md §2–3; SiD ``sid_training_loop.py``):
- the one-step generator G_θ(z) = D_θ(σ_init·z; σ_init), a copy of the teacher (or of ``student``);
- the auxiliary score network ψ (SiD's "fake score", SIM's "online diffusion model"), trained with the EDM
  denoising loss on detached generator samples;
- the frozen teacher φ, held outside the module tree: never in checkpoints, never wrapped by DDP;
- the alternation of ``fake_updates`` ψ-updates per θ-update (default 1:1);
- a generator-only EMA with a half-life in kimg and EDM's ramp-up;
- noise seeded per (seed, generator step, phase): every rank draws the global batch from that stream and
  keeps its own rows, so ranks differ and W processes step as one process with the same global batch;
- progress counted in generator steps and kimg (``global_step`` counts both optimisers);
- loss scaling, dropping samples with non-finite values and ``nan_to_num`` on gradients, with counts;
- no host synchronisation in a training step on a GPU: the step and image counters are mirrored on the host
  (:meth:`DistillationMethod.count`), and the non-finite guards and logged scalars stay on the device;
- compute counted in teacher-forward equivalents (TFE): each network's forward pass of one sample is 1, its
  backward 2, scaled by its parameter count over the teacher's; a method states its passes (:meth:`anatomy`)
  and :meth:`fit_budget` sets its duration from a TFE budget (the leaderboard's common currency).

A method implements :meth:`generator_loss`, returning the per-sample loss of generator samples x_g.
"""

from __future__ import annotations

import copy
import math

import torch

from distillbench.data.base import per_device_batch
from distillbench.errors import ConfigError
from distillbench.methods.base import DistillationMethod, adam, evaluating
from distillbench.methods.checks import starting_network
from distillbench.rules import OPTIONAL_POSITIVE, POSITIVE, betas, integer, number, optional
from distillbench.samplers.schedules import sigma_p_edm, sigma_p_sim
from distillbench.teachers.denoiser import Denoiser, as_sigma_batch, freeze
from distillbench.teachers.training import edm_loss
from distillbench.utils.ema import ema_beta, update_ema


class ScoreDistillation(DistillationMethod):
    """Manual-optimisation base: alternates ψ (fake score) and θ (generator) updates."""

    ddp_networks = ("generator", "fake")
    evaluated_with = "ema"
    nfe = 1

    #: generator time law of the method (``p_sim`` or ``p_edm``); a subclass may make it configurable
    time_law: str = "p_sim"

    #: whether the θ-step backpropagates through D_φ and D_ψ (SiD, SIM) or holds them constant (DI)
    scores_in_graph: bool = True

    settings = {"sigma_init": POSITIVE, "lr": POSITIVE, "fake_lr": OPTIONAL_POSITIVE, "betas": betas,
                "eps": POSITIVE, "fake_updates": integer(ge=1), "ema_halflife_kimg": number(ge=0),
                "ema_rampup_ratio": optional(number(ge=0)), "loss_scaling": POSITIVE,
                "loss_scaling_g": POSITIVE, "t_max": number(gt=0, le=1),
                "duration_kimg": POSITIVE}  # fmt: skip

    def __init__(
        self,
        teacher: Denoiser,
        student: Denoiser | None = None,
        sigma_init: float = 2.5,
        lr: float = 1e-4,
        fake_lr: float | None = None,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        batch_size: int = 64,
        duration_kimg: float = 12.0,
        fake_updates: int = 1,
        ema_halflife_kimg: float = 2.0,
        ema_rampup_ratio: float | None = 0.5,
        loss_scaling: float = 1.0,
        loss_scaling_g: float = 1.0,
        t_max: float = 0.8,
        seed: int = 0,
    ):
        self.check_arguments(locals())
        super().__init__(teacher, seed, batch_size, duration_kimg)
        self.save_hyperparameters(ignore=["teacher", "student"])
        init = starting_network(teacher, student)
        self.generator = copy.deepcopy(init).requires_grad_(True).train()
        self.fake = copy.deepcopy(init).requires_grad_(True).train()
        self.ema = freeze(copy.deepcopy(self.generator))

    # ----------------------------------------------------------------------------------------------------
    @property
    def batch_per_device(self) -> int:
        return per_device_batch(self.batch_size, self.rank_and_world()[1], key="method.batch_size")

    def stream_for(self, phase: str, index: int = 0) -> torch.Generator:
        """The random stream of a phase (ψ-update ``index`` or the θ-update) of this generator step, the same
        on every rank (each keeps its own rows of every draw)."""
        return self.seeded_stream({"fake": 0, "gen": 1}[phase], index, per_rank=False)

    def randn(self, n: int, *shape: int) -> torch.Tensor:
        """Standard normals (n, *shape): this rank's rows of the phase stream's global draw."""
        draw = lambda size: torch.randn(size, generator=self.rng, device=self.device)  # noqa: E731
        return self.rank_rows(draw, n, *shape)

    def rand(self, n: int) -> torch.Tensor:
        """Uniforms on [0, 1) (n,): this rank's rows of the phase stream's global draw."""
        return self.rank_rows(lambda size: torch.rand(size, generator=self.rng, device=self.device), n)

    def generate(self, z: torch.Tensor, labels=None, net: Denoiser | None = None) -> torch.Tensor:
        """G(z) = D(σ_init·z; σ_init, labels)."""
        net = net if net is not None else self.generator
        sigma_init = self.hparams.sigma_init
        return net(sigma_init * z, torch.full((z.shape[0],), sigma_init, device=z.device), labels)

    def draw(self, phase: str, index: int = 0) -> torch.Tensor:
        """Start a phase: seed its random stream and draw the generator noise z of its batch."""
        self.rng = self.stream_for(phase, index)
        return self.randn(self.batch_per_device, *self.sample_shape)

    def sample_sigma(self, n: int, law: str | None = None) -> torch.Tensor:
        """σ from the generator time law (``p_sim`` or ``p_edm``), from the phase's stream."""
        if (law or self.time_law) == "p_sim":
            return sigma_p_sim(self.rand(n), self.hparams.t_max)
        return sigma_p_edm(self.randn(n))

    def noised(self, x_g: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_t = x_g + σ·n with fresh n from the phase's stream."""
        return x_g + as_sigma_batch(sigma, x_g) * self.randn(*x_g.shape)

    def teacher_and_fake(self, x_g: torch.Tensor, labels):
        """σ from the time law, x_t = x_g + σ·n, and (σ, D_φ(x_t), D_ψ(x_t)); gradients flow through x_t."""
        sigma = self.sample_sigma(x_g.shape[0])
        x_t = self.noised(x_g, sigma)
        return sigma, self.teacher(x_t, sigma, labels), self.fake(x_t, sigma, labels)

    # ----------------------------------------------------------------------------------------------------
    def generator_loss(self, x_g: torch.Tensor, labels) -> torch.Tensor:
        """Per-sample generator loss of samples x_g (with grad). Implemented by each method."""
        raise NotImplementedError

    def fake_score_loss(self, labels, index: int = 0) -> torch.Tensor:
        """ψ-step: the EDM denoising loss of the fake score on detached generator samples
        (docs/algorithms.md §3.1)."""
        z = self.draw("fake", index)
        with torch.no_grad(), evaluating(self.generator):
            x_g = self.generate(z, labels)
        return edm_loss(self.synced("fake"), x_g, labels, normal=lambda shape: self.randn(*shape)).flatten()

    @property
    def fake_lr(self) -> float:
        """The fake score's learning rate: ``fake_lr``, else the generator's ``lr``."""
        h = self.hparams
        return h.fake_lr if h.fake_lr is not None else h.lr

    def unpack(self, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(real images, labels) of a training batch: images only when the method trains on real data (its
        batch must be this rank's share of ``method.batch_size``), labels only for a conditional teacher."""
        if not self.trains_on_real_data:  # a noise batch holds the labels alone (−1: none)
            labels = batch if self.num_classes and batch is not None and (batch >= 0).all() else None
            return None, labels
        x_real = batch[0]
        if x_real.shape[0] != self.batch_per_device:
            raise ConfigError(
                f"the data batches hold {x_real.shape[0]} images per process but method.batch_size="
                f"{self.batch_size} makes {self.batch_per_device}: give the data module method.batch_size"
            )
        return x_real, batch[1] if self.num_classes and len(batch) > 1 else None

    def log_step(self, loss_fake: torch.Tensor, loss_gen: torch.Tensor | None = None) -> None:
        """The step's ``train/*`` scalars: the losses (the generator's when it stepped), progress, guards."""
        losses = {"train/loss_fake": loss_fake.detach()}
        if loss_gen is not None:
            losses["train/loss_gen"] = loss_gen.detach()
        self.log_train(
            {**losses, "train/kimg": self.kimg, "train/gen_step": float(self.count("gen_steps")),
             "train/dropped_samples": self.dropped_samples.float(),
             "train/nonfinite_grads": self.nonfinite_grads.float()}
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        _, labels = self.unpack(batch)
        opt_g, opt_f = self.optimizers()
        h = self.hparams
        for index in range(self.hparams.fake_updates):
            self.fake.requires_grad_(True)
            loss_f = self.finite_mean(self.fake_score_loss(labels, index))
            self.step_optimizer(opt_f, loss_f, self.fake.parameters(), h.loss_scaling, lr=self.fake_lr)
        # θ-step: ψ frozen and in eval mode (no dropout sample in its prediction, as in the official loops);
        # gradients flow through its input
        self.fake.requires_grad_(False)
        with evaluating(self.fake):
            x_g = self.generate(self.draw("gen"), labels, self.synced("generator"))
            loss_g = self.finite_mean(self.generator_loss(x_g, labels))
        self.step_optimizer(opt_g, loss_g, self.generator.parameters(), h.loss_scaling_g, lr=h.lr)
        self.fake.requires_grad_(True)
        self.after_generator_step()
        self.log_step(loss_f, loss_g)

    def anatomy(self) -> list[tuple[torch.nn.Module, int, int]]:
        """Per generator image: k ψ-steps (G forward; ψ forward and backward), then the θ-step (G forward and
        backward; φ and ψ forward, and backward when the scores are in the graph). SIM/SiD: 5 forwards and 4
        backwards at k = 1 (docs/algorithms.md §8); DI: 5 and 2."""
        k, through = self.hparams.fake_updates, int(self.scores_in_graph)
        return [(self.generator, k + 1, 1), (self.fake, k + 1, k + through), (self.teacher, 1, through)]

    def fit_budget(self, tfe: float) -> float:
        """Train for the whole generator steps that spend at most ``tfe`` (at least one); their kimg."""
        steps = max(1, math.floor(tfe / (self.batch_size * self.tfe_per_sample())))
        self.duration_kimg = steps * self.batch_size / 1000
        return self.duration_kimg

    def after_generator_step(self) -> None:
        batch = self.batch_size
        self.spend(batch)
        self.advance_count("gen_steps", 1)
        self.advance_count("nimg", batch)
        h = self.hparams
        update_ema(self.ema, self.generator, ema_beta(batch, self.count("nimg"), h.ema_halflife_kimg,
                                                      h.ema_rampup_ratio))  # fmt: skip

    def configure_optimizers(self):
        h = self.hparams
        return [adam(self.generator.parameters(), h.lr, h.betas, h.eps),
                adam(self.fake.parameters(), self.fake_lr, h.betas, h.eps)]  # fmt: skip

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels=None, use_ema: bool = True) -> torch.Tensor:
        """One-step samples of the EMA (or online) generator."""
        return self.generate(z, labels, self.ema if use_ema else self.generator)


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of |x| over all non-batch dimensions."""
    return x.abs().flatten(1).mean(1)


def per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)
