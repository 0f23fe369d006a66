"""Config validation before any work: bad settings fail with a message naming the key, the value and the
allowed range; every shipped config passes; the output folder and the teacher-data checks."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from omegaconf import open_dict

from distillbench.errors import ConfigError
from distillbench.methods import SiD
from distillbench.rules import number
from distillbench.teachers.checkpoint import check_teacher_fits
from distillbench.utils.command import check_writable
from distillbench.validation import validate_train_config
from tests.helpers import EVALUATE_EXPERIMENTS, ROOT, compose, run_here

# (overrides, "<key>=<bad value>" that the message names, a piece of the allowed range or choices)
INVALID = [
    # top level
    (["seed=-1"], "seed=-1", "[0, 4294967295]"),
    (["threads=0"], "threads=0", ">= 1, or null"),
    (["max_bad_steps=0"], "max_bad_steps=0", ">= 1"),
    (["budget_tfe=0"], "budget_tfe=0", "> 0, or null"),
    (["budget_tfe=1e5", "eval.curve_points=0"], "eval.curve_points=0", ">= 1, or null"),
    (["eval.curve_points=4"], "eval.curve_points spreads evaluations over budget_tfe", "set budget_tfe"),
    (["resume=''"], "resume=''", "run folder path"),
    (["teacher_sampler.steps=0"], "teacher_sampler.steps=0", ">= 1"),
    (["schedule@teacher_sampler.schedule=improved", "teacher_sampler.schedule.p=0"], "schedule.p=0", "> 0"),
    # checkpoint
    (["checkpoint.every_kimg=0"], "checkpoint.every_kimg=0", "> 0"),
    (["checkpoint.keep=1.5"], "checkpoint.keep=1.5", "an integer >= 1"),
    (["checkpoint.fallback=1"], "checkpoint.fallback=1", "true or false"),
    # distill
    (["method.batch_size=0"], "method.batch_size=0", ">= 1"),
    (["method.batch_size=true"], "method.batch_size=True", "an integer >= 1"),  # a bool is not an int
    (["method.sigma_init=0"], "method.sigma_init=0", "> 0"),
    (["method.fake_updates=0"], "method.fake_updates=0", ">= 1"),
    (["method.duration_kimg=-3"], "method.duration_kimg=-3", "> 0"),
    (["method.ema_halflife_kimg=-1"], "method.ema_halflife_kimg=-1", ">= 0"),
    (["method.ema_rampup_ratio=-0.1"], "method.ema_rampup_ratio=-0.1", ">= 0, or null"),
    (["method.loss_scaling_g=0"], "method.loss_scaling_g=0", "> 0"),
    (["method.t_max=1.5"], "method.t_max=1.5", "(0, 1]"),
    (["method.t_max=nan"], "method.t_max=nan", "(0, 1]"),
    # optim
    (["method.lr=-1"], "method.lr=-1", "> 0"),
    (["method.lr=abc"], "method.lr='abc'", "a number > 0"),
    (["method.fake_lr=0"], "method.fake_lr=0", "> 0, or null"),
    (["method.betas=[0.9,1.0]"], "method.betas=[0.9, 1.0]", "[0, 1)"),
    (["method.betas=[0.9]"], "method.betas=[0.9]", "two numbers"),
    (["method.eps=0"], "method.eps=0", "> 0"),
    # eval
    (["eval.every_kimg=0"], "eval.every_kimg=0", "> 0"),
    (["eval.n=1"], "eval.n=1", ">= 2"),
    (["eval.noise_seed=-5"], "eval.noise_seed=-5", ">= 0"),
    (["eval.batch_size=0"], "eval.batch_size=0", ">= 1"),
    (["eval.grid_size=-1"], "eval.grid_size=-1", ">= 0"),
    (["eval.teacher=yes"], "eval.teacher='yes'", "true or false"),
    # trainer, and the batch over the processes
    (["trainer.accelerator=npu"], "trainer.accelerator='npu'", "'cuda'"),
    (["trainer.devices=0"], "trainer.devices=0", "'auto'"),
    (["trainer.devices=[]"], "trainer.devices=[]", "non-empty list"),
    (["+trainer.num_nodes=0"], "trainer.num_nodes=0", ">= 1"),
    (["trainer.precision=fp8"], "trainer.precision='fp8'", "'bf16-mixed'"),
    (["trainer.precision=16.0"], "trainer.precision=16.0", "'32-true'"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0", ">= 1"),
    (["trainer=ddp_sim", "method.batch_size=63"], "method.batch_size=63", "multiple of 2, e.g. 64"),
    (["trainer.devices=2", "+trainer.num_nodes=2", "method.batch_size=6"], "method.batch_size=6", "of 4"),
    (["trainer.devices=[0,1,2]", "method.batch_size=64"], "method.batch_size=64", "multiple of 3"),
    # SIM
    (["method.distance=l1"], "method.distance='l1'", "'pseudo_huber'"),
    (["method.c=0"], "method.c=0", "> 0, or null"),
    (["method.weighting=snr"], "method.weighting='snr'", "'unit'"),
    (["method.time_law=p_x"], "method.time_law='p_x'", "'p_edm'"),
    (["method.detach_normaliser=0"], "method.detach_normaliser=0", "true or false"),
    # SiD
    (["method=sid", "method.alpha=5"], "method.alpha=5", "[0, 2]"),
    (["method=sid", "method.alpha=-0.5"], "method.alpha=-0.5", "[0, 2]"),
    # progressive
    (["method=progressive", "method.n_start=48"], "method.n_start=48", "power of two"),
    (["method=progressive", "method.stage_iterations=100"], "method.stage_kimg=10", "exactly one"),
    (["method=progressive", "method.stage_kimg=[1,2]"], "method.stage_kimg=[1, 2]", "there are 7 stages"),
    (["method=progressive", "method.lr=[0.1,-1]"], "method.lr=[0.1, -1]", "a number > 0 or a list"),
    (["method=progressive", "method.lr_schedule=cosine"], "method.lr_schedule='cosine'", "'linear'"),
    (["method=progressive", "method.weighting=eps"], "method.weighting='eps'", "'snr_trunc'"),
    (["method=progressive", "method.grad_clip=0"], "method.grad_clip=0", "> 0, or null"),
    (["method=progressive", "method.schedule.rho=0"], "method.schedule.rho=0", "> 0"),
    # guided
    (["method=guided", "method.w=5"], "method.w=5", "[0.0, 4.0]"),
    (["method=guided", "method.w_min=-1"], "method.w_min=-1", ">= 0"),
    (["method=guided", "method.w_min=5.0"], "method.w_min=5.0", "[0, 4.0]"),
    (["method=guided", "method.guidance_iterations=100"], "method.guidance_kimg=10", "exactly one"),
    (
        ["method=guided", "method.stage_kimg=null", "method.stage_iterations=5"],
        "method.guidance_kimg=10",
        "iterations",
    ),
    (["method=guided", "method.guidance_lr=0"], "method.guidance_lr=0", "> 0, or null"),
    # direct
    (["method=direct", "method.k=25"], "method.k=25", "[1, 19]"),
    (["method=direct", "method.steps=1"], "method.steps=1", ">= 2"),
    (["method=direct", "method.iterations=0"], "method.iterations=0", ">= 1"),
    (["method=direct", "method.refine_iterations=-1"], "method.refine_iterations=-1", ">= 0"),
    (["method=direct", "method.l1_fraction=1.5"], "method.l1_fraction=1.5", "[0, 1]"),
    (["method=direct", "method.lr=0"], "method.lr=0", "> 0"),
    (["method=direct", "method.eta_min=0.001"], "method.eta_min=0.001", "[0, 0.0005)"),
    (["method=direct", "method.refiner=null"], "method.refine_iterations=1000", "method.refiner=null"),
    (["method=direct", "method.grad_clip=-1"], "method.grad_clip=-1", "> 0, or null"),
]

VALID = [
    [],
    ["method=sid"],
    ["budget_tfe=65000", "eval.curve_points=4"],
    ["method=di"],
    ["method=progressive"],
    [
        "method=progressive",
        "method.stage_kimg=null",
        "method.stage_iterations=[1,2,3,4,5,6,7]",
        "method.lr=[1,1,1,1,1,1,1]",
    ],
    [
        "method=guided",
        "method.stage_kimg=null",
        "method.stage_iterations=9",
        "method.guidance_kimg=null",
        "method.guidance_iterations=[9]",
        "method.w=0.0",
        "method.w_max=0.0",
    ],
    ["method=guided"],
    ["method=direct", "method.refiner=null", "method.refine_iterations=0"],
    ["trainer=ddp", "trainer.devices=auto", "trainer.precision=bf16-mixed", "resume=true"],
    ["trainer=gpu", "trainer.devices=-1", "trainer.precision=16", "+trainer.num_nodes=2", "resume=/a/run"],
    [
        "trainer.devices=[0,1]",
        "method.fake_lr=1e-5",
        "method.c=null",
        "threads=2",
        "method.ema_rampup_ratio=null",
    ],
    ["eval.grid_size=0", "checkpoint.fallback=true", "method.detach_normaliser=true", "seed=4294967295"],
    ["sampler@teacher_sampler=dpmpp2m", "schedule@teacher_sampler.schedule=log_uniform"],
]


def message_of(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        validate_train_config(compose("train", overrides))
    return str(err.value)


@pytest.mark.parametrize(("overrides", "named", "allowed"), INVALID, ids=[" ".join(o) for o, *_ in INVALID])
def test_a_bad_setting_fails_naming_its_key_value_and_range(overrides, named, allowed):
    message = message_of(overrides)
    assert named in message and allowed in message, message


@pytest.mark.parametrize("overrides", VALID, ids=" ".join)
def test_good_settings_pass(overrides):
    validate_train_config(compose("train", overrides))


EXPERIMENTS = ROOT / "conf/experiment"
TRAIN_EXPERIMENTS = sorted(
    name
    for p in EXPERIMENTS.rglob("*.yaml")
    if (name := p.relative_to(EXPERIMENTS).with_suffix("").as_posix()) not in EVALUATE_EXPERIMENTS
)


@pytest.mark.parametrize("experiment", TRAIN_EXPERIMENTS)
def test_every_shipped_train_experiment_passes(experiment):
    validate_train_config(compose("train", [f"experiment={experiment}"]))


def test_a_config_without_the_keys_of_other_commands_passes():
    cfg = compose("train", [])
    with open_dict(cfg):
        del cfg["eval"], cfg["checkpoint"], cfg["method"]
    validate_train_config(cfg)


# ---- the output folder -------------------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_naming_the_key(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        for path in (folder, folder / "run"):
            with pytest.raises(ConfigError, match="paths.output_dir=.*writable folder.*hydra.run.dir="):
                check_writable(path)
    finally:
        folder.chmod(0o700)


def test_an_output_folder_under_a_file_fails_naming_the_key(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^my.key='.*file/run' must be a writable folder"):
        check_writable(tmp_path / "file" / "run", key="my.key")


def test_a_writable_folder_is_left_as_it_was_and_a_missing_one_is_made(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    check_writable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "sub"]
    check_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not any((tmp_path / "new" / "run").iterdir())


# ---- the teacher and the data ------------------------------------------------------------------------------
def teacher(shape=(1, 8, 8), classes=10):
    return SimpleNamespace(sample_shape=shape, num_classes=classes, info={"data": "digits"})


def data(name="digits", shape=(1, 8, 8), classes=10):
    return SimpleNamespace(name=name, sample_shape=shape, num_classes=classes)


def test_a_teacher_that_fits_the_data_passes():
    check_teacher_fits(teacher(), data())
    check_teacher_fits(teacher(classes=0), data())  # an unconditional teacher ignores the labels
    # a conditional teacher samples unconditionally (its null label) for unlabelled data
    check_teacher_fits(teacher(), data(classes=0))


def test_a_teacher_of_another_shape_fails_naming_both():
    with pytest.raises(ConfigError) as err:
        check_teacher_fits(teacher(), data("mnist", shape=(1, 32, 32)))
    message = str(err.value)
    assert (
        "teacher 'digits' makes samples of shape (1, 8, 8) but data 'mnist' has shape (1, 32, 32)" in message
    )
    assert "pick teacher=mnist" in message


def test_a_teacher_with_other_classes_fails_naming_both():
    with pytest.raises(ConfigError) as err:
        check_teacher_fits(teacher(), data("letters", classes=26), name="checkpoint")
    message = str(err.value)
    assert "teacher 'checkpoint' has num_classes=10 but data 'letters' has num_classes=26" in message
    assert "pick teacher=letters" in message


# ---- end to end --------------------------------------------------------------------------------------------
def test_the_train_command_fails_before_any_work(tmp_path):
    run = tmp_path / "run"
    proc = run_here("distillbench.train", "data=toy2d", "method.betas=[0.9,1.0]", f"hydra.run.dir={run}",
                   cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "method.betas=[0.9, 1.0] must be two numbers [beta1, beta2], each in [0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run.exists()


class ToyMethod(SiD):
    """A method defined outside the package: its keys are checked by its own declaration alone."""

    settings = {"beta": number(gt=0, lt=1)}


def test_a_new_method_gets_its_keys_checked_from_its_own_declaration():
    cfg = compose(
        "train", ["data=toy2d", "method=sid", f"method._target_={__name__}.ToyMethod", "+method.beta=1.5"]
    )
    with pytest.raises(ConfigError, match=r"^method.beta=1.5 must be a number in \(0, 1\)"):
        validate_train_config(cfg)
    toy = ["data=toy2d", "method=sid", f"method._target_={__name__}.ToyMethod"]
    cfg = compose("train", [*toy, "+method.beta=0.5", "method.alpha=3"])
    with pytest.raises(ConfigError, match=r"^method.alpha=3 must be a number in \[0, 2\]"):
        validate_train_config(cfg)  # the inherited key, by SiD's declaration
    bad_target = compose("train", ["data=toy2d", "method._target_=nowhere.Method"])
    with pytest.raises(ConfigError, match="method._target_='nowhere.Method' cannot be imported"):
        validate_train_config(bad_target)
