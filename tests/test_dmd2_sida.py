"""DMD2 and SiDA: each loss against a direct transcription of its formula (docs/algorithms.md §10, §11) on the
same tensors and draws, one optimisation step on tiny networks, the passes per generator image counted with
hooks, the train/eval modes of each step, the paper configs, a learning check on the analytic digits mixture
and an exact resume after a kill."""

from __future__ import annotations

import json
import math

import hydra
import lightning as L
import pytest
import torch
import torch.nn.functional as F

from distillbench.callbacks import KimgBudget
from distillbench.data.digits import DigitsDataModule
from distillbench.data.noise import NoiseDataModule
from distillbench.errors import ConfigError
from distillbench.methods import DMD2, SiDA
from distillbench.methods.bottleneck import bottleneck_of
from distillbench.nets import MLPBackbone, SongUNet
from distillbench.samplers.schedules import karras
from distillbench.teachers.denoiser import EDMDenoiser, freeze
from tests.helpers import compose
from tests.test_budget import SampleCounter
from tests.test_methods import params, tiny_teacher

TOL = dict(rtol=1e-6, atol=1e-6)


def perturbed(method, scale: float = 0.05):
    """The method with its fake score moved away from the teacher it starts as (else its gaps are 0)."""
    stream = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in method.fake.parameters():
            p.add_(torch.randn(p.shape, generator=stream) * scale * p.abs().mean())
    return method


def inputs(method, n: int = 6, seed: int = 5):
    stream = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *method.sample_shape, generator=stream)
    x_real = torch.randn(n, *method.sample_shape, generator=stream).clamp(-1, 1)
    return z, x_real, torch.arange(n) % 10


def seeded(method, seed: int = 11) -> torch.Generator:
    """Seed the method's phase stream and return an identical stream for the transcription."""
    method.rng = torch.Generator().manual_seed(seed)
    return torch.Generator().manual_seed(seed)


GRID = karras(1000)[:-1].flip(0).float()  # DMD2's 1000 levels, small → large


def column(v, x):
    return v.reshape(-1, *[1] * (x.ndim - 1))


def head_logit(method, x, sigma, labels):
    """ℓ: the head on the fake network's mid-block output, by hand."""
    seen = []
    handle = method.fake.net.unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o))
    method.fake(x, sigma, labels)
    handle.remove()
    return method.head(seen[-1])


# ---- DMD2 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gan", [False, True])
def test_dmd2_generator_loss_is_its_formula(gan):
    method = perturbed(DMD2(tiny_teacher(), batch_size=6, gan=gan))
    z, _, labels = inputs(method)
    x_g = method.generate(z, labels).detach().requires_grad_(True)
    g = seeded(method)
    loss = method.generator_loss(x_g, labels)
    (grad_framework,) = torch.autograd.grad(loss.mean(), x_g)

    # the transcription: i ~ U{20 … 980}, x_t = x_g + σn, g = (p_real − p_fake)/mean|p_real|, ½·mean(g²)
    i = torch.randint(20, 981, (6,), generator=g)
    sigma = GRID[i]
    x_t = x_g.detach() + column(sigma, x_g) * torch.randn(x_g.shape, generator=g)
    with torch.no_grad():
        p_real = x_g - method.teacher(x_t, sigma, labels)
        p_fake = x_g - method.fake(x_t, sigma, labels)
        grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean((1, 2, 3), keepdim=True))
    expected = 0.5 * (grad**2).mean((1, 2, 3))
    pixels = math.prod(x_g.shape[1:])
    expected_grad = grad / (6 * pixels)  # ∇ of the batch mean: g / (batch · pixels)
    if gan:  # + 3e-3·softplus(−ℓ(x_g + σ_j n')), j ~ U{0 … 999}
        j = torch.randint(0, 1000, (6,), generator=g)
        x_d = x_g + column(GRID[j], x_g) * torch.randn(x_g.shape, generator=g)
        gan_term = 3e-3 * F.softplus(-head_logit(method, x_d, GRID[j], labels))
        expected = expected.detach() + gan_term
        expected_grad = expected_grad + torch.autograd.grad(gan_term.mean(), x_g)[0]
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(grad_framework, expected_grad, **TOL)
    assert grad_framework.abs().max() > 0


@pytest.mark.parametrize("diffusion_gan", [False, True])
def test_dmd2_fake_loss_is_its_formula(diffusion_gan):
    method = perturbed(DMD2(tiny_teacher(), batch_size=6, gan=True, diffusion_gan=diffusion_gan))
    _, x_real, labels = inputs(method)
    loss = method.fake_loss(x_real, labels, 0)

    # the stream of ψ-step 0 is keyed by (seed, generator step, phase, index): the same one again
    g = method.stream_for("fake", 0)
    z = torch.randn(6, *method.sample_shape, generator=g)
    with torch.no_grad():
        x_g = method.generate(z, labels)
    sigma = GRID[torch.randint(0, 1000, (6,), generator=g)]
    x_t = x_g + column(sigma, x_g) * torch.randn(x_g.shape, generator=g)
    weight = column(sigma**-2 + 0.5**-2, x_g)
    expected = (weight * (method.fake(x_t, sigma, labels) - x_g) ** 2).mean((1, 2, 3))

    def logit(x):  # diffusion GAN: σ_j, j ~ U{0 … 999}, noised; else σ_0 = 0.002 without noise
        if not diffusion_gan:
            return head_logit(method, x, GRID[:1].expand(6), labels)
        s = GRID[torch.randint(0, 1000, (6,), generator=g)]
        return head_logit(method, x + column(s, x) * torch.randn(x.shape, generator=g), s, labels)

    real, generated = logit(x_real), logit(x_g)
    expected = expected + 1e-2 * (F.softplus(generated) + F.softplus(-real))
    torch.testing.assert_close(loss, expected, **TOL)


# ---- SiDA --------------------------------------------------------------------------------------------------
def encoder_logit(method, x, sigma, labels):
    seen = []
    handle = method.fake.net.unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o))
    out = method.fake(x, sigma, labels)
    handle.remove()
    return out, seen[-1].mean(1, keepdim=True)


@pytest.mark.parametrize("gan_on", [False, True])
def test_sida_generator_loss_is_its_formula(gan_on):
    method = perturbed(SiDA(tiny_teacher(), batch_size=6, alpha=1.2, gan_weight_g=0.3,
                            gan_start_kimg=0 if gan_on else 1))  # fmt: skip
    z, _, labels = inputs(method)
    x_g = method.generate(z, labels)
    g = seeded(method)
    loss = method.generator_loss(x_g, labels)

    t = torch.rand(6, generator=g) * 0.8  # p_SIM
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    sigma = (a + (1 - t) * (b - a)) ** 7
    x_t = x_g + column(sigma, x_g) * torch.randn(x_g.shape, generator=g)
    f_phi = method.teacher(x_t, sigma, labels)
    f_psi, logit = encoder_logit(method, x_t, sigma, labels)
    w = (x_g - f_phi).abs().mean((1, 2, 3)).detach().clamp_min(1e-5)
    sid = ((f_phi - f_psi) * ((f_phi - x_g) - 1.2 * (f_phi - f_psi))).sum((1, 2, 3)) / w
    bce = F.binary_cross_entropy_with_logits(logit.clamp(-10, 10), torch.ones_like(logit), reduction="none")
    gan = 64 * bce.mean((1, 2, 3)) / w
    expected = 0.5 * sid + 0.5 * 0.3 * gan if gan_on else sid
    torch.testing.assert_close(loss, expected, **TOL)
    grads = [torch.autograd.grad(v.mean(), x_g, retain_graph=True)[0] for v in (loss, expected)]
    torch.testing.assert_close(grads[0], grads[1], **TOL)


def test_sida_fake_loss_is_its_formula():
    method = perturbed(SiDA(tiny_teacher(), batch_size=6, gan_weight_d=0.7))
    _, x_real, labels = inputs(method)
    loss = method.fake_loss(x_real, labels, 0)

    g = method.stream_for("fake", 0)  # the same stream again
    with torch.no_grad():
        x_g = method.generate(torch.randn(6, *method.sample_shape, generator=g), labels)
    sigma = (torch.randn(6, generator=g) * 1.2 - 1.2).exp()  # p_EDM
    n = column(sigma, x_g) * torch.randn(x_g.shape, generator=g)  # one noise for both
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    d, logit_g = encoder_logit(method, x_g + n, sigma, labels)
    _, logit_r = encoder_logit(method, x_real + n, sigma, labels)
    bce = lambda logit, y: F.binary_cross_entropy_with_logits(  # noqa: E731
        logit, torch.full_like(logit, y), reduction="none").mean((1, 2, 3))  # fmt: skip
    expected = lam * ((d - x_g) ** 2).sum((1, 2, 3)) + 0.7 * lam * (bce(logit_r, 1.0) + bce(logit_g, 0.0)) / 2
    torch.testing.assert_close(loss, expected, **TOL)
