"""SIM, SiD and Diff-Instruct: one optimisation step each, pass anatomy, identities and Gaussian gradients."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from distillbench.callbacks import KimgBudget
from distillbench.data.digits import DigitsDataModule
from distillbench.data.noise import NoiseDataModule
from distillbench.errors import ConfigError
from distillbench.methods import SIM, DiffInstruct, SiD
from distillbench.nets import UNetBackbone
from distillbench.teachers.denoiser import Denoiser, EDMDenoiser, as_sigma_batch, freeze

METHODS = {"sim": SIM, "sid": SiD, "di": DiffInstruct}


def tiny_teacher() -> EDMDenoiser:
    torch.manual_seed(0)
    net = UNetBackbone(8, 1, (8, 16), 1, num_classes=10, norm_num_groups=4)
    return freeze(EDMDenoiser(net, sample_shape=(1, 8, 8), num_classes=10))


def fit_one_step(method, budget: KimgBudget | None = None) -> L.Trainer:
    """Train until ``budget`` (default: one generator step)."""
    data = NoiseDataModule(like=DigitsDataModule(), batch_size=method.hparams.batch_size)
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[budget or KimgBudget(method.hparams.batch_size / 1000)],
    )  # fmt: skip
    trainer.fit(method, datamodule=data)
    return trainer


def params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


@pytest.mark.parametrize("name", METHODS)
def test_one_step_updates_generator_fake_and_ema(name, tmp_path):
    teacher = tiny_teacher()
    method = METHODS[name](teacher, batch_size=8, lr=1e-3, ema_halflife_kimg=0.001, ema_rampup_ratio=None)
    before = {k: params(getattr(method, k)) for k in ("generator", "fake", "ema")}
    teacher_before = params(teacher)
    trainer = fit_one_step(method)
    assert int(method.gen_steps) == 1 and method.kimg == pytest.approx(0.008)
    assert trainer.global_step == 2, "Lightning counts both optimisers; progress uses gen_steps/kimg"
    for k in ("generator", "fake", "ema"):
        assert not torch.equal(params(getattr(method, k)), before[k]), f"{k} did not move"
    assert not torch.equal(params(method.ema), params(method.generator)), "EMA equals the online weights"
    torch.testing.assert_close(params(teacher), teacher_before)

    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not any(k.startswith("_teacher") or "teacher" in k for k in state), "teacher must stay out"
    fresh = METHODS[name](tiny_teacher(), batch_size=8)
    fresh.load_state_dict(state)
    torch.testing.assert_close(params(fresh.ema), params(method.ema))
    assert int(fresh.gen_steps) == 1


class PassCounter:
    """Counts forward and backward passes of a module with hooks."""

    def __init__(self, module: nn.Module):
        self.forward = self.backward = 0
        module.register_forward_hook(lambda *_: setattr(self, "forward", self.forward + 1))
        module.register_full_backward_hook(lambda *_: setattr(self, "backward", self.backward + 1))


@pytest.mark.parametrize(("name", "forward", "backward"), [("sim", 5, 4), ("sid", 5, 4), ("di", 5, 2)])
def test_passes_per_iteration_are_counted(name, forward, backward):
    """docs/algorithms.md §8: SiD/SIM 5 forward and 4 backward passes. DI runs G, ψ (ψ-step) and G, φ, ψ
    (θ-step): 5 forwards by the list in docs/algorithms.md §5, 2 backward (ψ's parameters, then G)."""
    teacher = tiny_teacher()
    method = METHODS[name](teacher, batch_size=4)
    counters = [PassCounter(m.net) for m in (teacher, method.fake, method.generator)]
    fit_one_step(method)
    assert sum(c.forward for c in counters) == forward
    assert sum(c.backward for c in counters) == backward


def generator_grads(method, x_shape=(1, 8, 8)) -> torch.Tensor:
    method.zero_grad()
    z = method.draw("gen")
    loss = method.generator_loss(method.generate(z), None).mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in method.generator.parameters() if p.grad is not None])


def test_sim_l2_with_sid_weighting_equals_sid_alpha_one():
    teacher = tiny_teacher()
    torch.manual_seed(1)
    student = EDMDenoiser(UNetBackbone(8, 1, (8, 16), 1, num_classes=10, norm_num_groups=4), (1, 8, 8),
                          num_classes=10)  # fmt: skip
    sim = SIM(teacher, student, distance="l2", weighting="sid", batch_size=16)
    sid = SiD(teacher, student, alpha=1.0, batch_size=16)
    sid.fake.load_state_dict(sim.fake.state_dict())
    for m in (sim, sid):
        m.fake.requires_grad_(False)
    torch.testing.assert_close(generator_grads(sim), generator_grads(sid), rtol=1e-4, atol=1e-6)


# ---- Gaussian case: teacher q = N(μ_q, v_q I), generator p_θ = N(μ, s² I), fake = p_θ's exact denoiser ----
class GaussianDenoiser(Denoiser):
    """Exact D(x; σ) = m + v/(v + σ²)·(x − m) of N(m, v I)."""

    def __init__(self, mean: float, var: float, dim: int):
        super().__init__()
        self.mean, self.var, self.sample_shape = mean, var, (dim,)

    def forward(self, x, sigma, labels=None):
        s2 = as_sigma_batch(sigma, x) ** 2
        return self.mean + self.var / (self.var + s2) * (x - self.mean)


class AffineGenerator(Denoiser):
    """A denoiser-shaped generator: D(σ_init·z; σ_init) = μ + s·z."""

    def __init__(self, dim: int, mu: float, s: float):
        super().__init__()
        self.mu, self.s = nn.Parameter(torch.tensor(mu)), nn.Parameter(torch.tensor(s))
        self.sample_shape = (dim,)

    def forward(self, x, sigma, labels=None):
        return self.mu + self.s * x / as_sigma_batch(sigma, x)


DIM, MU_Q, VAR_Q, MU_P, S_P, SIGMA = 4, 0.5, 0.8, -0.3, 1.3, 0.7


def gaussian_method(cls, **kwargs):
    method = cls(GaussianDenoiser(MU_Q, VAR_Q, DIM), AffineGenerator(DIM, MU_P, S_P), batch_size=200_000,
                 **kwargs)  # fmt: skip
    method.fake = GaussianDenoiser(MU_P, S_P**2, DIM)  # ψ = the generator's exact score
    method.sample_sigma = lambda n, law=None: torch.full((n,), SIGMA)
    method.zero_grad()
    z = method.draw("gen")
    method.generator_loss(method.generate(z), None).mean().backward()
    return torch.stack([method.generator.mu.grad, method.generator.s.grad])


def test_diff_instruct_gradient_matches_the_gaussian_closed_form():
    a_p, a_q = S_P**2 / (S_P**2 + SIGMA**2), VAR_Q / (VAR_Q + SIGMA**2)
    expected = torch.tensor([DIM * (1 - a_q) * (MU_P - MU_Q), DIM * (a_p - a_q) * S_P])
    torch.testing.assert_close(gaussian_method(DiffInstruct), expected, rtol=0.03, atol=2e-3)


def test_sim_l2_gradient_matches_the_score_gradient_theorem():
    """∇_θ E‖s_p − s_q‖² at fixed sampling law, in closed form for Gaussians (SIM §3.2)."""
    v_p, v_q = S_P**2 + SIGMA**2, VAR_Q + SIGMA**2
    expected = torch.tensor(
        [2 * DIM * (MU_P - MU_Q) / (v_p * v_q), 4 * DIM * S_P * (v_p - v_q) / (v_p**2 * v_q)]
    )
    got = gaussian_method(SIM, distance="l2", weighting="unit")
    torch.testing.assert_close(got, expected, rtol=0.03, atol=2e-3)


def test_sim_pseudo_huber_gradient_matches_the_score_gradient_theorem():
    """E[d'(y)ᵀ ∂s_p/∂θ] with x_t ~ p_θ,σ held fixed (Monte Carlo of the theorem's right-hand side)."""
    c = 0.3
    v_p, v_q = S_P**2 + SIGMA**2, VAR_Q + SIGMA**2
    g = torch.Generator().manual_seed(5)
    x = MU_P + v_p**0.5 * torch.randn(400_000, DIM, generator=g, dtype=torch.float64)
    y = -(x - MU_P) / v_p + (x - MU_Q) / v_q
    d_prime = y / ((y**2).sum(1, keepdim=True) + c**2).sqrt()
    expected = torch.stack(
        [(d_prime / v_p).sum(1).mean(), (d_prime * 2 * S_P * (x - MU_P) / v_p**2).sum(1).mean()]
    )
    got = gaussian_method(SIM, distance="pseudo_huber", c=c, weighting="unit")
    torch.testing.assert_close(got, expected.float(), rtol=0.03, atol=2e-3)


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (SIM, {"sigma_init": 0.0}, "method.sigma_init"),
        (SiD, {"lr": -1e-4}, "method.lr"),
        (SiD, {"alpha": 3.0}, "method.alpha"),
        (SIM, {"c": -1.0}, "method.c"),
        (SIM, {"distance": "l3"}, "method.distance"),
        (DiffInstruct, {"fake_updates": 0}, "method.fake_updates"),
    ],
)
def test_bad_settings_fail_before_training(cls, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        cls(tiny_teacher(), **kwargs)


class DropoutNet(nn.Module):
    """A tiny denoiser with dropout, which records its mode at every forward."""

    def __init__(self, log: list):
        super().__init__()
        self.net, self.drop, self.log = nn.Conv2d(1, 1, 3, padding=1), nn.Dropout(0.5), log

    def forward(self, x, sigma, labels=None):
        self.log.append(self.training)
        return self.drop(self.net(x))


@pytest.mark.parametrize("name", METHODS)
def test_the_fake_score_reads_in_eval_mode_in_the_generator_step_and_trains_in_its_own(name):
    teacher = tiny_teacher()
    method = METHODS[name](teacher, student=tiny_teacher(), batch_size=8)
    fake_modes: list[bool] = []
    method.fake = freeze(EDMDenoiser(DropoutNet(fake_modes), sample_shape=(1, 8, 8), num_classes=10))
    method.fake.requires_grad_(True).train()
    generator_modes: list[bool] = []
    method.generator.register_forward_pre_hook(lambda m, args: generator_modes.append(m.training))
    fit_one_step(method)
    # ψ-step: ψ trains (dropout on) on samples of G in eval mode; θ-step: G trains, ψ reads in eval mode
    assert fake_modes == [True, False], fake_modes
    assert generator_modes == [False, True], generator_modes
    assert method.fake.training and method.generator.training, "both nets are back in train mode"
