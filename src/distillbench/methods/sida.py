"""SiDA: adversarial Score identity Distillation (Zhou et al., ICLR 2025; SiD's ``sida`` branch).

The discriminator is the fake denoiser's own encoder: ℓ(x; σ) = the channel mean of f_ψ's bottleneck, a map
of logits (no extra weights). With λ(σ) = (σ² + σ_d²)/(σ·σ_d)², BCE(ℓ, 1) = softplus(−ℓ) and
BCE(ℓ, 0) = softplus(ℓ), each averaged over the logit map (docs/algorithms.md §13):

    ψ-step   σ ~ p_EDM, one n for both:  x_g = sg G(z),  (f_ψ, ℓ_g) at x_g + σn,  ℓ_r at x_real + σn
             L_ψ = λ(σ)·Σ_pixels (f_ψ − x_g)² + λ_D·λ(σ)·(BCE(ℓ_r, 1) + BCE(ℓ_g, 0))/2
    θ-step   σ ~ p_SIM,  x_t = x_g + σn,  (f_ψ, ℓ) at x_t (ψ frozen),  w = sg(mean|x_g − f_φ|) ≥ 1e-5
             L_SiD = Σ_pixels (f_φ − f_ψ) ⊙ [(f_φ − x_g) − α·(f_φ − f_ψ)] / w
             L_GAN = pixels · BCE(clamp(ℓ, ±10), 1) / w
             L_θ = ½·L_SiD + ½·λ_G·L_GAN from ``gan_start_kimg`` on, L_SiD before

The generator does not step before ``generator_start_kimg`` (the ψ/discriminator steps run alone). ψ's
gradient entries are clipped at ±``fake_grad_clip_value``. ``generator_run`` starts the generator and its EMA
from a finished SiD (or SiDA) run's EMA generator, the fake score from the teacher: SiD²A.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from distillbench.errors import ConfigError
from distillbench.methods.base import evaluating
from distillbench.methods.bottleneck import bottleneck_of, with_bottleneck
from distillbench.methods.score import per_sample_sum
from distillbench.methods.sid import SiD, sid_weight
from distillbench.rules import number, optional
from distillbench.samplers.schedules import sigma_p_edm
from distillbench.teachers.denoiser import as_sigma_batch
from distillbench.utils.checkpoints import read_checkpoint


def path_or_null(value) -> str | None:
    return (
        None
        if value is None or (isinstance(value, str) and value.strip())
        else "must be a run folder, or null"
    )


class SiDA(SiD):
    trains_on_real_data = True  # the discriminator's real images, and the generator's labels
    settings = {
        "gan_weight_d": number(ge=0), "gan_weight_g": number(ge=0), "gan_start_kimg": number(ge=0),
        "generator_start_kimg": number(ge=0), "fake_grad_clip_value": optional(number(gt=0)),
        "generator_run": path_or_null,
    }  # fmt: skip

    def __init__(self, *args, alpha: float = 1.0, gan_weight_d: float = 1.0, gan_weight_g: float = 1e-4,
                 gan_start_kimg: float = 200.0, generator_start_kimg: float = 0.0,
                 fake_grad_clip_value: float | None = 1.0, generator_run: str | None = None,
                 **kwargs):  # fmt: skip
        self.check_arguments(locals())
        super().__init__(*args, alpha=alpha, **kwargs)
        self.gan_weight_d, self.gan_weight_g = float(gan_weight_d), float(gan_weight_g)
        self.gan_start_kimg, self.generator_start_kimg = float(gan_start_kimg), float(generator_start_kimg)
        self.fake_grad_clip_value = fake_grad_clip_value
        if generator_run is not None:
            self.start_generator_from(Path(generator_run))

    def start_generator_from(self, run: Path) -> None:
        """Generator and EMA ← the EMA generator of the run's last checkpoint; ψ stays the teacher's copy."""
        path = run / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(
                f"method.generator_run={str(run)!r} holds no checkpoints/last.ckpt of a finished run"
            )
        state = read_checkpoint(path, map_location="cpu")["state_dict"]
        ema = {key.removeprefix("ema."): value for key, value in state.items() if key.startswith("ema.")}
        self.generator.load_state_dict(ema)
        self.ema.load_state_dict(ema)

    # ---- the formulas ------------------------------------------------------------------------------------
    @property
    def generator_on(self) -> bool:
        return self.kimg >= self.generator_start_kimg

    @property
    def gan_on(self) -> bool:
        return self.kimg >= self.gan_start_kimg

    def fake_and_logit(self, fake, x, sigma, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """f_ψ(x; σ) and ℓ(x; σ), the channel mean of f_ψ's bottleneck, from one pass."""
        d, features = with_bottleneck(fake, bottleneck_of(self.fake), x, sigma, labels)
        return d, features.mean(1, keepdim=True)

    def generator_loss(self, x_g, labels):
        """θ-step (ψ frozen, in eval mode; docs/algorithms.md §13)."""
        sigma = self.sample_sigma(x_g.shape[0])  # p_SIM
        x_t = self.noised(x_g, sigma)
        f_phi = self.teacher(x_t, sigma, labels)
        f_psi, logit = self.fake_and_logit(self.fake, x_t, sigma, labels)
        gap, w = f_phi - f_psi, sid_weight(x_g, f_phi)
        sid = per_sample_sum(gap * ((f_phi - x_g) - self.alpha * gap)) / w
        if not self.gan_on:
            return sid
        pixels = math.prod(x_g.shape[1:])
        gan = pixels * F.softplus(-logit.clamp(-10, 10)).flatten(1).mean(1) / w
        return 0.5 * sid + 0.5 * self.gan_weight_g * gan

    def fake_loss(self, x_real, labels, index: int) -> torch.Tensor:
        """ψ-step (G in eval mode without gradient): EDM's loss on generator images and the discriminator's
        BCE on real and generator images at the same σ and noise."""
        z = self.draw("fake", index)
        with torch.no_grad(), evaluating(self.generator):
            x_g = self.generate(z, labels)
        sigma = sigma_p_edm(self.randn(x_g.shape[0]))
        noise = as_sigma_batch(sigma, x_g) * self.randn(*x_g.shape)
        sd = self.teacher.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        fake = self.synced("fake")
        d, logit_g = self.fake_and_logit(fake, x_g + noise, sigma, labels)
        _, logit_r = self.fake_and_logit(fake, x_real + noise, sigma, labels)
        bce = F.softplus(-logit_r).flatten(1).mean(1) + F.softplus(logit_g).flatten(1).mean(1)
        return weight * per_sample_sum((d - x_g) ** 2) + self.gan_weight_d * weight * bce / 2

    # ---- the loop ----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x_real, labels = self.unpack(batch)
        opt_g, opt_f = self.optimizers()
        h = self.hparams
        for index in range(h.fake_updates):
            loss_f = self.finite_mean(self.fake_loss(x_real, labels, index))
            self.step_optimizer(opt_f, loss_f, self.fake.parameters(), h.loss_scaling, self.fake_lr,
                                grad_clip_value=self.fake_grad_clip_value)  # fmt: skip
        loss_g = None
        if self.generator_on:  # θ-step: ψ frozen and in eval mode (docs/algorithms.md §9)
            self.fake.requires_grad_(False)
            with evaluating(self.fake):
                x_g = self.generate(self.draw("gen"), labels, self.synced("generator"))
                loss_g = self.finite_mean(self.generator_loss(x_g, labels))
            self.step_optimizer(opt_g, loss_g, self.generator.parameters(), h.loss_scaling_g, h.lr)
            self.fake.requires_grad_(True)
        self.after_generator_step()
        self.log_step(loss_f, loss_g)

    def anatomy(self):
        """Per generator image, k = fake_updates: k ψ-steps (G forward; ψ forward and backward on generator
        and on real images), then, once the generator steps, the θ-step (G forward and backward; φ and ψ
        forward and backward through the input; the logit comes from ψ's pass). The backward from the real
        images' logit runs through the encoder alone and is counted as a whole one: an upper bound."""
        k, on = self.hparams.fake_updates, int(self.generator_on)
        return [(self.generator, k + on, on), (self.fake, 2 * k + on, 2 * k + on), (self.teacher, on, on)]
