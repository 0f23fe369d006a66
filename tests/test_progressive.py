"""Progressive distillation: the two-step target, nested grids, weightings, stages, bad settings, toy2d."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from torch import nn

from distillbench.callbacks.evaluation import PeriodicEvaluation
from distillbench.callbacks.stages import StageEvaluation
from distillbench.data.base import TensorDataModule
from distillbench.data.toy2d import Toy2DDataModule
from distillbench.errors import ConfigError
from distillbench.methods.guided import GuidedDistillation, GuidedStudent, guided_target
from distillbench.methods.progressive import (
    ProgressiveDistillation,
    euler_step,
    loss_weight,
    student_target,
    teacher_two_steps,
)
from distillbench.nets import MLPBackbone, UNetBackbone
from distillbench.samplers import EulerSampler, karras
from distillbench.teachers.analytic import AnalyticMixtureDenoiser
from distillbench.teachers.denoiser import Denoiser, EDMDenoiser, as_sigma_batch, freeze
from distillbench.teachers.training import drop_labels, edm_loss


def toy_data(**kwargs) -> Toy2DDataModule:
    return Toy2DDataModule(**{"n_train": 512, "batch_size": 32, **kwargs})


def analytic_teacher() -> AnalyticMixtureDenoiser:
    return AnalyticMixtureDenoiser(toy_data().mixture)


def mlp_denoiser(hidden: int = 32, depth: int = 2) -> EDMDenoiser:
    return EDMDenoiser(MLPBackbone(2, hidden, depth, 16), sample_shape=(2,))


def noised(n: int, sigma: torch.Tensor) -> torch.Tensor:
    """Mixture samples noised to σ, in float64."""
    x0, _ = toy_data().mixture.sample(n, rng=torch.Generator().manual_seed(1))
    return x0.double() + sigma.reshape(-1, 1) * torch.randn(n, 2, dtype=torch.float64)


def params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


# ---- the target --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [8, 4, 2, 1])
def test_a_student_step_to_the_target_lands_where_two_teacher_steps_land(steps):
    teacher = analytic_teacher()
    method = ProgressiveDistillation(teacher, mlp_denoiser(), n_start=8, stage_iterations=1)
    student_grid, teacher_grid = method.grids(steps)
    assert student_grid[-1] == 0 and len(teacher_grid) == 2 * steps + 1
    for i in range(steps):  # i = steps − 1 is the last step, to σ = 0
        points = (student_grid[i], teacher_grid[2 * i + 1], student_grid[i + 1])
        sigma, sigma_mid, sigma_next = (torch.full((256,), float(s), dtype=torch.float64) for s in points)
        x = noised(256, sigma)
        x_next = teacher_two_steps(teacher, x, sigma, sigma_mid, sigma_next)
        landed = euler_step(x, student_target(x, x_next, sigma, sigma_next), sigma, sigma_next)
        torch.testing.assert_close(landed, x_next, rtol=1e-9, atol=1e-9)


class OracleStudent(Denoiser):
    """A student that outputs the progressive-distillation target x̃ at every point of its grid."""

    def __init__(self, teacher, student_grid, teacher_grid):
        super().__init__()
        self.teacher, self.student_grid, self.teacher_grid = teacher, student_grid, teacher_grid
        self.sample_shape = teacher.sample_shape

    def forward(self, x, sigma, labels=None):
        i = int(torch.argmin((self.student_grid - sigma[0]).abs()))
        sigma, sigma_mid, sigma_next = (torch.full_like(sigma, float(s), dtype=torch.float64)
                                        for s in (self.student_grid[i], self.teacher_grid[2 * i + 1],
                                                  self.student_grid[i + 1]))  # fmt: skip
        return student_target(x, teacher_two_steps(self.teacher, x, sigma, sigma_mid, sigma_next), sigma,
                              sigma_next)  # fmt: skip


@pytest.mark.parametrize("steps", [4, 1])
def test_the_oracle_student_sampler_reproduces_the_teacher_at_twice_the_steps(steps):
    teacher = analytic_teacher()
    method = ProgressiveDistillation(teacher, mlp_denoiser(), n_start=4, stage_iterations=1)
    z = torch.randn(512, 2)
    student = method.sampler(steps).sample(OracleStudent(teacher, *method.grids(steps)), z)
    reference = EulerSampler(steps=2 * steps, schedule=method.schedule).sample(teacher, z)
    assert (student.nfe, reference.nfe) == (steps, 2 * steps)
    torch.testing.assert_close(student.x, reference.x, rtol=1e-5, atol=1e-5)


def test_grids_nest_so_each_teacher_steps_on_its_own_student_grid():
    method = ProgressiveDistillation(analytic_teacher(), mlp_denoiser(), n_start=16, stage_iterations=1)
    torch.testing.assert_close(method.grids(16)[1], karras(32))
    for steps in (8, 4, 2, 1):
        student_grid, teacher_grid = method.grids(steps)
        torch.testing.assert_close(teacher_grid, method.grids(2 * steps)[0])
        torch.testing.assert_close(teacher_grid[::2], student_grid)
        assert student_grid[0] == 80.0 and student_grid[-1] == 0.0


def test_weightings_are_max_of_x_and_eps_mse_and_the_v_mse():
    """x_σ = x + σn: ε̂ = (x_σ − D)/σ gives ε-MSE = x-MSE/σ², so SNR = 1/σ²; in VP form (α = 1/sqrt(1 + σ²),
    σ_VP = ασ) v̂ = α·ε̂ − σ_VP·x̂."""
    sigma = torch.tensor([0.01, 0.3, 1.0, 4.0, 80.0], dtype=torch.float64)
    x_sigma, pred, target = (torch.randn(5, 2, dtype=torch.float64) for _ in range(3))
    x_mse = ((pred - target) ** 2).mean(1)
    eps_mse = (((x_sigma - pred) - (x_sigma - target)) / sigma[:, None]).pow(2).mean(1)
    alpha = (1 + sigma**2).rsqrt()[:, None]

    def v(d):
        return alpha * (x_sigma - d) / sigma[:, None] - alpha * sigma[:, None] * d

    v_mse = ((v(pred) - v(target)) ** 2).mean(1)
    snr_trunc, v_weight = (loss_weight(sigma, w).double() for w in ("snr_trunc", "v"))
    torch.testing.assert_close(snr_trunc * x_mse, torch.maximum(x_mse, eps_mse), rtol=1e-6, atol=0)
    torch.testing.assert_close(v_weight * x_mse, v_mse, rtol=1e-6, atol=0)


# ---- stages ------------------------------------------------------------------------------------------------
class Recorder(L.Callback):
    """Per training batch: the student's weights before and after, and the step counts."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before, self.steps_before = params(pl_module.student), pl_module.steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        student = params(pl_module.student)
        self.rows.append({"moved": not torch.equal(self.before, student),
                          "steps": (self.steps_before, pl_module.steps),
                          "teacher_is_student_copy": torch.equal(params(pl_module.teacher), student),
                          "adam_state": len(trainer.optimizers[0].state)})  # fmt: skip


def fit(method, callbacks=(), data=None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(method, datamodule=data or toy_data())
    return trainer


def test_one_step_per_stage_trains_then_the_student_becomes_the_teacher_and_steps_halve(tmp_path):
    torch.manual_seed(0)
    teacher = freeze(mlp_denoiser())
    teacher_before = params(teacher)
    method = ProgressiveDistillation(teacher, n_start=4, stage_iterations=1, lr=1e-3)
    recorder = Recorder()
    trainer = fit(method, [recorder])
    assert trainer.global_step == 3 and method.done, "the method stops the trainer after the last stage"
    assert [r["steps"] for r in recorder.rows] == [(4, 2), (2, 1), (1, 1)]
    assert all(r["moved"] for r in recorder.rows), "every stage's optimisation step changes the student"
    assert [r["teacher_is_student_copy"] for r in recorder.rows] == [True, True, False]
    assert [r["adam_state"] for r in recorder.rows] == [0, 0, len(list(method.student.parameters()))]
    records = [(s["stage"], s["steps"], s["gen_step"]) for s in method.finished_stages]
    assert records == [(0, 4, 1), (1, 2, 2), (2, 1, 3)]
    torch.testing.assert_close(params(teacher), teacher_before)

    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not any(k.startswith("_teacher") for k in state), "the original teacher stays out of checkpoints"
    fresh = ProgressiveDistillation(freeze(mlp_denoiser()), n_start=4, stage_iterations=1)
    fresh.load_state_dict(state)
    assert fresh.done and fresh.steps == 1
    torch.testing.assert_close(params(fresh.teacher), params(method.previous_student))


def test_kimg_budgets_decay_the_learning_rate_linearly_within_each_stage():
    method = ProgressiveDistillation(analytic_teacher(), mlp_denoiser(), n_start=2, stage_kimg=[0.128, 0.064],
                                     lr=[1e-3, 4e-4])  # fmt: skip
    lrs = []
    method.log_train = lambda metrics: lrs.append(metrics["train/lr"])
    fit(method, data=toy_data(batch_size=32))
    assert method.gen_steps == 6 and method.kimg == pytest.approx(0.192)
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor([1e-3, 7.5e-4, 5e-4, 2.5e-4, 4e-4, 2e-4]))


class MeanMetric:
    def evaluate(self, x, datamodule):
        return {"mean": float(x.mean())}

    def protocol(self, datamodule):
        return {"extractor": "mean"}


def test_stage_evaluation_samples_each_stage_at_its_own_step_count():
    method = ProgressiveDistillation(analytic_teacher(), mlp_denoiser(), n_start=4, stage_iterations=1)
    calls = []
    method.student.register_forward_hook(lambda *_: calls.append(1))
    evaluation = PeriodicEvaluation(MeanMetric(), toy_data(), every_kimg=1e9, n=10, batch_size=10)
    measure = evaluation.measure

    def counting(trainer, pl_module, sample):
        calls.clear()
        figures, x = measure(trainer, pl_module, sample)
        return figures | {"student_calls": len(calls)}, x

    evaluation.measure = counting
    callback = StageEvaluation(evaluation)
    fit(method, [callback])
    assert [(r["steps"], r["nfe"], r["student_calls"]) for r in callback.history] == [
        (4, 4, 4),
        (2, 2, 2),
        (1, 1, 1),
    ]
    final = method.sample(torch.zeros(10, 2))
    assert final.shape == (10, 2) and torch.isfinite(final).all()


# ---- bad settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_start": 48}, r"method.n_start=48 must be a power of two"),
        ({"n_start": 0}, r"method.n_start=0 must be a power of two"),
        (
            {"stage_kimg": 0, "stage_iterations": None},
            r"method.stage_kimg=0 must be a number > 0 or a list of them",
        ),
        (
            {"stage_iterations": [1, 0, 1]},
            r"method.stage_iterations=\[1, 0, 1\] must be a number > 0 or a list",
        ),
        (
            {"stage_iterations": [1, 1]},
            r"method.stage_iterations=\[1, 1\] has 2 entries but there are 3 stages",
        ),
        ({"stage_iterations": 1, "stage_kimg": 1}, r"set exactly one of them"),
        ({"stage_iterations": None}, r"set exactly one of them"),
        ({"lr": -1e-4}, r"method.lr=-0.0001 must be a number > 0"),
        ({"weighting": "eps"}, r"method.weighting='eps' is not one of"),
        ({"lr_schedule": "cosine"}, r"method.lr_schedule='cosine'"),
        ({"grad_clip": 0.0}, r"method.grad_clip=0.0 must be a number > 0"),
    ],
)
def test_bad_settings_fail_in_init_naming_key_value_and_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ProgressiveDistillation(
            analytic_teacher(), mlp_denoiser(), **{"n_start": 4, "stage_iterations": 1, **kwargs}
        )


def test_a_student_of_another_shape_is_refused():
    with pytest.raises(ConfigError, match="pick a student= that matches the data"):
        ProgressiveDistillation(
            analytic_teacher(), EDMDenoiser(MLPBackbone(3), (3,)), n_start=4, stage_iterations=1
        )


# ---- slow: the 1-step student of the analytic toy2d teacher ------------------------------------------------
def fit_denoiser(student: EDMDenoiser, steps: int, batch: int = 512, labelled: bool = False) -> EDMDenoiser:
    """Train the student MLP with the EDM loss on fresh mixture samples: the analytic teacher has no weights
    to copy, so the student starts from this denoiser (as tests/test_convergence.py does)."""
    mixture = toy_data().mixture
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    rng = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x0, component = mixture.sample(batch, rng=rng)
        labels = drop_labels(component, 4, 0.1) if labelled else None  # the null token, as teachers learn it
        loss = edm_loss(student, x0, labels, rng=rng).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


@pytest.mark.slow
def test_the_one_step_student_keeps_every_mode_share_within_five_points():
    torch.manual_seed(0)
    data = toy_data(n_train=20000, batch_size=256)
    teacher = analytic_teacher()
    start = time.perf_counter()
    student = fit_denoiser(EDMDenoiser(MLPBackbone(2, 128, 3, 32), (2,)), steps=3000)
    method = ProgressiveDistillation(teacher, student, n_start=32, stage_iterations=1500, lr=1e-3)
    fit(method, data=data)
    x = method.sample(torch.randn(20000, 2, generator=torch.Generator().manual_seed(2)))
    shares = data.mixture.mode_shares(x)
    print(f"1-step shares {shares.tolist()} vs {data.mixture.weights.tolist()}, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    assert method.done and method.steps == 1
    assert (shares - data.mixture.weights).abs().max() <= 0.05


# ---- guided distillation (Meng et al.) ---------------------------------------------------------------------
class LabelledToy(TensorDataModule):
    """toy2d samples labelled by their mixture component (4 classes)."""

    name, num_classes = "toy2d_labelled", 4

    def __init__(self, n_train: int = 512, batch_size: int = 32):
        super().__init__(batch_size)
        self.mixture, self.n_train = toy_data().mixture, n_train

    def load(self, split: str):
        return self.mixture.sample(self.n_train, rng=torch.Generator().manual_seed(0))


class ConditionalMixtureDenoiser(Denoiser):
    """Exact D(x; σ, c) of component c of the toy mixture; the whole mixture's for no label (or label 4)."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.mixture, self.sample_shape = toy_data().mixture, (2,)

    def forward(self, x, sigma, labels=None):
        unconditional = AnalyticMixtureDenoiser(self.mixture)(x, sigma)
        if labels is None:
            return unconditional
        component = labels.clamp(max=3)
        means, var = self.mixture.means.to(x)[component], self.mixture.stds.to(x)[component, None] ** 2
        conditional = means + var / (var + as_sigma_batch(sigma, x).to(x) ** 2) * (x - means)
        return torch.where((labels == 4)[:, None], unconditional, conditional)


def conditional_mlp(hidden: int = 32, depth: int = 2) -> EDMDenoiser:
    return EDMDenoiser(MLPBackbone(2, hidden, depth, 16, num_classes=4), sample_shape=(2,), num_classes=4)


def tiny_unet() -> EDMDenoiser:
    net = UNetBackbone(8, 1, (8, 16), 1, num_classes=4, norm_num_groups=4)
    return EDMDenoiser(net, sample_shape=(1, 8, 8), num_classes=4)


@pytest.mark.parametrize("make", [conditional_mlp, tiny_unet])
def test_the_guided_student_starts_as_the_teacher_and_w_enters_through_the_embedding(make):
    teacher = freeze(make())
    student = GuidedStudent(teacher, w=2.0)
    x = torch.randn(3, *teacher.sample_shape)
    sigma, labels = torch.full((3,), 0.7), torch.tensor([0, 1, 2])
    before = teacher(x, sigma, labels)
    torch.testing.assert_close(student(x, sigma, labels), before)
    nn.init.normal_(student.w_embed.out.weight)
    w0, w3 = (student(x, sigma, labels, w=torch.full((3,), w)) for w in (0.0, 3.0))
    assert not torch.allclose(w0, w3), "w must change the output once the embedding is trained"
    torch.testing.assert_close(student(x, sigma, labels), student(x, sigma, labels, w=torch.full((3,), 2.0)))
    torch.testing.assert_close(teacher(x, sigma, labels), before, msg="the teacher itself is left untouched")


def test_the_guidance_target_is_the_cfg_combination_with_the_null_token():
    teacher = ConditionalMixtureDenoiser()
    x, sigma = noised(6, torch.full((6,), 0.5, dtype=torch.float64)), torch.full((6,), 0.5)
    labels, w = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 0.5])
    conditional, null_token = teacher(x, sigma, labels), teacher(x, sigma, torch.full((6,), 4))
    expected = (1 + w[:, None]) * conditional - w[:, None] * null_token
    torch.testing.assert_close(guided_target(teacher, x, sigma, labels, w), expected)


def test_guided_distillation_runs_its_guidance_stage_then_halves_at_fixed_w():
    method = GuidedDistillation(
        freeze(conditional_mlp()), n_start=2, stage_iterations=1, guidance_iterations=1, lr=1e-3, w=1.5
    )
    recorder = Recorder()
    trainer = fit(method, [recorder], data=LabelledToy())
    assert trainer.global_step == 3 and method.done
    assert [r["steps"] for r in recorder.rows] == [(4, 2), (2, 1), (1, 1)]
    assert all(r["moved"] for r in recorder.rows)
    assert [r["teacher_is_student_copy"] for r in recorder.rows] == [True, True, False]
    assert isinstance(method.teacher, GuidedStudent) and method.teacher.w == 1.5


def test_guided_distillation_refuses_unlabelled_data_before_training():
    method = GuidedDistillation(
        freeze(conditional_mlp()), n_start=2, stage_iterations=1, guidance_iterations=1
    )
    with pytest.raises(ConfigError, match="method=guided needs labelled data, data=toy2d has none"):
        fit(method, data=toy_data())
    assert method.gen_steps == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher": AnalyticMixtureDenoiser(toy_data().mixture)}, r"needs a class-conditional teacher"),
        ({"w": 5.0}, r"method.w=5.0 must be a number in \[0.0, 4.0\] \(method.w_min <= w <= method.w_max\)"),
        ({"guidance_iterations": 0}, r"method.guidance_iterations=0 must be a number > 0"),
        (
            {"guidance_iterations": None, "guidance_kimg": 1},
            r"method.guidance_kimg=1 is in kimg but the stage budgets in iterations; give "
            r"method.guidance_iterations",
        ),
        ({"guidance_lr": 0.0}, r"method.guidance_lr=0.0 must be a number > 0, or null"),
        ({"student": ConditionalMixtureDenoiser()}, r"adds its w-embedding to the σ-embedding"),
    ],
)
def test_bad_guided_settings_fail_in_init(kwargs, match):
    settings = {
        "teacher": freeze(conditional_mlp()),
        "n_start": 2,
        "stage_iterations": 1,
        "guidance_iterations": 1,
        **kwargs,
    }
    with pytest.raises(ConfigError, match=match):
        GuidedDistillation(**settings)


class Guided(Denoiser):
    """A teacher with classifier-free guidance at weight w, for the reference sampler."""

    def __init__(self, teacher, w: float):
        super().__init__()
        self.teacher, self.w, self.sample_shape = teacher, w, teacher.sample_shape

    def forward(self, x, sigma, labels=None):
        return guided_target(self.teacher, x, sigma, labels, torch.full((x.shape[0],), self.w))


@pytest.mark.slow
def test_the_one_step_guided_student_matches_the_guided_teacher_per_class():
    """Guidance at w = 1 moves each class outward and shrinks it (std ≈ 0.06 against the data's 0.1); the
    1-step student must reproduce the 32-step guided Euler teacher's per-class mean and spread."""
    torch.manual_seed(0)
    teacher, data = ConditionalMixtureDenoiser(), LabelledToy(n_train=20000, batch_size=256)
    start = time.perf_counter()
    student = fit_denoiser(conditional_mlp(128, 3), steps=3000, labelled=True)
    method = GuidedDistillation(teacher, student, n_start=16, stage_iterations=1500, guidance_iterations=1500,
                                lr=1e-3, w=1.0)  # fmt: skip
    fit(method, data=data)
    z = torch.randn(8000, 2, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(4).repeat(2000)
    x_student = method.sample(z, labels)
    x_teacher = EulerSampler(steps=32, schedule=method.schedule).sample(Guided(teacher, 1.0), z, labels).x
    print(f"{time.perf_counter() - start:.0f} s")
    assert method.done and method.steps == 1
    for c in range(4):
        student_c, teacher_c = x_student[labels == c], x_teacher[labels == c]
        assert (student_c.mean(0) - teacher_c.mean(0)).abs().max() <= 0.03, c
        assert (student_c.std(0) - teacher_c.std(0)).abs().max() <= 0.02, c


def test_the_train_command_runs_every_stage_and_reports_each_step_count(tmp_path):
    import json

    from tests.helpers import run_folder, run_here

    proc = run_here(
        "distillbench.train", "method=progressive", "data=toy2d", "method.n_start=4",
        "method.stage_kimg=null", "method.stage_iterations=2", "method.batch_size=32", "eval.n=256",
        "eval.every_kimg=1", "teacher_sampler.steps=2", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((run_folder(proc) / "summary.json").read_text())
    assert [row["nfe"] for row in summary["stages"]] == [4, 2, 1]
    assert [row["gen_step"] for row in summary["stages"]] == [2, 4, 6]
    assert summary["student"]["nfe"] == 1 and "fid_data@256" in summary["stages"][0]
