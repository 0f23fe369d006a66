"""Compute accounting in teacher-forward equivalents (TFE): the passes each method states (its anatomy) are
the passes its training step makes, counted with hooks per sample, and a TFE budget sets the duration."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distillbench.callbacks import KimgBudget
from distillbench.config import ASSETS_DIR as ASSETS
from distillbench.methods import DMD2, ECT, ConsistencyDistillation
from distillbench.methods.accounting import (
    ComputeUnit,
    compute_unit,
    forward_equivalents,
    measure_forward_cost,
    unit_of_config,
)
from distillbench.methods.progressive import ProgressiveDistillation
from distillbench.teachers.analytic import analytic_teacher
from distillbench.teachers.denoiser import freeze
from tests.helpers import ROOT, compose
from tests.test_methods import METHODS, fit_one_step, tiny_teacher
from tests.test_progressive import fit, mlp_denoiser, toy_data


class SampleCounter:
    """Forward and backward passes of a module, counted in samples (a batch of B counts B), by hooks."""

    def __init__(self, module: nn.Module):
        self.module, self.forward, self.backward = module, 0, 0
        module.register_forward_hook(self.count_forward)
        module.register_full_backward_hook(self.count_backward)

    def count_forward(self, module, inputs, output) -> None:
        self.forward += output.shape[0]

    def count_backward(self, module, grad_input, grad_output) -> None:
        self.backward += grad_output[0].shape[0]

    def tfe(self, teacher: nn.Module) -> float:
        size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return forward_equivalents(self.forward, self.backward, size(self.module), size(teacher))


@pytest.mark.parametrize(
    ("name", "fake_updates", "passes", "per_image"),
    [  # (generator, fake score, teacher) as (forwards, backwards) per generator image
        ("sim", 1, [(2, 1), (2, 2), (1, 1)], 13),  # docs/algorithms.md §8: 5 forwards, 4 backwards
        ("sid", 1, [(2, 1), (2, 2), (1, 1)], 13),
        ("di", 1, [(2, 1), (2, 1), (1, 0)], 9),  # D_φ and D_ψ held constant in the θ-step: 5 and 2
        ("sim", 2, [(3, 1), (3, 3), (1, 1)], 17),  # two ψ-steps per θ-step
        ("dmd2", 1, [(2, 1), (2, 1), (1, 0)], 9),  # DI's passes (no gradient through φ and ψ)
        ("dmd2", 5, [(6, 1), (6, 5), (1, 0)], 25),  # the paper's two time-scale rule
    ],
)
def test_score_methods_count_the_passes_their_step_makes(name, fake_updates, passes, per_image):
    teacher = tiny_teacher()
    method = {**METHODS, "dmd2": DMD2}[name](teacher, batch_size=4, fake_updates=fake_updates)
    counters = [SampleCounter(m.net) for m in (method.generator, method.fake, teacher)]
    fit_one_step(method)
    assert [(c.forward, c.backward) for c in counters] == [(4 * f, 4 * b) for f, b in passes]
    assert float(method.tfe) == pytest.approx(4 * per_image)
    assert float(method.tfe) == pytest.approx(sum(c.tfe(teacher.net) for c in counters))
    assert float(method.train_seconds) > 0


def test_progressive_counts_two_teacher_forwards_and_a_student_step_per_sample():
    torch.manual_seed(0)
    teacher = freeze(mlp_denoiser())
    method = ProgressiveDistillation(teacher, n_start=2, stage_iterations=1, lr=1e-3)
    counters = [SampleCounter(m) for m in (method.student, teacher, method.previous_student)]
    fit(method)  # one step per stage, batch 32: the original teacher, then the previous student teaches
    assert [(c.forward, c.backward) for c in counters] == [(64, 64), (64, 0), (64, 0)]
    assert float(method.tfe) == pytest.approx(2 * 32 * 5)
    assert float(method.tfe) == pytest.approx(sum(c.tfe(teacher) for c in counters))


@pytest.mark.parametrize(
    ("cls", "networks", "passes", "per_image"),
    [  # per training image: CD's student, target and teacher (its Heun step); ECT's student at t and at r
        (ConsistencyDistillation, ("student", "target", "teacher"), [(1, 1), (1, 0), (2, 0)], 6),
        (ECT, ("student",), [(2, 1)], 4),
    ],
)
def test_consistency_methods_count_the_passes_their_step_makes(cls, networks, passes, per_image):
    from tests.test_consistency import fit

    teacher = tiny_teacher()
    method = cls(teacher)
    counters = [SampleCounter(getattr(method, name).net) for name in networks]
    fit(method, batch_size=4)
    assert [(c.forward, c.backward) for c in counters] == [(4 * f, 4 * b) for f, b in passes]
    assert float(method.tfe) == pytest.approx(4 * per_image)
    assert float(method.tfe) == pytest.approx(sum(c.tfe(teacher.net) for c in counters))


@pytest.mark.parametrize(("name", "per_image"), [("sim", 13), ("di", 9)])
def test_a_budget_sets_the_whole_steps_that_spend_it(name, per_image):
    method = METHODS[name](tiny_teacher(), batch_size=4)
    budget = 4 * 13 * 3 + 20  # three SIM steps' worth and a bit
    kimg = method.fit_budget(tfe=budget)
    steps = budget // (4 * per_image)  # SIM 3, DI 4
    assert kimg == pytest.approx(steps * 4 / 1000)
    fit_one_step(method, KimgBudget(kimg))
    assert int(method.gen_steps) == steps and float(method.tfe) == pytest.approx(steps * 4 * per_image)


def test_staged_budgets_scale_together_to_whole_steps_within_the_budget():
    method = ProgressiveDistillation(freeze(mlp_denoiser()), n_start=4, stage_kimg=[1, 2, 1], lr=1e-3,
                                     batch_size=32)  # fmt: skip
    kimg = method.fit_budget(tfe=40_000)  # 5 per sample: 8 kimg in all, split 1 : 2 : 1
    assert method.budgets == pytest.approx([62 * 0.032, 125 * 0.032, 62 * 0.032])  # whole batches of 32
    assert kimg == pytest.approx(249 * 0.032) and kimg * 1000 * 5 <= 40_000
    steps = ProgressiveDistillation(freeze(mlp_denoiser()), n_start=2, stage_iterations=[3, 1], lr=1e-3,
                                    batch_size=32)  # fmt: skip
    steps.fit_budget(tfe=32 * 5 * 8)
    assert steps.budgets == [6, 2], "step budgets stay whole numbers"


def test_a_duration_scales_the_stages_together_and_every_command_honours_debug_fast():
    method = ProgressiveDistillation(freeze(mlp_denoiser()), n_start=4, stage_kimg=[1, 2, 1], lr=1e-3,
                                     batch_size=32, duration_kimg=0.64)  # fmt: skip
    assert method.budgets == pytest.approx([5 * 0.032, 10 * 0.032, 5 * 0.032])  # 1 : 2 : 1 in whole batches
    assert method.planned_kimg() == pytest.approx(0.64)
    steps = ProgressiveDistillation(freeze(mlp_denoiser()), n_start=2, stage_iterations=[300, 100], lr=1e-3,
                                    batch_size=32, duration_kimg=0.128)  # fmt: skip
    assert steps.budgets == [3, 1] and steps.planned_kimg() == pytest.approx(0.128)
    for method in ("sim", "progressive", "direct"):
        cfg = compose("train", [f"method={method}", "debug=fast"])
        assert cfg.method.duration_kimg == 0.128, method


# ---- the unit with an analytic teacher: student-forward equivalents (SFE) ----------------------------------
def gmm_digits_teacher(cost: dict | None):
    from distillbench.teachers.gmm import gmm_teacher

    return gmm_teacher(str(ASSETS / "teachers" / "gmm_digits"), cost=cost)


def test_a_network_teacher_is_its_own_reference_and_an_analytic_one_names_the_student():
    network = compute_unit(tiny_teacher())
    assert network.name == "TFE" and network.teacher_forward == 1.0 and network.tfe_per_unit == 1.0
    assert network.reference_parameters == sum(p.numel() for p in tiny_teacher().parameters())
    cost = {"reference": "tiny UNet", "reference_parameters": 1000, "forward": 0.01}
    analytic = compute_unit(gmm_digits_teacher(cost))
    assert analytic == ComputeUnit("SFE", "tiny UNet", 1000, 0.01) and analytic.tfe_per_unit == pytest.approx(
        100
    )
    assert compute_unit(gmm_digits_teacher(None)) == ComputeUnit("TFE", "teacher", 0, 1.0)  # every pass 1
    assert unit_of_config(OmegaConf.create({"_target_": "x", "cost": cost})) == analytic
    assert unit_of_config(OmegaConf.create({"_target_": "x", "path": "digits"})).name == "TFE"


@pytest.mark.parametrize(("name", "per_image_networks", "teacher_passes"), [("sim", 10, 3), ("di", 8, 1)])
def test_with_an_analytic_teacher_networks_count_by_the_student_and_teacher_calls_at_their_cost(
    name, per_image_networks, teacher_passes
):
    student = tiny_teacher()
    size = sum(p.numel() for p in student.parameters())
    cost = {"reference": "tiny UNet", "reference_parameters": size, "forward": 0.01}
    method = METHODS[name](gmm_digits_teacher(cost), batch_size=4, student=student)
    # SIM: G 2 forwards 1 backward (4), ψ 2 and 2 (6), the teacher 1 and 1 (3 calls' worth at 0.01);
    # DI: G 4, ψ 2 forwards 1 backward (4), the teacher 1 forward
    per_image = per_image_networks + teacher_passes * 0.01
    assert method.tfe_per_sample() == pytest.approx(per_image)
    fit_one_step(method)
    assert float(method.tfe) == pytest.approx(4 * per_image)
    halved = METHODS[name](gmm_digits_teacher(cost | {"reference_parameters": 2 * size}), batch_size=4,
                           student=student)  # fmt: skip
    assert halved.tfe_per_sample() == pytest.approx(per_image_networks / 2 + teacher_passes * 0.01)


def test_progressive_pays_the_analytic_teacher_s_calls_then_the_previous_student_s_forwards():
    student = freeze(mlp_denoiser())
    size = sum(p.numel() for p in student.parameters())
    teacher = analytic_teacher(toy_data())  # the toy2d mixture, no parameters
    teacher.cost = {"reference": "MLP", "reference_parameters": size, "forward": 0.02}
    method = ProgressiveDistillation(teacher, student=student, n_start=2, stage_iterations=1, lr=1e-3)
    assert [method.cost_of(method.stage_anatomy(s)) for s in (0, 1)] == pytest.approx([3 + 2 * 0.02, 3 + 2])


def test_the_shipped_analytic_teachers_name_their_students_size_and_a_measured_cost(tmp_path):
    for data in ("gmm_digits", "gmm_mnist"):
        cfg = compose("train", [f"data={data}"])
        student = hydra.utils.instantiate(cfg.student)
        assert cfg.teacher.cost.reference_parameters == sum(p.numel() for p in student.parameters())
        record = json.loads((ROOT / "experiments" / "leaderboard" / f"forward_cost_{data}.json").read_text())
        assert record["reference_parameters"] == cfg.teacher.cost.reference_parameters
        assert cfg.teacher.cost.forward == pytest.approx(record["forward"], abs=5e-5)  # as written, rounded
    teacher = hydra.utils.instantiate(compose("train", ["data=gmm_digits"]).teacher)
    measured = measure_forward_cost(teacher, student, batch_size=8, repeats=3)
    assert 0 < measured["forward"] < 1, measured  # a mixture's call is cheaper than a UNet's forward


def test_trajectories_are_charged_at_the_teacher_s_cost_in_the_run_s_unit(tmp_path):
    from distillbench.train import plan_budget

    student = tiny_teacher()
    cost = {"reference": "tiny UNet", "reference_parameters": sum(p.numel() for p in student.parameters()),
            "forward": 0.01}  # fmt: skip
    method = METHODS["sim"](gmm_digits_teacher(cost), batch_size=4, student=student)
    data = SimpleNamespace(manifest={"steps": 20, "splits": {"train": [{"count": 100}]}})
    cfg = OmegaConf.create({"budget_tfe": 1000.0, "method": {"batch_size": 4}, "eval": {}})
    plan_budget(cfg, method, data)
    assert float(method.tfe) == pytest.approx(100 * 20 * 0.01)  # 2000 teacher calls, 20 SFE
    assert cfg.method.duration_kimg == pytest.approx(math.floor(980 / (4 * 10.03)) * 4 / 1000)
