"""Schedules, ODE samplers (vs EDM's formulas and diffusers' EDM schedulers), fixed noise and generation."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from distillbench.data.toy2d import Toy2DDataModule
from distillbench.samplers import (
    SAMPLERS,
    SCHEDULES,
    DPMSolverPP2MSampler,
    EulerSampler,
    HeunSampler,
    fixed_labels,
    fixed_noise,
    generate,
    improved,
    karras,
    log_uniform,
)
from distillbench.teachers.analytic import AnalyticMixtureDenoiser
from distillbench.teachers.denoiser import Denoiser

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def _single_thread():
    """These tensors are tiny: intra-op threads only add overhead, which is severe on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GaussianDenoiser(Denoiser):
    """Exact D(x; σ) = μ + s²/(s² + σ²)(x − μ) of data N(μ, s²I), computed in float64."""

    def __init__(self, mean=0.3, std=0.7, sigma_min=0.002, sigma_max=80.0):
        super().__init__()
        self.mean, self.std = mean, std
        self.sigma_min, self.sigma_max, self.sample_shape = sigma_min, sigma_max, (1,)

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
        return self.mean + self.std**2 / (self.std**2 + sigma**2) * (x - self.mean)


def toy_denoiser() -> AnalyticMixtureDenoiser:
    return AnalyticMixtureDenoiser(Toy2DDataModule().mixture)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 18])
def test_schedule_descends_from_sigma_max_to_sigma_min_then_zero(name, steps):
    sigmas = SCHEDULES[name](steps, sigma_min=0.01, sigma_max=50.0)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
    assert sigmas[0] == 50.0 and sigmas[-1] == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all() and (sigmas[:-1] > 0).all()
    if steps > 1:
        assert sigmas[-2] == 0.01


def test_karras_18_steps_equals_edm_published_grid():
    edm = [
        80,
        57.6,
        40.8,
        28.4,
        19.4,
        12.9,
        8.40,
        5.32,
        3.26,
        1.92,
        1.09,
        0.585,
        0.296,
        0.140,
        0.0599,
        0.0229,
        0.00753,
        0.002,
        0.0,
    ]
    assert [float(f"{s:.3g}") for s in karras(18).tolist()] == edm


def test_improved_recovers_karras_as_p_vanishes_and_coarsens_the_last_step():
    assert torch.allclose(improved(18, p=1e-6), karras(18), rtol=1e-6, atol=1e-6)
    last_gap = [s[-3] - s[-2] for s in (karras(18), improved(18, p=1.0), improved(18, p=3.0))]
    assert last_gap[0] < last_gap[1] < last_gap[2]


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"steps": 0}, "steps"), ({"sigma_min": 0.0}, "sigma_min"), ({"sigma_max": 0.001}, "sigma_max")],
)
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_rejects_bad_arguments_by_name(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SCHEDULES[name](**{"steps": 10, **kwargs})


# ---------------------------------------------------------------- samplers


def test_heun_two_steps_equals_edm_algorithm_1_by_hand():
    mean, std = 0.3, 0.7
    denoiser = GaussianDenoiser(mean, std, sigma_min=0.5, sigma_max=2.0)  # Karras grid: [2, 0.5, 0]

    def d(x, sigma):
        return mean + std**2 / (std**2 + sigma**2) * (x - mean)

    def by_hand(z):
        x = 2.0 * z
        slope = (x - d(x, 2.0)) / 2.0
        x_euler = x + (0.5 - 2.0) * slope
        x = x + (0.5 - 2.0) * (slope + (x_euler - d(x_euler, 0.5)) / 0.5) / 2
        return x + (0.0 - 0.5) * (x - d(x, 0.5)) / 0.5  # last step: Euler only

    z = torch.tensor([[-1.3], [0.2], [2.1]], dtype=torch.float64)
    result = HeunSampler(steps=2).sample(denoiser, z)
    expected = torch.tensor([[by_hand(v)] for v in z.flatten().tolist()], dtype=torch.float64)
    assert result.nfe == 3
    assert torch.allclose(result.x, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "sampler, nfe",
    [
        (HeunSampler(), 35),
        (EulerSampler(), 35),
        (DPMSolverPP2MSampler(), 20),
        (HeunSampler(steps=1), 1),
        (DPMSolverPP2MSampler(steps=1), 1),
    ],
)
def test_nfe_is_counted_and_result_keeps_z_dtype(sampler, nfe):
    z = torch.randn(4, 1)
    result = sampler.sample(GaussianDenoiser(), z)
    assert result.nfe == nfe
    assert result.x.dtype == torch.float32 and result.x.shape == z.shape


@pytest.mark.parametrize("cls, order", [(HeunSampler, 2), (EulerSampler, 1), (DPMSolverPP2MSampler, 2)])
def test_convergence_order_on_the_exact_gaussian_flow(cls, order):
    denoiser, z = GaussianDenoiser(), torch.randn(8, 1, dtype=torch.float64)
    # Probability-flow ODE of N(μ, s²): x(σ) − μ ∝ sqrt(s² + σ²).
    exact = denoiser.mean + (80.0 * z - denoiser.mean) * denoiser.std / math.hypot(denoiser.std, 80.0)
    error = [(cls(steps=n).sample(denoiser, z).x - exact).abs().max() for n in (32, 64)]
    assert math.log2(error[0] / error[1]) == pytest.approx(order, abs=0.25)


def run_diffusers(scheduler, denoiser, z):
    """Drive a diffusers EDM scheduler with a model output whose preconditioning gives exactly our D."""
    x = z.to(torch.float64) * scheduler.sigmas[0].item()
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)  # sets the step index; the input scaling is not needed by D
        sigma = scheduler.sigmas[scheduler.step_index]
        skip_x = scheduler.precondition_outputs(x, zeros, sigma)  # c_skip·x (precondition is linear)
        c_out = scheduler.precondition_outputs(zeros, ones, sigma)
        model_output = (denoiser(x, sigma.item()) - skip_x) / c_out
        x = scheduler.step(model_output, t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [6, 20])
def test_euler_matches_diffusers_edm_euler(steps):
    denoiser, z = toy_denoiser(), torch.randn(64, 2)
    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    assert torch.allclose(scheduler.sigmas.double(), karras(steps), rtol=1e-6)
    expected = run_diffusers(scheduler, denoiser, z)
    # diffusers keeps σ and the Euler update in float32, hence the tolerance.
    assert torch.allclose(EulerSampler(steps).sample(denoiser, z).x, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps, lower_order_final", [(6, True), (20, False)])
def test_dpmpp2m_matches_diffusers_edm_dpmsolver(steps, lower_order_final):
    # solver_order=2 + "midpoint" is DPM-Solver++(2M); final_sigmas_type="zero" forces the first-order final
    # step (x = x̂), and lower_order_final (< 15 steps) only demotes the second-to-last step to order 2,
    # which it already is: both settings run our algorithm.
    denoiser, z = toy_denoiser(), torch.randn(64, 2)
    scheduler = EDMDPMSolverMultistepScheduler(
        sigma_min=0.002,
        sigma_max=80.0,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        final_sigmas_type="zero",
        lower_order_final=lower_order_final,
        euler_at_final=False,
    )
    scheduler.set_timesteps(steps)
    expected = run_diffusers(scheduler, denoiser, z)
    result = DPMSolverPP2MSampler(steps).sample(denoiser, z)
    assert torch.allclose(result.x, expected.float(), atol=1e-5, rtol=1e-5)


def test_heun_35_nfe_reproduces_the_toy2d_mixture():
    mixture = Toy2DDataModule().mixture
    z = fixed_noise(20_000, (2,), seed=0)
    result = HeunSampler(steps=18).sample(AnalyticMixtureDenoiser(mixture), z)
    assert result.nfe == 35
    modes = mixture.assign(result.x)
    shares = torch.bincount(modes, minlength=4).double() / len(modes)
    assert (shares - mixture.weights).abs().max() < 0.02
    for k, mean in enumerate(mixture.means):
        assert (result.x[modes == k].double().mean(0) - mean).abs().max() < 0.05


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "name, cls, steps",
    [("heun", HeunSampler, 18), ("euler", EulerSampler, 35), ("dpmpp2m", DPMSolverPP2MSampler, 20)],
)
def test_hydra_configs_instantiate_and_swap_schedule(name, cls, steps):
    def sampler(*overrides: str):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            return instantiate(compose("sample", overrides=[f"sampler={name}", *overrides]).sampler)

    assert type(sampler()) is cls and SAMPLERS[name] is cls and sampler().steps == steps
    assert torch.equal(sampler().sigmas(GaussianDenoiser()), karras(steps))
    swapped = sampler("schedule@sampler.schedule=improved").sigmas(GaussianDenoiser())
    assert torch.equal(swapped, improved(steps, p=2.0))
    log_spaced = sampler("schedule@sampler.schedule=log_uniform").sigmas(GaussianDenoiser())
    assert torch.equal(log_spaced, log_uniform(steps))


def test_sigma_limits_come_from_the_denoiser_unless_the_schedule_binds_them():
    denoiser = GaussianDenoiser(sigma_min=0.01, sigma_max=20.0)
    assert torch.equal(HeunSampler(steps=5).sigmas(denoiser), karras(5, 0.01, 20.0))
    bound = HeunSampler(steps=5, schedule=partial(karras, sigma_min=0.1))
    assert torch.equal(bound.sigmas(denoiser), karras(5, 0.1, 20.0))


# ---------------------------------------------------------------- fixed noise and generation


def test_fixed_noise_depends_only_on_seed_and_global_index():
    full = fixed_noise(3000, (2, 3), seed=7)
    assert full.shape == (3000, 2, 3)
    assert torch.equal(fixed_noise(10, (2, 3), seed=7), full[:10])
    assert torch.equal(fixed_noise(1500, (2, 3), seed=7, offset=1020), full[1020:2520])
    assert not torch.equal(fixed_noise(10, (2, 3), seed=8), full[:10])


def test_fixed_labels_follow_probs_and_are_prefix_stable():
    assert fixed_labels(5, None, seed=0) is None
    labels = fixed_labels(20_000, [0.0, 3.0, 1.0], seed=0)
    assert labels.dtype == torch.long
    assert torch.equal(fixed_labels(100, [0.0, 3.0, 1.0], seed=0), labels[:100])
    shares = torch.bincount(labels, minlength=3).double() / len(labels)
    assert torch.allclose(shares, torch.tensor([0.0, 0.75, 0.25], dtype=torch.float64), atol=0.02)


def test_generate_is_batch_size_invariant_and_returns_counted_nfe():
    denoiser = toy_denoiser()
    sampler = EulerSampler(steps=4)
    x, labels, nfe = generate(sampler, denoiser, n=50, batch_size=50, seed=3)
    x_small, _, nfe_small = generate(sampler, denoiser, n=50, batch_size=16, seed=3, progress=True)
    assert x.shape == (50, 2) and labels is None and nfe == nfe_small == 4
    assert torch.allclose(x, x_small, atol=1e-6)
    _, labels, nfe = generate(HeunSampler(steps=3), denoiser, n=10, batch_size=4, label_probs=[0.5, 0.5])
    assert labels.shape == (10,) and nfe == 5


def test_generate_from_an_offset_draws_the_noise_and_labels_of_those_global_indices():
    from distillbench.samplers.generate import StudentSampler, generate

    class Echo(torch.nn.Module):
        sample_shape, nfe = (2,), 1

        def sample(self, z, labels=None):
            return z + labels[:, None]

    probs = [0.2, 0.3, 0.5]
    whole, labels, nfe = generate(StudentSampler(), Echo(), 10, batch_size=4, seed=5, label_probs=probs)
    part, part_labels, _ = generate(
        StudentSampler(), Echo(), 4, batch_size=3, seed=5, label_probs=probs, offset=6
    )
    assert nfe == 1 and torch.equal(part, whole[6:]) and torch.equal(part_labels, labels[6:])
