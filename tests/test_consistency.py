"""Consistency distillation and ECT: each loss against a transcription of its formula, the consistency
function's boundary condition, the shared dropout mask, multistep sampling, one optimisation step, bad
settings, the paper configs, learning on the analytic digits teacher, and exact resume."""

from __future__ import annotations

import math

import hydra
import lightning as L
import pytest
import torch
from torch import nn

from distillbench.callbacks import KimgBudget
from distillbench.data.digits import DigitsDataModule
from distillbench.errors import ConfigError
from distillbench.methods import ECT, ConsistencyDistillation
from distillbench.methods.consistency import consistency_function
from distillbench.nets import UNetBackbone
from distillbench.teachers.denoiser import EDMDenoiser, freeze
from distillbench.validation import validate_train_config
from tests.helpers import ROOT, compose, run_in_process
from tests.test_faults import copy_at_step_five, same_weights, weights
from tests.test_learning import (  # noqa: F401 (fixtures)
    COMMON,
    COVERAGE,
    FID,
    GAP,
    cache_dir,
    deterministic_torch,
    floor_width,
)
from tests.test_methods import params, tiny_teacher

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5


def tiny_student(seed: int = 1) -> EDMDenoiser:
    """A tiny digits UNet other than the teacher (so that the student's and the teacher's answers differ)."""
    torch.manual_seed(seed)
    net = UNetBackbone(8, 1, (8, 16), 1, num_classes=10, norm_num_groups=4)
    return EDMDenoiser(net, sample_shape=(1, 8, 8), num_classes=10)


def digits_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    x, labels = DigitsDataModule().arrays("train")
    return x[:n], labels[:n]


def column(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


# ---- transcriptions of docs/algorithms.md §11–12, on the backbone F ---------------------------------------
def f_on_backbone(denoiser: EDMDenoiser, x, sigma, labels) -> torch.Tensor:
    """c_skip·x + c_out·F(c_in·x, ln σ/4) with c_skip = σ_d²/((σ − σ_min)² + σ_d²),
    c_out = (σ − σ_min)·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²)."""
    s = column(sigma.float())
    c_skip = SIGMA_DATA**2 / ((s - SIGMA_MIN) ** 2 + SIGMA_DATA**2)
    c_out = (s - SIGMA_MIN) * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
    c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
    return c_skip * x + c_out * denoiser.net(c_in * x, sigma.float().log() / 4, labels)


def cd_transcribed(method, teacher, x0, labels, levels: int, distance: str, c: float) -> torch.Tensor:
    rho, index = 7.0, torch.arange(levels, dtype=torch.float64)
    top, bottom = SIGMA_MAX ** (1 / rho), SIGMA_MIN ** (1 / rho)
    grid = (top + index / (levels - 1) * (bottom - top)) ** rho
    g = method.seeded_stream(0)  # the stream the method draws from at this step
    i = torch.randint(levels - 1, (x0.shape[0],), generator=g)
    t, t2 = grid[i], grid[i + 1]
    x_t = x0 + column(t).float() * torch.randn(x0.shape, generator=g)
    with torch.no_grad():  # Heun from t to t₂ on dx/dσ = (x − D(x; σ))/σ, in float64
        x = x_t.double()
        d1 = (x - teacher(x, t, labels).double()) / column(t)
        x_e = x + column(t2 - t) * d1
        d2 = (x_e - teacher(x_e, t2, labels).double()) / column(t2)
        x_hat = (x + column(t2 - t) * (d1 + d2) / 2).float()
        target = f_on_backbone(method.target, x_hat, t2, labels)
    online = f_on_backbone(method.student, x_t, t, labels)
    diff = (online - target).flatten(1)
    if distance == "l2":
        return diff.pow(2).mean(1)
    return (diff.pow(2).sum(1) + c**2).sqrt() - c


@pytest.mark.parametrize(("distance", "c"), [("l2", None), ("pseudo_huber", None), ("pseudo_huber", 0.3)])
def test_the_cd_loss_is_its_formula_on_the_same_draws(distance, c):
    teacher = tiny_teacher()
    method = ConsistencyDistillation(teacher, tiny_student(), levels=6, distance=distance, c=c)
    with torch.no_grad():  # a target that lags the student, as after some updates
        for p in method.target.parameters():
            p.mul_(0.9)
    x0, labels = digits_batch()
    got = method.consistency_loss(x0, labels)
    expected_c = c if c is not None else 0.00054 * math.sqrt(64)
    expected = cd_transcribed(method, teacher, x0, labels, 6, distance, expected_c)
    assert got.shape == (6,) and (got > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def ect_transcribed(method, y, labels, stage: int, q, k, b, c) -> tuple[torch.Tensor, torch.Tensor]:
    g = method.seeded_stream(0)
    t = (-1.1 + 2.0 * torch.randn(y.shape[0], generator=g)).exp()
    r = torch.clamp(t * (1 - q ** -(stage + 1) * (1 + k / (1 + torch.exp(b * t)))), min=0)
    eps = torch.randn(y.shape, generator=g)
    d_t = method.student(y + column(t) * eps, t, labels)
    with torch.no_grad():
        d_r = method.student(y + column(r) * eps, torch.where(r > 0, r, 1.0), labels)
        d_r = torch.where(column(r > 0), d_r, y)
    loss = (((d_t - d_r) ** 2).flatten(1).sum(1) + c**2).sqrt() - c
    return loss / (t - r), r


@pytest.mark.parametrize(("stage", "q", "c"), [(0, 2.0, 0.0), (1, 2.0, 0.0), (3, 2.0, 0.06), (0, 256.0, 0.0)])
def test_the_ect_loss_is_its_formula_on_the_same_draws(stage, q, c):
    method = ECT(tiny_teacher(), q=q, c=c, double_kimg=0.1)
    method.nimg.fill_(stage * 100 + 50)  # halfway through the stage
    assert method.stage == stage
    y, labels = digits_batch(32)
    got = method.consistency_loss(y, labels)
    expected, r = ect_transcribed(method, y, labels, stage, q, 8.0, 1.0, c)
    if (stage, q) == (1, 2.0):
        assert 0 < int((r == 0).sum()) < 32, "both branches (r = 0: the target is y) are exercised"
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# ---- the consistency function and sampling ---------------------------------------------------------------
def test_the_consistency_function_is_the_identity_at_sigma_min_and_the_cm_parameterisation_of_f():
    student = tiny_student()
    x, labels = torch.randn(5, 1, 8, 8) * 3, torch.arange(5)
    at_min = consistency_function(student, x, torch.full((5,), SIGMA_MIN), labels, SIGMA_MIN, SIGMA_DATA)
    assert torch.equal(at_min, x)
    sigma = torch.tensor([0.003, 0.1, 1.0, 10.0, 80.0])
    via_d = consistency_function(student, x, sigma, labels, SIGMA_MIN, SIGMA_DATA)
    torch.testing.assert_close(via_d, f_on_backbone(student, x, sigma, labels), rtol=1e-6, atol=1e-6)


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.sigmas = net, 0, []

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        self.sigmas.append(float(sigma[0]))
        return self.net(x, sigma, labels)


@pytest.mark.parametrize("cls", [ConsistencyDistillation, ECT])
@pytest.mark.parametrize(("steps", "sigmas"), [(1, None), (2, [0.821]), (4, None)])
def test_multistep_sampling_makes_one_call_per_step_at_the_configured_sigmas(cls, steps, sigmas):
    method = cls(tiny_teacher(), sample_steps=steps, sample_sigmas=sigmas)
    method.ema = Counting(method.ema)
    z, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    x = method.sample(z, labels)
    assert method.nfe == steps == method.ema.calls and x.shape == z.shape and torch.isfinite(x).all()
    assert method.ema.sigmas[0] == SIGMA_MAX
    if sigmas is not None:
        assert method.ema.sigmas[1:] == pytest.approx(sigmas)
    assert method.ema.sigmas == sorted(method.ema.sigmas, reverse=True)
    assert torch.equal(method.sample(z, labels), x), "the re-noising stream is the same at every call"
    method.ema.calls = 0
    method.sample(z, labels, steps=3)
    assert method.ema.calls == 3


# ---- the shared dropout mask -------------------------------------------------------------------------------
class MaskRecorder(nn.Module):
    """A backbone with dropout that records each forward's mask."""

    def __init__(self):
        super().__init__()
        self.conv, self.drop, self.masks = nn.Conv2d(1, 1, 3, padding=1), nn.Dropout(0.5), []

    def forward(self, x, c_noise, labels=None):
        mask = self.drop(torch.ones_like(x))
        self.masks.append(mask.detach().clone())
        return self.conv(x) * mask


def recorder() -> EDMDenoiser:
    return EDMDenoiser(MaskRecorder(), sample_shape=(1, 8, 8))


@pytest.mark.parametrize("cls", [ConsistencyDistillation, ECT])
def test_the_online_and_target_calls_share_one_dropout_mask_drawn_anew_each_step(cls):
    method = cls(freeze(recorder()), recorder())
    method.student.train()
    y = digits_batch(4)[0]
    rng = torch.get_rng_state()
    method.consistency_loss(y, None)
    assert torch.equal(torch.get_rng_state(), rng), "the global generator is left as it was"
    networks = [method.student] if cls is ECT else [method.student, method.target]
    masks = [m for net in networks for m in net.net.masks]
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    assert 0 < float(masks[0].eq(0).float().mean()) < 1, "dropout is on in both calls"
    method.advance_count("gen_steps", 1)
    method.consistency_loss(y, None)
    assert not torch.equal(method.student.net.masks[-1], masks[0]), "the next step draws another mask"


# ---- one optimisation step ---------------------------------------------------------------------------------
def fit(method, batch_size: int = 8, kimg: float | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[KimgBudget(kimg or batch_size / 1000)],
    )  # fmt: skip
    trainer.fit(method, datamodule=DigitsDataModule(batch_size=batch_size))
    return trainer


@pytest.mark.parametrize("cls", [ConsistencyDistillation, ECT])
def test_one_step_moves_the_student_its_ema_and_the_target_and_checkpoints_without_the_teacher(cls, tmp_path):
    teacher = tiny_teacher()
    method = cls(teacher, lr=1e-3, ema_halflife_kimg=0.001, ema_rampup_ratio=None)
    nets = ("student", "ema", "target") if cls is ConsistencyDistillation else ("student", "ema")
    before, teacher_before = {k: params(getattr(method, k)) for k in nets}, params(teacher)
    trainer = fit(method)
    assert int(method.gen_steps) == 1 and method.kimg == pytest.approx(0.008)
    for k in nets:
        assert not torch.equal(params(getattr(method, k)), before[k]), f"{k} did not move"
    assert not torch.equal(params(method.ema), params(method.student))
    torch.testing.assert_close(params(teacher), teacher_before)
    assert float(method.tfe) == pytest.approx(8 * method.tfe_per_sample())

    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("_teacher") for k in state), "the teacher stays out of checkpoints"
    fresh = cls(tiny_teacher())
    fresh.load_state_dict(state)
    for k in nets:
        torch.testing.assert_close(params(getattr(fresh, k)), params(getattr(method, k)))


def test_the_cd_target_follows_the_student_at_its_own_rate():
    method = ConsistencyDistillation(tiny_teacher(), lr=1e-3, target_decay=0.9)
    target_before = params(method.target)
    fit(method)
    torch.testing.assert_close(params(method.target), 0.9 * target_before + 0.1 * params(method.student))


def test_the_ect_stage_grows_every_double_kimg():
    method = ECT(tiny_teacher(), double_kimg=0.016, lr=1e-3)
    stages = []
    method.log_train = lambda metrics: stages.append(method.stage)
    fit(method, kimg=0.048)
    assert int(method.gen_steps) == 6 and stages == [0, 1, 1, 2, 2, 3]  # after each update of 8 images


@pytest.mark.parametrize(("cls", "per_sample"), [(ConsistencyDistillation, 6), (ECT, 4)])
def test_a_budget_sets_the_whole_steps_that_spend_it(cls, per_sample):
    method = cls(tiny_teacher(), batch_size=8)
    kimg = method.fit_budget(tfe=8 * per_sample * 3 + 5)
    assert kimg == pytest.approx(0.024)
    fit(method, kimg=kimg)
    assert int(method.gen_steps) == 3 and float(method.tfe) == pytest.approx(3 * 8 * per_sample)


# ---- settings ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (ConsistencyDistillation, {"levels": 1}, "method.levels=1 must be an integer >= 2"),
        (ConsistencyDistillation, {"target_decay": 1.0}, r"target_decay=1.0 must be a number in \[0, 1\)"),
        (ConsistencyDistillation, {"distance": "lpips"}, "method.distance='lpips' is not one of"),
        (ECT, {"q": 1.0}, "method.q=1.0 must be a number > 1"),
        (ECT, {"double_kimg": 0}, "method.double_kimg=0 must be a number > 0"),
        (ECT, {"optimizer": "sgd"}, "method.optimizer='sgd' is not one of"),
        (
            ECT,
            {"sample_steps": 2, "sample_sigmas": [90.0]},
            r"method.sample_sigmas=\[90.0\] must be descending",
        ),
        (ECT, {"sample_steps": 3, "sample_sigmas": [1.0]}, "has 1 entries but method.sample_steps=3 needs 2"),
    ],
)
def test_bad_settings_fail_in_init(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(tiny_teacher(), **kwargs)


@pytest.mark.parametrize("method", ["cd", "ect"])
def test_the_config_is_checked_by_the_methods_rules_before_any_work(method):
    validate_train_config(compose("train", [f"method={method}"]))
    with pytest.raises(ConfigError, match="method.lr=-1"):
        validate_train_config(compose("train", [f"method={method}", "method.lr=-1"]))
    bad = compose("train", [f"method={method}", "method.sample_steps=1", "method.sample_sigmas=[1.0]"])
    with pytest.raises(ConfigError, match="needs 0"):
        validate_train_config(bad)


@pytest.mark.parametrize(("name", "cls", "fids"), [("cd_cifar10", ConsistencyDistillation, ("3.55", "2.93")),
                                                   ("ect_cifar10", ECT, ("3.60", "2.11"))])  # fmt: skip
def test_the_paper_configs_compose_validate_and_instantiate(name, cls, fids):
    cfg = compose("train", [f"experiment=paper/{name}"])
    validate_train_config(cfg)
    text = (ROOT / "conf" / "experiment" / "paper" / f"{name}.yaml").read_text()
    assert all(f"FID {fid}" in text for fid in fids), "the file quotes the paper's figures"
    teacher = EDMDenoiser(UNetBackbone(32, 3, (8, 16), 1, norm_num_groups=4), (3, 32, 32))
    method = hydra.utils.instantiate(cfg.method, teacher=teacher)
    assert isinstance(method, cls) and method.hparams.optimizer == "radam"


# ---- learning on the analytic digits teacher ---------------------------------------------------------------
# 20 updates of 32 exact samples of the digits mixture from the shipped digits UNet, lr 5e-4, one-step
# samples of the EMA (2 kimg half-life, ramp-up 0.05) on the learning check's fixed noise
# (tests/test_learning.py defines the floor widths W: 1.90 FID, 0.029 gap, 0.055 coverage).
# Measured here, FID / log-density gap / coverage_tv, before → after:
# - CD (N = 18, pseudo-Huber), seed 0: 7.16 → 6.85 / −0.531 → −0.318 / 0.057 → 0.051 (the gap falls by 7 W,
#   FID and coverage stay within W); seed 1: 7.16 → 7.27 / −0.531 → −0.344 / 0.057 → 0.055.
# - ECT (a stage every 0.32 kimg, so two), seed 0: 7.16 → 4.63 / −0.531 → −0.836 / 0.057 → 0.073 (FID falls by
#   1.3 W; the gap worsens at this budget); seed 1: 7.16 → 4.10 / −0.531 → −0.917 / 0.057 → 0.062. Longer,
#   1.92 kimg (seed 0): FID 3.04, gap −3.18, coverage 0.233.
LEARNING = {
    "cd": ["method=cd", "method.lr=5e-4"],
    "ect": ["method=ect", "method.lr=5e-4", "method.double_kimg=0.32"],
}


@pytest.mark.parametrize("method", list(LEARNING))
def test_a_short_budget_moves_the_one_step_student_towards_the_law(
    method,
    floor_width,  # noqa: F811
    cache_dir,  # noqa: F811
    tmp_path,
    deterministic_torch,  # noqa: F811 (fixtures of test_learning)
):
    from distillbench.train import build

    cfg = compose("train", [*COMMON, *LEARNING[method], "method.duration_kimg=0.64", "eval.every_kimg=0.64",
                            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])  # fmt: skip
    run = build(cfg)
    run.trainer.fit(run.method, datamodule=run.train_data)
    before, after = run.evaluation.history[0], run.evaluation.history[-1]
    assert (before["gen_step"], after["gen_step"]) == (0, 20)
    figures = {k: (round(before[k], 4), round(after[k], 4)) for k in (FID, GAP, COVERAGE)}
    report = f"{method}: before, after {figures}; floor widths {floor_width}"
    if method == "cd":
        assert abs(before[GAP]) - abs(after[GAP]) > floor_width[GAP], report
        assert after[FID] - before[FID] < floor_width[FID], report
    else:
        assert before[FID] - after[FID] > floor_width[FID], report
    assert after[COVERAGE] - before[COVERAGE] < floor_width[COVERAGE], report


# ---- exact resume ------------------------------------------------------------------------------------------
RESUME = ["data=toy2d", "method.batch_size=32", "method.duration_kimg=0.32", "checkpoint.every_kimg=0.16",
          "eval.n=64", "eval.every_kimg=0.16", "eval.teacher=false", "logger=csv",
          "trainer.deterministic=true", "threads=1"]  # fmt: skip


@pytest.mark.parametrize("method", ["cd", "ect"])
def test_a_run_stopped_between_checkpoints_resumes_bit_for_bit(
    method,
    tmp_path,
    deterministic_torch,  # noqa: F811 (a fixture of test_learning)
):
    """A run of 10 steps with checkpoints after 5 and 10; its folder cut back to step 5 (a kill between the
    two) resumes to the same weights, EMA, target network and counters."""
    whole = tmp_path / "whole"
    code, out, err = run_in_process("distillbench.train", *RESUME, f"method={method}",
                                    f"hydra.run.dir={whole}")  # fmt: skip
    assert code == 0, err[-3000:]
    killed = copy_at_step_five(whole, tmp_path / "killed")
    code, out, err = run_in_process("distillbench.train", *RESUME, f"method={method}", f"resume={killed}")
    assert code == 0 and "step_0000005.ckpt" in out, err[-3000:]
    a, b = weights(whole), weights(killed)
    assert int(b["gen_steps"]) == 10 and any(k.startswith("ema.") for k in b)
    assert method != "cd" or any(k.startswith("target.") for k in b)
    assert same_weights(a, b)
