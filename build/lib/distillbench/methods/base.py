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
import time
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch

from distillbench.data.base import per_device_batch
from distillbench.errors import ConfigError
from distillbench.teachers.denoiser import Denoiser, as_sigma_batch, freeze
from distillbench.teachers.training import edm_loss
from distillbench.utils.ema import ema_beta, update_ema

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def sigma_p_sim(u: torch.Tensor, t_max: float = 0.8) -> torch.Tensor:
    """SiD/SIM generator time law from u ~ U[0, 1): t = u·t_max on the ρ = 7 Karras map, σ ∈ [0.002, 24.4]
    (docs/algorithms.md §2)."""
    t = u * t_max
    a, b = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return (a + (1 - t) * (b - a)) ** RHO


def sigma_p_edm(normal: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """EDM's log-normal training law from standard normals: ln σ ~ N(P_mean, P_std²)."""
    return (normal * p_std + p_mean).exp()


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value} must be > 0")


def choice(key: str, value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}")
    return value


def check_grad_clip(grad_clip: float | None) -> None:
    if grad_clip is not None and not grad_clip > 0:
        raise ConfigError(f"method.grad_clip={grad_clip} must be > 0, or null for no clipping")


def check_same_shape(student: Denoiser, teacher: Denoiser) -> None:
    if tuple(student.sample_shape) != tuple(teacher.sample_shape):
        raise ConfigError(
            f"the student makes samples of shape {tuple(student.sample_shape)} but the teacher "
            f"{tuple(teacher.sample_shape)}; pick a student= that matches the data"
        )


def starting_network(teacher: Denoiser, student: Denoiser | None) -> Denoiser:
    """The network the trained copies start from: ``student``, else the teacher, which must have weights."""
    init = student if student is not None else teacher
    check_same_shape(init, teacher)
    if not any(p.numel() for p in init.parameters()):
        raise ConfigError(
            f"the teacher {getattr(teacher, 'name', type(teacher).__name__)!r} has no weights to start the "
            "trained networks from; give a student config (e.g. student=gmm_digits, student=toy2d)"
        )
    return init


@contextmanager
def evaluating(*nets: torch.nn.Module | None) -> Iterator[None]:
    """The nets in eval mode (no dropout) for the block, then back in their previous modes."""
    nets = [net for net in nets if net is not None]
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    try:
        yield
    finally:
        for net, mode in zip(nets, modes, strict=True):
            net.train(mode)


def forward_equivalents(forwards: float, backwards: float, parameters: int, teacher_parameters: int) -> float:
    """Teacher-forward equivalents of a network's passes on one sample: (forwards + 2·backwards) · P / P_φ.
    A teacher without parameters (the analytic toy2d mixture) counts every network at its size."""
    scale = parameters / teacher_parameters if teacher_parameters else 1.0
    return (forwards + 2 * backwards) * scale


class DistillationMethod(L.LightningModule):
    """What every strategy shares: the frozen teacher outside the module tree, the sample shape and classes,
    progress in generator steps and kimg, per-rank seeding, and the non-finite guards with their counts.

    Manual optimisation; ``global_step`` is never used for progress (it counts every optimiser). Under
    :class:`~distillbench.distributed.NetworkDDPStrategy` each network named in ``ddp_networks`` gets its
    own DDP; a method calls ``self.synced(name)`` where that network's gradients must be reduced.
    """

    #: the trainable networks (attribute names) that NetworkDDPStrategy wraps one by one
    ddp_networks: tuple[str, ...] = ()

    def __init__(self, teacher: Denoiser, seed: int = 0):
        super().__init__()
        self.automatic_optimization = False
        self._teacher = [freeze(teacher)]  # a list: outside the module tree (no checkpoint, no DDP)
        self.sample_shape = tuple(teacher.sample_shape)
        self.num_classes = int(getattr(teacher, "num_classes", 0))
        self.bounded = bool(getattr(teacher, "bounded", True))  # the teacher's data range is its samples'
        self.seed = int(seed)
        self.register_buffer("nimg", torch.zeros((), dtype=torch.float64))
        self.register_buffer("tfe", torch.zeros((), dtype=torch.float64))  # teacher-forward equivalents
        self.register_buffer("train_seconds", torch.zeros((), dtype=torch.float64))  # in training steps
        self._step_start = time.perf_counter()
        for name in ("gen_steps", "batches_trained", "dropped_samples", "nonfinite_grads"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self._parameter_counts: dict[int, int] = {}
        self._host_counts: dict[str, tuple] = {}  # buffer name -> (its identity and version, its value)
        self._ddp: dict[str, torch.nn.Module] = {}  # a plain dict: the DDP wrappers stay out of the tree
        self._train_metrics: dict = {}

    @property
    def teacher(self) -> Denoiser:
        return self._teacher[0]

    def setup(self, stage: str) -> None:
        self._teacher[0].to(self.device)

    @property
    def kimg(self) -> float:
        return self.count("nimg") / 1000

    def count(self, name: str) -> int | float:
        """The counter buffer ``name`` (``gen_steps``, ``nimg``, ...) as a Python number.

        Reading a GPU tensor waits for the GPU, and the methods and callbacks read these every step, so the
        value is kept on the host and read from the device only after something other than
        :meth:`advance_count` changed the buffer (a loaded checkpoint, ``fill_``, a move): the buffer's
        version counter tells."""
        buffer = getattr(self, name)
        identity = (buffer.data_ptr(), buffer.device, buffer._version)
        cached = self._host_counts.get(name)
        if cached is None or cached[0] != identity:
            cached = self._host_counts[name] = (identity, buffer.item())
        return cached[1]

    def advance_count(self, name: str, amount: int | float) -> None:
        """Add ``amount`` to the counter buffer ``name`` and to its host value alike."""
        value = self.count(name) + amount
        buffer = getattr(self, name)
        buffer += amount
        self._host_counts[name] = ((buffer.data_ptr(), buffer.device, buffer._version), value)

    # ---- compute accounting -------------------------------------------------------------------------------
    def anatomy(self) -> list[tuple[torch.nn.Module, int, int]]:
        """(network, forward passes, backward passes) per training sample of the current step."""
        raise NotImplementedError

    def parameters_of(self, module: torch.nn.Module) -> int:
        key = id(module)
        if key not in self._parameter_counts:
            self._parameter_counts[key] = sum(p.numel() for p in module.parameters())
        return self._parameter_counts[key]

    def cost_of(self, anatomy) -> float:
        """Teacher-forward equivalents of one sample through ``anatomy``'s passes."""
        teacher = self.parameters_of(self._teacher[0])
        return sum(forward_equivalents(f, b, self.parameters_of(net), teacher) for net, f, b in anatomy)

    def tfe_per_sample(self) -> float:
        """Teacher-forward equivalents of one training sample of the current step (:meth:`anatomy`)."""
        return self.cost_of(self.anatomy())

    def spend(self, samples: int) -> None:
        """Count a step of ``samples`` (the global batch) at the current step's cost, and its wall time (from
        the batch's start: evaluations and checkpoints, which run after it, are not counted)."""
        self.tfe += samples * self.tfe_per_sample()
        self.train_seconds += time.perf_counter() - self._step_start

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()

    def fit_budget(self, tfe: float, batch_size: int) -> float:
        """Set the method's duration so that training spends ``tfe``; returns that duration in kimg."""
        raise NotImplementedError

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.batches_trained += 1  # where the data resumes (DataPosition)
        if self._train_metrics and self.trainer._logger_connector.should_update_logs:
            self.log_dict(self._train_metrics, prog_bar=True)
        self._train_metrics = {}

    def attach_ddp(self, wrapped: dict[str, torch.nn.Module]) -> None:
        """Use these DDP wrappers (by network name) for :meth:`synced`; ``{}`` detaches them."""
        self._ddp = dict(wrapped)

    def synced(self, name: str) -> torch.nn.Module:
        """Network ``name`` as a gradient-reducing DDP wrapper under DDP, else the network itself."""
        return self._ddp.get(name) or getattr(self, name)

    def log_train(self, metrics: dict) -> None:
        """This step's ``train/*`` scalars for the progress bar and the loggers. They are handed to Lightning
        at the batch's end, and only on the steps it writes logs (every ``trainer.log_every_n_steps``, and
        the last, which the callbacks decide before then): each ``self.log`` costs ~0.6 ms on the CPU
        (Lightning moves its result metric at every call), ~5 ms a step for eight scalars (``make bench``)."""
        self._train_metrics = metrics

    def rank_and_world(self) -> tuple[int, int]:
        return (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)

    def seeded_generator(self, *key: int, per_rank: bool = True) -> torch.Generator:
        """A generator seeded by (seed, rank, generator step, *key), or without the rank when shared."""
        rank = (self.rank_and_world()[0],) if per_rank else ()
        state = np.random.SeedSequence([self.seed, *rank, self.count("gen_steps"), *key]).generate_state(
            1, np.uint64
        )
        return torch.Generator(device=self.device).manual_seed(int(state[0] >> 1))

    def rank_rows(self, draw, n: int, *shape: int) -> torch.Tensor:
        """This rank's ``n`` rows of the global batch ``draw((W·n, *shape))`` drawn alike on every rank."""
        rank, world = self.rank_and_world()
        return draw((world * n, *shape))[rank * n : (rank + 1) * n]

    def finite_mean(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Mean over the samples whose loss is finite; the others are dropped and counted. Without a finite
        sample the loss is 0, and so are its gradients (after :meth:`repair_gradients`). Masked, not indexed:
        boolean indexing and a Python ``if`` on the mask would each wait for the GPU."""
        ok = torch.isfinite(per_sample)
        self.dropped_samples += (~ok).sum()
        return torch.where(ok, per_sample, 0.0).sum() / ok.sum().clamp_min(1)

    def step_optimizer(self, opt, loss, params, scale: float = 1.0, lr=None, grad_clip=None) -> None:
        """One guarded update: set ``lr``, backward of scale·loss, repair non-finite gradients, clip, step.

        Methods pass their configured ``lr`` at every step: a resumed run's optimiser state carries the rate
        it was saved with, and a rate changed on resume must take effect."""
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss * scale)
        params = [p for p in params if p.grad is not None]
        self.repair_gradients(params)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if torch.is_autocast_enabled(self.device.type):
            # Lightning's autocast spans the whole training step, and autocast's cache of low-precision
            # weight copies does not notice in-place updates: without this, a second ψ-update in the same
            # step (fake_updates > 1) would run on the weights from before the first.
            torch.clear_autocast_cache()

    def repair_gradients(self, params) -> None:
        """Count non-finite gradient entries and replace them (NaN → 0, ±Inf → ±1e5).

        On the CPU one fused check (the gradients' norms, finite when every entry is) decides, and the
        tensor-by-tensor pass runs only when it fails (``make bench``: the per-tensor check alone cost ~6 ms a
        step). On a GPU that check would make the host wait for the GPU every update, so the repair runs
        unconditionally on one flat copy of the gradients (:func:`repair_flat`), a handful of kernels."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        if grads[0].device.type != "cpu":
            self.nonfinite_grads += repair_flat(grads)
            return
        if torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            return
        for grad in grads:
            bad = ~torch.isfinite(grad)
            self.nonfinite_grads += bad.sum()
            torch.nan_to_num_(grad, nan=0.0, posinf=1e5, neginf=-1e5)


def repair_flat(grads: list[torch.Tensor]) -> torch.Tensor:
    """Replace the non-finite entries of ``grads`` in place (NaN → 0, ±Inf → ±1e5) through one flat copy,
    without reading anything back to the host; returns their count (a tensor on the gradients' device)."""
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    bad = (~torch.isfinite(flat)).sum()
    torch.nan_to_num_(flat, nan=0.0, posinf=1e5, neginf=-1e5)
    parts = flat.split([grad.numel() for grad in grads])
    torch._foreach_copy_(grads, [part.view(grad.shape) for part, grad in zip(parts, grads, strict=True)])
    return bad


def adam(params, lr: float, betas, eps: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per parameter group when the parameters are on a GPU."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


class StagedDistillation(DistillationMethod):
    """A method trained in stages, each with its own budget (progressive halving; direct's two networks).

    A subclass sets :attr:`budgets` (one per stage, in ``budget_unit``: ``steps`` or ``kimg``) and the
    ``steps`` property (its sampler's NFE). A spent budget appends (``stage``, ``steps``, ``kimg``,
    ``gen_step``) to :attr:`finished_stages` for :class:`~distillbench.callbacks.StageEvaluation`, then
    :meth:`start_next_stage` runs, or after the last stage the trainer stops.
    """

    budget_unit: str = "steps"

    def __init__(self, teacher: Denoiser, seed: int = 0):
        super().__init__(teacher, seed)
        self.budgets: list[float] = []
        self.finished_stages: list[dict] = []
        for name in ("stage", "stage_step"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.register_buffer("stage_nimg", torch.zeros((), dtype=torch.float64))

    @property
    def done(self) -> bool:
        return self.count("stage") >= len(self.budgets)

    @property
    def current_stage(self) -> int:
        return min(self.count("stage"), len(self.budgets) - 1)

    def stage_progress(self) -> float:
        """The fraction of the current stage's budget spent."""
        spent = self.count("stage_nimg") / 1000 if self.budget_unit == "kimg" else self.count("stage_step")
        return spent / self.budgets[self.current_stage]

    def stopped(self) -> bool:
        """True (and the trainer told to stop) once every stage is done."""
        if self.done:
            self.trainer.should_stop = True
        return self.done

    def advance(self, images: int) -> None:
        """Count the step and, once the stage's budget is spent, finish the stage."""
        self.spend(images)
        for name, amount in (("gen_steps", 1), ("stage_step", 1), ("nimg", images), ("stage_nimg", images)):
            self.advance_count(name, amount)
        if self.stage_progress() >= 1.0:
            self.finish_stage()

    def finish_stage(self) -> None:
        record = {"stage": self.current_stage, "steps": self.steps, "kimg": self.kimg,
                  "gen_step": self.count("gen_steps"), "tfe": float(self.tfe)}  # fmt: skip
        self.finished_stages.append(record)
        self.advance_count("stage", 1)
        self.stage_step.zero_()
        self.stage_nimg.zero_()
        if not self.stopped():
            self.start_next_stage()

    def start_next_stage(self) -> None:
        """What changes between stages (nothing here)."""

    def stage_anatomy(self, stage: int) -> list[tuple[torch.nn.Module, int, int]]:
        """:meth:`anatomy` of stage ``stage``."""
        raise NotImplementedError

    def anatomy(self) -> list[tuple[torch.nn.Module, int, int]]:
        return self.stage_anatomy(self.current_stage)

    def fit_budget(self, tfe: float, batch_size: int) -> float:
        """Scale every stage's budget by one factor, so that the stages together spend ``tfe`` (at most)."""
        samples_per_unit = 1000 if self.budget_unit == "kimg" else batch_size
        costs = [self.cost_of(self.stage_anatomy(stage)) for stage in range(len(self.budgets))]
        planned = sum(b * samples_per_unit * c for b, c in zip(self.budgets, costs, strict=True))
        # whole steps per stage, so that the stages spend at most tfe
        steps = [max(1, math.floor(b * tfe / planned * samples_per_unit / batch_size)) for b in self.budgets]
        self.budgets = steps if self.budget_unit == "steps" else [n * batch_size / 1000 for n in steps]
        return sum(steps) * batch_size / 1000

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["finished_stages"] = self.finished_stages

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.finished_stages = list(checkpoint.get("finished_stages", []))


class ScoreDistillation(DistillationMethod):
    """Manual-optimisation base: alternates ψ (fake score) and θ (generator) updates."""

    ddp_networks = ("generator", "fake")

    #: generator time law of the method (``p_sim`` or ``p_edm``); a subclass may make it configurable
    time_law: str = "p_sim"

    #: whether the θ-step backpropagates through D_φ and D_ψ (SiD, SIM) or holds them constant (DI)
    scores_in_graph: bool = True

    def __init__(
        self,
        teacher: Denoiser,
        student: Denoiser | None = None,
        sigma_init: float = 2.5,
        lr: float = 1e-5,
        fake_lr: float | None = None,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        batch_size: int = 64,
        fake_updates: int = 1,
        ema_halflife_kimg: float = 20.0,
        ema_rampup_ratio: float | None = 0.05,
        loss_scaling: float = 1.0,
        loss_scaling_g: float = 1.0,
        t_max: float = 0.8,
        seed: int = 0,
    ):
        super().__init__(teacher, seed)
        check_positive("method.sigma_init", sigma_init)
        check_positive("optim.lr", lr)
        check_positive("optim.fake_lr", fake_lr if fake_lr is not None else lr)
        if fake_updates < 1:
            raise ConfigError(f"method.fake_updates={fake_updates} must be >= 1")
        self.save_hyperparameters(ignore=["teacher", "student"])
        init = starting_network(teacher, student)
        self.generator = copy.deepcopy(init).requires_grad_(True).train()
        self.fake = copy.deepcopy(init).requires_grad_(True).train()
        self.ema = freeze(copy.deepcopy(self.generator))

    # ----------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        per_device_batch(self.hparams.batch_size, self.trainer.world_size, key="method.batch_size")

    @property
    def batch_per_device(self) -> int:
        return per_device_batch(self.hparams.batch_size, self.rank_and_world()[1], key="method.batch_size")

    def generator_for(self, phase: str, index: int = 0) -> torch.Generator:
        """The random stream of a phase (ψ-update ``index`` or the θ-update) of this generator step, the same
        on every rank (each keeps its own rows of every draw)."""
        return self.seeded_generator({"fake": 0, "gen": 1}[phase], index, per_rank=False)

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
        self.rng = self.generator_for(phase, index)
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

    def training_step(self, batch, batch_idx):
        labels = batch if self.num_classes and batch is not None and (batch >= 0).all() else None
        opt_g, opt_f = self.optimizers()
        h = self.hparams
        fake_lr = h.fake_lr if h.fake_lr is not None else h.lr
        for index in range(self.hparams.fake_updates):
            self.fake.requires_grad_(True)
            loss_f = self.finite_mean(self.fake_score_loss(labels, index))
            self.step_optimizer(opt_f, loss_f, self.fake.parameters(), h.loss_scaling, lr=fake_lr)
        # θ-step: ψ frozen and in eval mode (no dropout sample in its prediction, as in the official loops);
        # gradients flow through its input
        self.fake.requires_grad_(False)
        with evaluating(self.fake):
            x_g = self.generate(self.draw("gen"), labels, self.synced("generator"))
            loss_g = self.finite_mean(self.generator_loss(x_g, labels))
        self.step_optimizer(opt_g, loss_g, self.generator.parameters(), h.loss_scaling_g, lr=h.lr)
        self.fake.requires_grad_(True)
        self.after_generator_step()
        self.log_train(
            {"train/loss_fake": loss_f.detach(), "train/loss_gen": loss_g.detach(), "train/kimg": self.kimg,
             "train/gen_step": float(self.count("gen_steps")),
             "train/dropped_samples": self.dropped_samples.float(),
             "train/nonfinite_grads": self.nonfinite_grads.float()}
        )  # fmt: skip

    def anatomy(self) -> list[tuple[torch.nn.Module, int, int]]:
        """Per generator image: k ψ-steps (G forward; ψ forward and backward), then the θ-step (G forward and
        backward; φ and ψ forward, and backward when the scores are in the graph). SIM/SiD: 5 forwards and 4
        backwards at k = 1 (docs/algorithms.md §8); DI: 5 and 2."""
        k, through = self.hparams.fake_updates, int(self.scores_in_graph)
        return [(self.generator, k + 1, 1), (self.fake, k + 1, k + through), (self.teacher, 1, through)]

    def fit_budget(self, tfe: float, batch_size: int) -> float:
        """Whole generator steps that spend at most ``tfe`` (at least one)."""
        steps = max(1, math.floor(tfe / (batch_size * self.tfe_per_sample())))
        return steps * batch_size / 1000

    def after_generator_step(self) -> None:
        batch = self.hparams.batch_size
        self.spend(batch)
        self.advance_count("gen_steps", 1)
        self.advance_count("nimg", batch)
        h = self.hparams
        update_ema(self.ema, self.generator, ema_beta(batch, self.count("nimg"), h.ema_halflife_kimg,
                                                      h.ema_rampup_ratio))  # fmt: skip

    def configure_optimizers(self):
        h = self.hparams
        fake_lr = h.fake_lr if h.fake_lr is not None else h.lr
        return [adam(self.generator.parameters(), h.lr, h.betas, h.eps),
                adam(self.fake.parameters(), fake_lr, h.betas, h.eps)]  # fmt: skip

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels=None, use_ema: bool = True) -> torch.Tensor:
        """One-step samples of the EMA (or online) generator."""
        return self.generate(z, labels, self.ema if use_ema else self.generator)


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of |x| over all non-batch dimensions."""
    return x.abs().flatten(1).mean(1)


def per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def check_range(name: str, value: float, low: float, high: float = math.inf) -> None:
    if not (low <= value <= high):
        raise ConfigError(f"{name}={value} is out of range [{low}, {high}]")
