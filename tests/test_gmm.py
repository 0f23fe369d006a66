"""The analytic low-rank mixture teacher, its exact data and the ground-truth metrics (docs/gmm.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from distillbench.config import ASSETS_DIR
from distillbench.data.digits import DigitsDataModule
from distillbench.data.gmm import BLOCK, GMMDataModule, MixtureBatches
from distillbench.errors import ConfigError
from distillbench.fit_gmm import fit_mixture
from distillbench.methods.sim import SIM
from distillbench.metrics import IdentityFeatures, MetricSuite
from distillbench.samplers.generate import generate
from distillbench.samplers.solvers import HeunSampler
from distillbench.teachers.gmm import GMMDenoiser, LowRankGMM, gmm_teacher

from .helpers import compose, run_in_process

SIGMAS = [0.002, 0.1, 1.0, 10.0, 80.0]
DIGITS = ASSETS_DIR / "teachers" / "gmm_digits"


def random_mixture(k: int = 6, d: int = 16, r: int = 4, classes: int = 3, seed: int = 1) -> LowRankGMM:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    bases = torch.randn(k, d, r, generator=g, dtype=torch.float64)
    lam, noise, weights = 2 * rand(k, r), 0.01 + 0.1 * rand(k), 0.1 + rand(k)
    return LowRankGMM(means, bases, lam, noise, weights, torch.arange(k) % classes, (d,), classes)


def dense_denoiser(m: LowRankGMM, x: torch.Tensor, sigma: float, labels=None) -> torch.Tensor:
    """Σ_k w_k [μ_k + Σ_k (Σ_k + σ²I)⁻¹ (x − μ_k)] with full matrices, torch.linalg.solve and logsumexp."""
    x = x.reshape(len(x), -1)
    cov = m.covariances() + sigma**2 * torch.eye(m.dim, dtype=torch.float64)
    y = x[:, None] - m.means[None]
    solved = torch.linalg.solve(cov.expand(len(x), -1, -1, -1), y[..., None])[..., 0]  # (Σ_k + σ²I)⁻¹ y
    loglik = -0.5 * ((y * solved).sum(-1) + torch.linalg.slogdet(cov)[1] + m.dim * math.log(2 * math.pi))
    logw = m.weights.log() + loglik
    if labels is not None:
        logw = logw.masked_fill((m.classes[None] != labels[:, None]) & (labels[:, None] >= 0), -math.inf)
    w = (logw - torch.logsumexp(logw, 1, keepdim=True)).exp()
    cov0 = m.covariances()
    return (w[..., None] * (m.means[None] + (cov0 @ solved[..., None])[..., 0])).sum(1)


def noised_points(m: LowRankGMM, n: int, sigma: float, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = m.sample(n, g)[0].reshape(n, -1)
    return x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("conditional", [False, True])
def test_woodbury_denoiser_matches_the_dense_computation(sigma, conditional):
    m = random_mixture()
    x = noised_points(m, 64, sigma)
    labels = torch.arange(64) % 4 - 1 if conditional else None  # −1 (unconditional) among them
    err = (m.denoise(x, sigma, labels) - dense_denoiser(m, x, sigma, labels)).abs().max()
    assert err <= 1e-10


@pytest.mark.parametrize("sigma", SIGMAS)
def test_shipped_digits_denoiser_matches_the_dense_computation(sigma):
    teacher = gmm_teacher(str(DIGITS))
    m = teacher.mixture
    x = noised_points(m, 24, sigma).reshape(24, 1, 8, 8)
    labels = torch.arange(24) % 11 - 1
    for given in (None, labels):
        d = teacher(x, sigma, given)
        assert d.shape == x.shape and d.dtype == torch.float64
        assert (d.reshape(24, -1) - dense_denoiser(m, x, sigma, given)).abs().max() <= 1e-10


def test_log_prob_matches_scipy():
    m = random_mixture()
    x = noised_points(m, 5, 0.3)
    cov = m.covariances().numpy()
    for sigma in (0.0, 0.5):
        eye = sigma**2 * np.eye(m.dim)
        laws = [multivariate_normal(mean, c + eye) for mean, c in zip(m.means.numpy(), cov, strict=True)]
        per_comp = np.stack([law.logpdf(x) for law in laws], 1)
        expected = logsumexp(per_comp + np.log(m.weights.numpy()), axis=1)
        np.testing.assert_allclose(m.log_prob(x, sigma).numpy(), expected, rtol=0, atol=1e-9)
    labels = torch.tensor([0, 1, 2, -1, 0])
    within = np.where(m.classes.numpy()[None] == labels.numpy()[:, None], 0.0, -np.inf)
    within[3] = 0.0  # −1: the whole mixture
    logw = np.log(m.weights.numpy()) + within
    expected = logsumexp(per_comp + logw - logsumexp(logw, axis=1, keepdims=True), axis=1)
    np.testing.assert_allclose(m.log_prob(x, 0.5, labels).numpy(), expected, rtol=0, atol=1e-9)


def test_ancestral_samples_have_the_mixture_moments():
    m = random_mixture()
    n = 40_000
    x, labels, comp = m.sample(n, torch.Generator().manual_seed(0))
    assert torch.equal(labels, m.classes[comp])
    cov = m.covariance()
    var = cov.diagonal()
    se_mean = (var / n).sqrt()
    assert ((x.mean(0) - m.mean()).abs() <= 5 * se_mean).all()
    # the Gaussian standard error of a sample covariance entry (a mixture's heavier tails: 8 of them)
    se_cov = ((var[:, None] * var[None] + cov**2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() <= 8 * se_cov).all()


def test_conditional_samples_and_class_posterior():
    m = random_mixture()
    labels = torch.tensor([0, 1, 2, -1] * 50)
    x, got, _ = m.sample(len(labels), torch.Generator().manual_seed(0), labels)
    assert torch.equal(got[labels >= 0], labels[labels >= 0])
    post = m.class_posterior(x)
    assert post.shape == (200, 3) and torch.allclose(post.sum(1), torch.ones(200, dtype=torch.float64))
    assert torch.allclose(m.class_prior.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_teacher_is_frozen_without_weights_and_needs_a_student():
    teacher = gmm_teacher(str(DIGITS))
    assert not list(teacher.parameters()) and not teacher.state_dict() and teacher.num_classes == 10
    with pytest.raises(ConfigError, match="student="):
        SIM(teacher)


def test_heun_samples_are_not_clipped():
    teacher = gmm_teacher(str(DIGITS), dtype="float32")
    probs = teacher.mixture.class_prior
    x, labels, nfe = generate(HeunSampler(steps=4), teacher, 32, seed=0, label_probs=probs)
    assert x.shape == (32, 1, 8, 8) and nfe == 7 and torch.isfinite(x).all() and labels is not None
    assert (x.abs() > 1).any()  # the mixture's background noise reaches past −1


# ---- the data module ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gmm_digits() -> GMMDataModule:
    return GMMDataModule(None, "gmm_digits", split_size=BLOCK + 100, seed=5)


def test_samples_are_keyed_by_global_index(gmm_digits):
    x, labels = gmm_digits.arrays("train")
    assert x.shape == (BLOCK + 100, 1, 8, 8) and x.dtype == torch.float32
    part = gmm_digits.draws("train")(BLOCK - 10, BLOCK + 10)  # across a block boundary
    assert torch.equal(part[0], x[BLOCK - 10 : BLOCK + 10]) and torch.equal(
        part[1], labels[BLOCK - 10 : BLOCK + 10]
    )
    again = GMMDataModule(None, "gmm_digits", split_size=5, seed=5).arrays("train")[0]
    assert torch.equal(again, x[:5])
    other_seed = GMMDataModule(None, "gmm_digits", split_size=5, seed=6).arrays("train")[0]
    reference = gmm_digits.real_samples(5, "reference")[0]
    assert not torch.equal(other_seed, x[:5]) and not torch.equal(reference, x[:5])
    assert torch.equal(gmm_digits.real_samples(BLOCK + 100, "reference")[0][:5], reference)  # any n


def test_training_batches_split_the_global_stream_over_ranks(gmm_digits):
    draws = gmm_digits.draws("train")
    ranks = [next(iter(MixtureBatches(draws, 16, start=3, rank=r, world=2))) for r in (0, 1)]
    both = torch.cat([x for x, _ in ranks])
    assert torch.equal(both, gmm_digits.arrays("train")[0][3 * 32 : 4 * 32])


def test_overlapping_streams_and_training_references_are_refused(gmm_digits):
    with pytest.raises(ConfigError, match="data.streams"):
        GMMDataModule(None, "gmm_digits", streams={"reference": 0})
    with pytest.raises(ConfigError, match="metrics.split=reference"):
        gmm_digits.real_samples(10, "train")
    with pytest.raises(ConfigError, match="no mixture"):
        GMMDataModule("/nonexistent", "gmm_digits")


# ---- ground-truth metrics -------------------------------------------------------------------------------
def ground_truth_suite(n: int) -> MetricSuite:
    kinds = ["log_density_gap", "coverage_tv", "clamped_fraction"]
    return MetricSuite(IdentityFeatures(64), n=n, metrics=kinds, dataset="gmm_digits", split="reference")


def test_ground_truth_metrics_see_a_dropped_class_and_blur(gmm_digits):
    suite = ground_truth_suite(2000)
    floor = suite.floor(gmm_digits)
    assert abs(floor["log_density_gap@2k"]) < 0.05 and floor["coverage_tv@2k"] < 0.05
    assert 0 < floor["clamped_fraction@2k"] < 1
    x, labels = gmm_digits.real_samples(4000, "test", seed=1)
    no_zero = x[labels != 0][:2000]
    prior_zero = float(gmm_digits.label_distribution[0])
    assert suite.evaluate(no_zero, gmm_digits)["coverage_tv@2k"] == pytest.approx(prior_zero, abs=0.03)
    blurred = x[:2000] + 0.1 * torch.randn_like(x[:2000])
    assert suite.evaluate(blurred, gmm_digits)["log_density_gap@2k"] < floor["log_density_gap@2k"] - 0.5


def test_ground_truth_metrics_need_a_mixture():
    suite = ground_truth_suite(10)
    suite.dataset = None
    with pytest.raises(ValueError, match="exact mixture"):
        suite.evaluate(torch.zeros(10, 1, 8, 8), DigitsDataModule())


# ---- the shipped file and the commands ------------------------------------------------------------------
def test_refitting_digits_reproduces_the_shipped_mixture():
    shipped = LowRankGMM.load(DIGITS)
    info = shipped.info
    x, labels = DigitsDataModule().arrays(info["split"])
    fitted = fit_mixture(x, labels, 10, info["components_per_class"], info["rank"], info["min_variance"],
                         info["seed"])  # fmt: skip
    assert torch.equal(fitted.classes, shipped.classes)
    for name in ("means", "eigenvalues", "noise_variance", "weights", "bases"):
        np.testing.assert_allclose(
            getattr(fitted, name), getattr(shipped, name), rtol=0, atol=1e-5, err_msg=name
        )


def test_sample_command_runs_the_gmm_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLBENCH_ROOT", str(tmp_path))
    kinds = "metrics.metrics=[fid,log_density_gap,coverage_tv]"
    exit = run_in_process("distillbench.sample", "data=gmm_digits", "teacher=gmm_digits", "sampler.steps=3",
                          "n=64", "threads=1", kinds)  # fmt: skip
    assert exit.code == 0, exit.stderr[-2000:]
    assert "log_density_gap@64" in exit.stdout and "coverage_tv@64" in exit.stdout


def test_gmm_denoiser_is_a_denoiser():
    assert issubclass(GMMDenoiser, torch.nn.Module) and GMMDenoiser.bounded is False


@pytest.mark.parametrize("name", ["gmm_digits", "gmm_mnist"])
def test_data_choice_composes_its_teacher_student_metrics_and_net(name):
    cfg = compose("train", [f"data={name}"])
    assert cfg.teacher._target_.endswith("gmm_teacher") and cfg.teacher.path.endswith(name)
    assert cfg.student.path.endswith(name.removeprefix("gmm_")) and cfg.metrics.dataset == name
    assert compose("train_teacher", [f"data={name}"]).net._target_.endswith("UNetBackbone")
