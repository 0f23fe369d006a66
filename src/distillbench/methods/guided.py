"""Guided distillation (Meng et al., CVPR 2023, §4; docs/algorithms.md §6) of a class-conditional EDM teacher.

Stage one distils classifier-free guidance into one network D_η(x; σ, c, w) conditioned on the guidance
weight w ~ U[w_min, w_max], with the target (w = 0 is the plain conditional model)

    x̂^w = (1 + w)·D_T(x_σ; σ, c) − w·D_T(x_σ; σ, ∅)

under the same weighted x-MSE as progressive distillation, at σ drawn uniformly from the positive points
of the finest grid (the grid the first halving stage's teacher steps on). Stage two is progressive
distillation (:mod:`distillbench.methods.progressive`) of that model at the fixed weight ``w``: stage k ≥ 1
halves 2·n_start steps to n_start/2^(k−1).

w enters like the σ-embedding: a Fourier embedding of w and an MLP whose last layer starts at zero, added to
the backbone's σ-embedding, so the student starts as the teacher's conditional model.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillbench.errors import ConfigError
from distillbench.methods.progressive import ProgressiveDistillation, loss_weight, stage_budgets
from distillbench.nets.mlp import FourierEmbedding, MLPBackbone
from distillbench.rules import (
    OPTIONAL_POSITIVE,
    check,
    lookup,
    number,
    optional,
    positive_per_stage,
)
from distillbench.teachers.denoiser import Denoiser, EDMDenoiser, as_sigma_batch


def embedding_site(denoiser: Denoiser) -> tuple[nn.Module, int]:
    """The module whose output is the backbone's σ-embedding, and that embedding's width."""
    net = getattr(denoiser, "net", None)
    if isinstance(net, MLPBackbone):
        return net.embed, 2 * net.embed.freqs.numel()
    unet = getattr(net, "unet", None)
    if unet is not None and hasattr(unet, "time_embedding"):
        return unet.time_embedding, unet.time_embedding.linear_2.out_features
    raise ConfigError(
        "guided distillation adds its w-embedding to the σ-embedding of an EDMDenoiser around MLPBackbone "
        f"or UNetBackbone; the student {type(denoiser).__name__}({type(net).__name__}) has neither"
    )


class WeightEmbedding(nn.Module):
    """e(w) = Linear(SiLU(Linear(Fourier(w)))), its last layer zero so that e(w) = 0 at the start."""

    def __init__(self, dim: int, fourier_dim: int = 64):
        super().__init__()
        self.fourier = FourierEmbedding(fourier_dim, max_period=100.0)
        self.hidden = nn.Linear(fourier_dim, dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.silu(self.hidden(self.fourier(w))))


class GuidedStudent(Denoiser):
    """D_η(x; σ, c, w): a copy of an EDM denoiser with w added to its σ-embedding (w defaults to ``w``)."""

    def __init__(self, denoiser: EDMDenoiser, w: float):
        super().__init__()
        self.denoiser = copy.deepcopy(denoiser)
        site, dim = embedding_site(self.denoiser)
        self.w_embed = WeightEmbedding(dim)
        self.w = float(w)
        self._w: torch.Tensor | None = None  # the w of the forward pass in progress
        site.register_forward_hook(self.add_weight_embedding)
        for name in ("sample_shape", "num_classes", "sigma_data", "sigma_min", "sigma_max"):
            setattr(self, name, getattr(denoiser, name))

    def add_weight_embedding(self, module, inputs, output):
        return output if self._w is None else output + self.w_embed(self._w).to(output.dtype)

    def forward(self, x: torch.Tensor, sigma, labels=None, w: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.full((x.shape[0],), self.w, device=x.device) if w is None else w.reshape(-1).float()
        self._w = w.expand(x.shape[0])
        try:
            return self.denoiser(x, sigma, labels)
        finally:
            self._w = None


@torch.no_grad()
def guided_target(teacher: Denoiser, x, sigma, labels, w: torch.Tensor) -> torch.Tensor:
    """x̂^w = (1 + w)·D(x; σ, c) − w·D(x; σ, ∅) (labels None is the null token)."""
    w = as_sigma_batch(w, x)
    return (1 + w) * teacher(x, sigma, labels) - w * teacher(x, sigma, None)


class GuidedDistillation(ProgressiveDistillation):
    """Stage 0 distils guidance into a w-conditioned student; stages 1 … halve its steps at fixed ``w``.

    ``guidance_kimg``/``guidance_iterations`` is stage 0's budget (same unit as the halving stages'),
    ``guidance_lr`` its learning rate (default: the first halving stage's).
    """

    settings = {"w": number(ge=0), "w_min": number(ge=0), "w_max": number(ge=0),
                "guidance_kimg": optional(positive_per_stage),
                "guidance_iterations": optional(positive_per_stage),
                "guidance_lr": OPTIONAL_POSITIVE}  # fmt: skip

    @classmethod
    def check_config(cls, method: DictConfig) -> None:
        """The halving stages' checks, 0 <= w_min <= w <= w_max, and stage 0's budget in the same unit."""
        unit = super().check_config(method)
        check("method.w_min", method.w_min, number(ge=0, le=method.w_max), "0 <= w_min <= w_max")
        within = number(ge=method.w_min, le=method.w_max)
        check("method.w", method.w, within, "method.w_min <= w <= method.w_max")
        guidance = (lookup(method, "guidance_kimg"), lookup(method, "guidance_iterations"))
        guidance_unit = stage_budgets(*guidance, 1, prefix="method.guidance")[0]
        if guidance_unit != unit:
            key = f"method.guidance_{guidance_unit}"
            raise ConfigError(
                f"{key}={lookup(method, f'guidance_{guidance_unit}')!r} is in {guidance_unit} but the stage "
                f"budgets in {unit}; give method.guidance_{unit} instead (and {key}=null)"
            )

    def __init__(
        self,
        teacher: Denoiser,
        student: Denoiser | None = None,
        w: float = 2.0,
        w_min: float = 0.0,
        w_max: float = 4.0,
        guidance_kimg: float | None = None,
        guidance_iterations: int | None = None,
        guidance_lr: float | None = None,
        **kwargs,
    ):
        if not int(getattr(teacher, "num_classes", 0)):
            raise ConfigError(
                "method=guided needs a class-conditional teacher (num_classes > 0); use method=progressive "
                "for an unconditional one"
            )
        self.check_arguments(locals())
        unit, budget = stage_budgets(guidance_kimg, guidance_iterations, 1, prefix="method.guidance")
        init = student if student is not None else teacher
        duration_kimg = kwargs.pop("duration_kimg", None)  # scales every stage, the guidance stage too
        super().__init__(teacher, GuidedStudent(init, w), **kwargs)
        self.check_config(OmegaConf.create(dict(self.hparams)))  # the checks that tie the keys together
        self.stage_steps_list.insert(0, 2 * self.n_start)  # stage 0's model samples on the finest grid
        self.duration_kimg = duration_kimg
        self.set_budgets(unit, [budget[0], *self.budgets])
        self.lrs.insert(0, float(guidance_lr) if guidance_lr is not None else self.lrs[0])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None)
        if data is not None and not getattr(data, "num_classes", 0):
            name = getattr(data, "name", type(data).__name__)
            raise ConfigError(
                f"method=guided needs labelled data, data={name} has none; use the teacher's labelled data"
            )

    def distillation_loss(self, x0: torch.Tensor, labels, rng: torch.Generator) -> torch.Tensor:
        if self.current_stage > 0:
            return super().distillation_loss(x0, labels, rng)
        return self.guidance_loss(x0, labels, rng)

    def guidance_loss(self, x0: torch.Tensor, labels, rng: torch.Generator) -> torch.Tensor:
        """Per-sample w(σ)·mean‖D_η(x_σ; σ, c, w) − x̂^w‖², σ on the finest grid, w ~ U[w_min, w_max]."""
        h = self.hparams
        grid = self.schedule(2 * self.n_start)[:-1].to(self.device)
        sigma = grid[torch.randint(len(grid), (x0.shape[0],), generator=rng, device=self.device)]
        w = h.w_min + (h.w_max - h.w_min) * torch.rand(x0.shape[0], generator=rng, device=self.device)
        noise = torch.randn(x0.shape, generator=rng, device=self.device)
        x = x0 + as_sigma_batch(sigma, x0) * noise
        target = guided_target(self.teacher, x, sigma, labels, w)
        error = (self.synced("student")(x, sigma.float(), labels, w=w) - target) ** 2
        return loss_weight(sigma, self.weighting) * error.flatten(1).mean(1)
