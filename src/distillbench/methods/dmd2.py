"""DMD2: improved distribution matching distillation (Yin et al., NeurIPS 2024; ``edm_guidance.py``).

With f_φ the teacher, f_ψ the fake denoiser, x_g = G(σ_c·z; σ_c) (σ_c = 80) and σ_i the 1000-level ρ = 7 grid
ordered small → large (docs/algorithms.md §10):

    θ-step   i ~ U{⌊0.02·1000⌋ … ⌊0.98·1000⌋},  x_t = x_g + σ_i·n   (f_φ, f_ψ under no_grad)
             w = mean|x_g − f_φ(x_t)|,  g = nan_to_num((f_ψ(x_t) − f_φ(x_t))/w)
             L_θ = ½·mean_pixels (x_g − sg(x_g − g))²   [+ λ_G·softplus(−ℓ(x_g))]      (∇_{x_g} = g / pixels)
    ψ-step   i ~ U{0 … 999},  L_ψ = (σ_i⁻² + σ_d⁻²)·mean_pixels (f_ψ(sg x_g + σ_i·n) − sg x_g)²
                                   [+ λ_D·(softplus(ℓ(sg x_g)) + softplus(−ℓ(x_real)))]

``fake_updates`` ψ-steps per θ-step (5 in the paper: the two time-scale rule). With ``gan``, ℓ is a small
head on the fake network's bottleneck; with ``diffusion_gan`` its inputs are first noised at σ_i,
i ~ U{0 … diffusion_gan_levels − 1}, else read at σ_0 = 0.002 without noise. AdamW for both optimisers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillbench.methods.base import evaluating
from distillbench.methods.bottleneck import bottleneck_of, with_bottleneck
from distillbench.methods.score import ScoreDistillation, mean_abs
from distillbench.rules import boolean, check, integer, number, optional
from distillbench.samplers.schedules import karras
from distillbench.teachers.denoiser import as_sigma_batch

LEVELS = 1000  # the σ grid's levels (DMD2's num_train_timesteps)


class GANHead(nn.Module):
    """DMD2's classifier on bottleneck features (B, C, H, W): a 4×4 stride-2 conv (a 3×3 conv that keeps
    the side below 4), GroupNorm, SiLU, a conv over the remaining side to 1×1, GroupNorm, SiLU, a 1×1 conv to
    one logit. On ImageNet-64's 8×8 bottleneck this is the paper's head. Vector features (B, C): Linear,
    SiLU, Linear."""

    def __init__(self, channels: int, side: int | None):
        super().__init__()
        c = channels
        if side is None:
            self.layers = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, 1))
            return
        first = nn.Conv2d(c, c, 4, stride=2, padding=1) if side >= 4 else nn.Conv2d(c, c, 3, padding=1)
        rest = side // 2 if side >= 4 else side
        groups = math.gcd(32, c)
        self.layers = nn.Sequential(first, nn.GroupNorm(groups, c), nn.SiLU(),
                                    nn.Conv2d(c, c, rest, stride=rest), nn.GroupNorm(groups, c), nn.SiLU(),
                                    nn.Conv2d(c, 1, 1))  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).flatten()


class DMD2(ScoreDistillation):
    ddp_networks = ("generator", "fake", "head")  # the head trains with the fake network, in its own DDP
    settings = {
        "gan": boolean, "gan_weight_d": number(ge=0), "gan_weight_g": number(ge=0), "diffusion_gan": boolean,
        "diffusion_gan_levels": integer(ge=1, le=LEVELS), "dm_min": number(ge=0, le=1),
        "dm_max": number(ge=0, le=1), "weight_decay": number(ge=0), "grad_clip": optional(number(gt=0)),
    }  # fmt: skip

    @classmethod
    def check_config(cls, method: DictConfig) -> None:
        check("method.dm_min", method.dm_min, number(le=method.dm_max), "method.dm_min <= method.dm_max")

    def __init__(self, *args, sigma_init: float = 80.0, gan: bool = False, gan_weight_d: float = 1e-2,
                 gan_weight_g: float = 3e-3, diffusion_gan: bool = True, diffusion_gan_levels: int = LEVELS,
                 dm_min: float = 0.02, dm_max: float = 0.98, weight_decay: float = 0.01,
                 grad_clip: float | None = 10.0, **kwargs):  # fmt: skip
        self.check_arguments(locals())
        self.check_config(OmegaConf.create({"dm_min": dm_min, "dm_max": dm_max}))
        super().__init__(*args, sigma_init=sigma_init, **kwargs)
        self.gan, self.diffusion_gan, self.diffusion_gan_levels = (
            bool(gan),
            bool(diffusion_gan),
            diffusion_gan_levels,
        )
        self.gan_weight_d, self.gan_weight_g = float(gan_weight_d), float(gan_weight_g)
        self.weight_decay, self.grad_clip = float(weight_decay), grad_clip
        self.dm_levels = (math.floor(dm_min * LEVELS), min(math.floor(dm_max * LEVELS), LEVELS - 1))
        self.trains_on_real_data = (
            self.gan
        )  # the discriminator needs real images; without it DMD2 is data-free
        self.register_buffer("sigmas", karras(LEVELS)[:-1].flip(0).float(), persistent=False)  # small → large
        self.head = self.make_head() if self.gan else None

    def make_head(self) -> GANHead:
        """A head sized by the bottleneck of one forward of the fake network."""
        x = torch.zeros(1, *self.sample_shape)
        with torch.no_grad(), evaluating(self.fake):
            _, features = with_bottleneck(self.fake, bottleneck_of(self.fake), x, torch.ones(1), None)
        return GANHead(features.shape[1], features.shape[-1] if features.ndim == 4 else None)

    # ---- the formulas ------------------------------------------------------------------------------------
    def grid_sigma(self, n: int, low: int, high: int) -> torch.Tensor:
        """σ_i, i ~ U{low … high}, from the phase's stream."""
        draw = lambda size: torch.randint(low, high + 1, size, generator=self.rng, device=self.device)  # noqa: E731
        return self.sigmas[self.rank_rows(draw, n)]

    def logit(self, x, labels, fake: nn.Module, head: nn.Module) -> torch.Tensor:
        """ℓ(x): the head on the fake network's bottleneck, at a diffusion-GAN σ_i (noised) or at σ_0."""
        if self.diffusion_gan:
            sigma = self.grid_sigma(x.shape[0], 0, self.diffusion_gan_levels - 1)
            x = self.noised(x, sigma)
        else:
            sigma = self.sigmas[:1].expand(x.shape[0])
        _, features = with_bottleneck(fake, bottleneck_of(self.fake), x, sigma, labels)
        return head(features)

    def generator_loss(self, x_g, labels):
        """θ-step (ψ and the head frozen, in eval mode; docs/algorithms.md §10)."""
        with torch.no_grad():
            sigma = self.grid_sigma(x_g.shape[0], *self.dm_levels)
            x_t = self.noised(x_g, sigma)
            p_real, p_fake = x_g - self.teacher(x_t, sigma, labels), x_g - self.fake(x_t, sigma, labels)
            grad = torch.nan_to_num((p_real - p_fake) / as_sigma_batch(mean_abs(p_real), x_g))
        loss = 0.5 * ((x_g - (x_g - grad).detach()) ** 2).flatten(1).mean(1)
        if self.gan:
            loss = loss + self.gan_weight_g * F.softplus(-self.logit(x_g, labels, self.fake, self.head))
        return loss

    def fake_loss(self, x_real, labels, index: int) -> torch.Tensor:
        """ψ-step (G in eval mode without gradient): the fake-score loss, and the discriminator's."""
        z = self.draw("fake", index)
        with torch.no_grad(), evaluating(self.generator):
            x_g = self.generate(z, labels)
        fake = self.synced("fake")
        sigma = self.grid_sigma(x_g.shape[0], 0, LEVELS - 1)
        weight = as_sigma_batch(sigma**-2 + self.teacher.sigma_data**-2, x_g)
        loss = (weight * (fake(self.noised(x_g, sigma), sigma, labels) - x_g) ** 2).flatten(1).mean(1)
        if self.gan:
            head = self.synced("head")
            real, generated = self.logit(x_real, labels, fake, head), self.logit(x_g, labels, fake, head)
            loss = loss + self.gan_weight_d * (F.softplus(generated) + F.softplus(-real))
        return loss

    # ---- the loop ----------------------------------------------------------------------------------------
    def fake_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.fake.parameters(), *(self.head.parameters() if self.gan else ())]

    def training_step(self, batch, batch_idx):
        x_real, labels = self.unpack(batch)
        opt_g, opt_f = self.optimizers()
        h = self.hparams
        for index in range(h.fake_updates):
            loss_f = self.finite_mean(self.fake_loss(x_real, labels, index))
            self.step_optimizer(
                opt_f, loss_f, self.fake_parameters(), h.loss_scaling, self.fake_lr, self.grad_clip
            )
        # θ-step: ψ and the head frozen and in eval mode (docs/algorithms.md §9); gradients reach x_g through
        # the head's input only
        frozen = [net for net in (self.fake, self.head) if net is not None]
        for net in frozen:
            net.requires_grad_(False)
        with evaluating(*frozen):
            x_g = self.generate(self.draw("gen"), labels, self.synced("generator"))
            loss_g = self.finite_mean(self.generator_loss(x_g, labels))
        self.step_optimizer(
            opt_g, loss_g, self.generator.parameters(), h.loss_scaling_g, h.lr, self.grad_clip
        )
        for net in frozen:
            net.requires_grad_(True)
        self.after_generator_step()
        self.log_step(loss_f, loss_g)

    def anatomy(self):
        """Per generator image, k = fake_updates: k ψ-steps (G forward; ψ forward and backward, with the GAN
        also ψ and the head on real and on generated images), then the θ-step (G forward and backward; φ and
        ψ forward without gradient, with the GAN also ψ and the head forward and backward). A backward from
        the bottleneck alone is counted as a whole backward of ψ: an upper bound, by the decoder's share."""
        k, gan = self.hparams.fake_updates, int(self.gan)
        fake = k * (1 + 2 * gan)  # per ψ-step: the EDM loss's pass, and the logits of real and generated
        passes = [(self.generator, k + 1, 1), (self.fake, fake + 1 + gan, fake + gan), (self.teacher, 1, 0)]
        return passes + ([(self.head, 2 * k + 1, 2 * k + 1)] if self.gan else [])

    def configure_optimizers(self):
        h = self.hparams
        adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=tuple(h.betas), eps=h.eps,  # noqa: E731
                                                     weight_decay=self.weight_decay)  # fmt: skip
        return [adamw(self.generator.parameters(), h.lr), adamw(self.fake_parameters(), self.fake_lr)]
