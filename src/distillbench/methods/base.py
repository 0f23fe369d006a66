"""The contract of a distillation method and its Lightning plumbing.

:class:`DistillationMethod` declares everything that training, evaluation, the leaderboard and the
benchmarks use of a method (its class attributes and abstract methods below, each with its docstring), and
holds what every method shares: the frozen teacher outside the module tree, the sample shape and classes,
progress in generator steps and kimg with host mirrors of the counters, per-rank seeding, DDP per network,
and the non-finite guards with their counts. Compute accounting is :mod:`distillbench.methods.accounting`;
the score methods' shared machinery :mod:`distillbench.methods.score`; staged methods
:mod:`distillbench.methods.staged`. A new method subclasses one of them and is one module, one config
(``conf/method/``) and its tests (docs/methods.md).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from distillbench.methods.accounting import ComputeAccounting
from distillbench.rules import OPTIONAL_POSITIVE, Rule, check, integer
from distillbench.teachers.denoiser import Denoiser, freeze


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


class DistillationMethod(ComputeAccounting, L.LightningModule):
    """A distillation strategy: what training, evaluation, the leaderboard and the benchmarks may use of it.

    Manual optimisation; ``global_step`` is never used for progress (it counts every optimiser). Under
    :class:`~distillbench.distributed.NetworkDDPStrategy` each network named in ``ddp_networks`` gets its
    own DDP; a method calls ``self.synced(name)`` where that network's gradients must be reduced.
    """

    #: the trainable networks (attribute names) that NetworkDDPStrategy wraps one by one
    ddp_networks: ClassVar[tuple[str, ...]] = ()
    #: whether training batches are the data module's samples (else label-only noise batches)
    trains_on_real_data: ClassVar[bool] = False
    #: whether the method ends itself after its last stage (else it trains for ``method.duration_kimg``)
    staged: ClassVar[bool] = False
    #: the weights :meth:`sample` uses: ``"ema"`` (an exponential moving average) or ``"online"``
    evaluated_with: ClassVar[str] = "online"
    #: the rules of the method's own keys (under ``method.``), merged along the class hierarchy; checked
    #: before any work (:mod:`distillbench.validation`) and by the constructors (:meth:`check_arguments`)
    settings: ClassVar[dict[str, Rule]] = {"batch_size": integer(ge=1), "duration_kimg": OPTIONAL_POSITIVE}

    def __init__(
        self, teacher: Denoiser, seed: int = 0, batch_size: int = 64, duration_kimg: float | None = None
    ):
        """``batch_size``: the global batch of a training step (divided over the processes);
        ``duration_kimg``: the generator kimg to train for (a staged method scales its stage budgets to it;
        null keeps them)."""
        super().__init__()
        self.check_arguments(locals())
        #: the global batch of a training step, over all processes
        self.batch_size = int(batch_size)
        #: the generator kimg the run trains for (None: the stages' own budgets)
        self.duration_kimg = None if duration_kimg is None else float(duration_kimg)
        self.automatic_optimization = False
        self._teacher = [freeze(teacher)]  # a list: outside the module tree (no checkpoint, no DDP)
        self.sample_shape = tuple(teacher.sample_shape)
        self.num_classes = int(getattr(teacher, "num_classes", 0))
        self.bounded = bool(getattr(teacher, "bounded", True))  # the teacher's data range is its samples'
        self.seed = int(seed)
        self.register_buffer("nimg", torch.zeros((), dtype=torch.float64))
        self.init_accounting()
        for name in ("gen_steps", "batches_trained", "dropped_samples", "nonfinite_grads"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self._host_counts: dict[str, tuple] = {}  # buffer name -> (its identity and version, its value)
        self._ddp: dict[str, torch.nn.Module] = {}  # a plain dict: the DDP wrappers stay out of the tree
        self._train_metrics: dict = {}
        #: the stages finished so far (stage, steps, kimg, gen_step, tfe): empty unless :attr:`staged`
        self.finished_stages: list[dict] = []

    # ---- the contract --------------------------------------------------------------------------------------
    @classmethod
    def method_settings(cls) -> dict[str, Rule]:
        """The rules of every key the method owns: its own :attr:`settings` over its bases'."""
        merged: dict[str, Rule] = {}
        for klass in reversed(cls.__mro__):
            merged |= klass.__dict__.get("settings", {})
        return merged

    @classmethod
    def check_arguments(cls, arguments: dict) -> None:
        """Check a constructor's arguments (its ``locals()``) that have a rule, by the same rules that the
        config is checked with before any work: a method built in Python fails as the command would."""
        rules = cls.method_settings()
        for key, value in arguments.items():
            if key in rules:
                check(f"method.{key}", value, rules[key])

    @classmethod
    def check_config(cls, method: DictConfig) -> None:
        """The checks that tie the method's keys together, after each passed its own rule (none here)."""

    @abc.abstractmethod
    def sample(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Samples from noise ``z`` (and labels) with the weights the method is evaluated with."""

    def planned_kimg(self) -> float:
        """The generator kimg the run will train for (a method that ends itself states its stages' sum)."""
        return self.duration_kimg

    @property
    @abc.abstractmethod
    def nfe(self) -> int:
        """Network evaluations per sample of :meth:`sample` (1 for a one-step generator)."""

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

    def seeded_stream(self, *key: int, per_rank: bool = True) -> torch.Generator:
        """A random stream (``torch.Generator``) seeded by (seed, rank, generator step, *key), or without the
        rank when shared by every rank."""
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

    def step_optimizer(
        self, opt, loss, params, scale: float = 1.0, lr=None, grad_clip=None, grad_clip_value=None
    ) -> None:
        """One guarded update: set ``lr``, backward of scale·loss, repair non-finite gradients, clip (the norm
        at ``grad_clip``, each entry at ±``grad_clip_value``), step.

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
        if grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, grad_clip_value)
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
