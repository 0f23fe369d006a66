"""A diffusers DDPM/DDIM model (ε-, v- or x₀-prediction) as an EDM denoiser D(x; σ).

VP ↔ VE (docs/algorithms.md §6, "EDM translation"). The schedule's ᾱ_t gives the VP pair α_t = sqrt(ᾱ_t),
σ_vp,t = sqrt(1 − ᾱ_t) with z_t = α_t x₀ + σ_vp,t ε, and the VE noise level

    σ_t = σ_vp,t / α_t = sqrt((1 − ᾱ_t) / ᾱ_t),          x_σ = z_t / α_t = x₀ + σ_t ε.

For an input x at VE level σ:

    α = 1 / sqrt(1 + σ²),   σ_vp = σ·α,   z = α·x                         (VP input)
    t = t(σ)  by linear interpolation of the table (log σ_t, t), clamped to [0, T − 1]
    ε-prediction:       D = (z − σ_vp ε̂) / α = x − σ·ε̂
    v-prediction:       v = α ε − σ_vp x₀   ⇒   D = α·z − σ_vp·v̂
    sample-prediction:  D = x̂₀ (the model output)

so ``sigma_min``/``sigma_max`` are the table's ends. Classifier-free guidance combines the model outputs,
out = out_∅ + w·(out_c − out_∅), before the conversion. The conversion runs in fp32 whatever the model dtype.
"""

from __future__ import annotations

import os

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn

from distillbench.teachers.checkpoint import check_teacher_fits
from distillbench.teachers.denoiser import Denoiser, as_sigma_batch, freeze

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
UNET_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, UNet2DConditionModel)}


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through (xp, fp), xp strictly increasing, x clamped to [xp₀, xp₋₁]."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1)
    w = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


def batched(e: torch.Tensor, n: int) -> torch.Tensor:
    """Expand a batch-1 conditioning tensor to batch ``n``."""
    return e.expand(n, *e.shape[1:]) if e.shape[0] == 1 else e


class DiffusersDenoiser(Denoiser):
    """EDM denoiser around a diffusers UNet trained with a discrete DDPM schedule ``alphas_cumprod``.

    ``encoder_hidden_states`` (fixed here, or per call in :meth:`forward`) feeds a UNet2DConditionModel;
    ``guidance_scale`` w ≠ 1 needs ``uncond_hidden_states``. Integer ``labels`` feed a class-conditional UNet.
    ``sample_shape`` and ``num_classes`` default to the model's config.
    """

    def __init__(
        self,
        model: nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        sigma_data: float = 0.5,
        sample_shape: tuple[int, ...] | list[int] | None = None,
        num_classes: int | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        uncond_hidden_states: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if guidance_scale != 1.0 and uncond_hidden_states is None:
            raise ValueError("guidance_scale != 1 needs uncond_hidden_states (the empty-prompt embedding)")
        self.model = model
        self.prediction_type = prediction_type
        self.sigma_data = float(sigma_data)
        self.guidance_scale = float(guidance_scale)
        config = getattr(model, "config", None)
        self.cross_attention = getattr(config, "cross_attention_dim", None) is not None
        self.sample_shape = tuple(int(s) for s in (sample_shape or self.config_shape(config)))
        self.num_classes = int(
            num_classes if num_classes is not None else getattr(config, "num_class_embeds", None) or 0
        )
        self.register_buffer("log_sigmas", self.log_sigma_table(alphas_cumprod), persistent=False)
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())
        self.register_buffer("hidden_states", encoder_hidden_states, persistent=False)
        self.register_buffer("uncond_hidden_states", uncond_hidden_states, persistent=False)
        freeze(self)

    @staticmethod
    def config_shape(config) -> tuple[int, ...]:
        """(C, H, W) from a diffusers UNet config."""
        if config is None:
            raise ValueError("sample_shape is required for a model without a diffusers config")
        size = config.sample_size
        return (config.in_channels, *((size, size) if isinstance(size, int) else size))

    @staticmethod
    def log_sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """log σ_t = ½ log((1 − ᾱ_t)/ᾱ_t), t = 0 … T − 1, computed in fp64 and stored in fp32."""
        # A zero-terminal-SNR schedule has ᾱ = 0 at t = T − 1; clamp it as diffusers' DDIM does (2⁻²⁴).
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp_min(2.0**-24)
        log_sigmas = 0.5 * torch.log((1 - abar) / abar)
        if not (log_sigmas.diff() > 0).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (σ_t strictly increasing)")
        return log_sigmas.float()

    def timesteps(self) -> torch.Tensor:
        """The integer timesteps 0 … T − 1 of the table, as floats."""
        return torch.arange(len(self.log_sigmas), device=self.log_sigmas.device, dtype=torch.float32)

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep t with σ(t) = σ (interpolated in log σ, clamped to [0, T − 1])."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.log_sigmas.device).log()
        return interp(log_sigma, self.log_sigmas, self.timesteps())

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t): the table, linear in log σ between integer timesteps."""
        t = torch.as_tensor(t, dtype=torch.float32, device=self.log_sigmas.device)
        return interp(t, self.timesteps(), self.log_sigmas).exp()

    def forward(
        self,
        x: torch.Tensor,
        sigma,
        labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        s = as_sigma_batch(sigma, x)
        alpha = (1 + s**2).rsqrt()
        z = alpha * x
        out = self.guided_output(z, self.t_of_sigma(s.flatten()), labels, encoder_hidden_states)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return alpha * z - s * alpha * out
        return out

    def guided_output(self, z, t, labels, encoder_hidden_states) -> torch.Tensor:
        """The model output in fp32, with classifier-free guidance out_∅ + w·(out_c − out_∅) when w ≠ 1."""
        cond = encoder_hidden_states if encoder_hidden_states is not None else self.hidden_states
        if self.cross_attention and cond is None:
            raise ValueError("this UNet has cross-attention: pass encoder_hidden_states")
        if cond is None or self.guidance_scale == 1.0:
            return self.model_output(z, t, labels, cond)
        n = z.shape[0]
        both = torch.cat([batched(cond, n), batched(self.uncond_hidden_states, n)])
        labels2 = None if labels is None else torch.cat([labels, labels])
        out_c, out_u = self.model_output(torch.cat([z, z]), torch.cat([t, t]), labels2, both).chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def model_output(self, z, t, labels, cond) -> torch.Tensor:
        """One model call in its own dtype; keeps the first C channels (drops a learned variance)."""
        dtype = next(self.model.parameters(), torch.empty(0)).dtype
        kwargs = {}
        if self.num_classes:
            kwargs["class_labels"] = labels
        if cond is not None:
            kwargs["encoder_hidden_states"] = batched(cond, z.shape[0]).to(dtype)
        out = self.model(z.to(dtype), t, **kwargs)
        out = getattr(out, "sample", out)
        return out[:, : z.shape[1]].to(torch.float32)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        subfolder: str | None = None,
        scheduler_subfolder: str | None = None,
        prediction_type: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        scheduler_path: str | os.PathLike | None = None,
        datamodule=None,
        **kw,
    ) -> DiffusersDenoiser:
        """Load a UNet and its scheduler from a pipeline folder (``unet/``, ``scheduler/``), a UNet folder
        with ``scheduler_config.json`` beside or under ``scheduler/``, or a hub id (downloads).

        ``scheduler_path`` points to a separate scheduler folder; ``prediction_type`` overrides the
        scheduler's; ``kw`` goes to the constructor. With ``datamodule``, the teacher must fit its data.
        """
        path = str(path_or_repo)
        subfolders = [subfolder] if subfolder else ["unet", None]
        unet_sub, config = find_config(path, UNet2DModel, subfolders, "UNet")
        model_cls = UNET_CLASSES.get(config.get("_class_name"))
        if model_cls is None:
            raise ValueError(f"{path!r}: {config.get('_class_name')!r} is not one of {sorted(UNET_CLASSES)}")
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
        model = model_cls.from_pretrained(path, subfolder=unet_sub, torch_dtype=torch_dtype)
        scheduler = load_scheduler(str(scheduler_path or path), scheduler_subfolder)
        prediction_type = prediction_type or scheduler.config.prediction_type
        teacher = cls(model, scheduler.alphas_cumprod, prediction_type, **kw)
        if datamodule is not None:
            check_teacher_fits(teacher, datamodule, str(path_or_repo))
        return teacher


def find_config(path: str, config_cls, subfolders: list[str | None], what: str) -> tuple[str | None, dict]:
    """(subfolder, config) for the first of ``subfolders`` of ``path`` holding ``config_cls.config_name``."""
    name, error = config_cls.config_name, None
    for sub in subfolders:
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, sub or "", name)):
            continue
        try:
            return sub, config_cls.load_config(path, subfolder=sub)
        except OSError as err:  # not in the hub repo, or offline
            error = err
    where = ", ".join(f"{sub}/" if sub else "./" for sub in subfolders)
    raise FileNotFoundError(f"no {what} config ({name}) found in {path!r} (looked in {where})") from error


def load_scheduler(path: str, subfolder: str | None = None):
    """The scheduler named by ``_class_name`` in its config (DDPMScheduler if unknown); it must have ᾱ_t."""
    subfolders = [subfolder] if subfolder else ["scheduler", None]
    _, config = find_config(path, DDPMScheduler, subfolders, "scheduler")
    scheduler_cls = getattr(diffusers, str(config.get("_class_name")), DDPMScheduler)
    scheduler = scheduler_cls.from_config(config)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{path!r}: {type(scheduler).__name__} has no alphas_cumprod (not a DDPM schedule)")
    return scheduler
