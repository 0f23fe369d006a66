"""End-to-end commands through their real entry points (subprocesses, as a user runs them)."""

from __future__ import annotations

import json

import hydra
import numpy as np
import pandas as pd
import pytest
import torch

from distillbench.methods import DistillationMethod
from distillbench.validation import validate_train_config
from tests.helpers import EVALUATE_EXPERIMENTS, ROOT, compose, run_cli, run_folder, run_here, run_in_process


def test_sample_analytic_toy2d_writes_the_output_contract(tmp_path):
    proc = run_here(
        "distillbench.sample", "data=toy2d", "teacher=analytic", "sampler=heun", "n=2000",
        "hydra.run.dir=" + str(tmp_path / "run"), cwd=tmp_path,
    )  # fmt: skip
    folder = run_folder(proc)
    assert folder == tmp_path / "run"
    for name in ["config.yaml", "samples.npz", "samples.png", "summary.json"]:
        assert (folder / name).is_file(), name
    x = np.load(folder / "samples.npz")["x"]
    assert x.shape == (2000, 2)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["nfe"] == 35
    assert summary["fid_data@2k"] < 0.05


def test_teacher_training_cli_saves_a_loadable_teacher(tmp_path):
    proc = run_here(
        "distillbench.train_teacher", "data=toy2d", "trainer.max_steps=5", "data.n_train=512",
        "hydra.run.dir=" + str(tmp_path / "run"), cwd=tmp_path,
    )  # fmt: skip
    folder = run_folder(proc)
    assert (folder / "teacher" / "model.safetensors").is_file()
    from distillbench.teachers.checkpoint import load_denoiser

    teacher = load_denoiser(folder / "teacher")
    assert teacher.sample_shape == (2,) and teacher.info["steps"] == 5
    assert json.loads((folder / "summary.json").read_text())["steps"] == 5


def test_unknown_group_option_lists_the_valid_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_in_process("distillbench.sample", "sampler=nope")
    assert code == 2
    assert "sampler/nope" in stderr and "heun" in stderr and "dpmpp2m" in stderr


@pytest.mark.parametrize(
    ("module", "overrides", "message"),
    [
        ("sample", ["data=mnist", "data.limit=16", "teacher=analytic"], "teacher=analytic needs data=toy2d"),
        (
            "sample",
            ["data=cifar10", "data.root=/nonexistent/cifar", "teacher=analytic"],
            "/nonexistent/cifar",
        ),
        ("sample", ["data=mnist", "data.limit=16", "teacher=digits"], "(1, 8, 8) but data 'mnist' has shape"),
        ("train", ["data=toy2d", "trainer=ddp_sim", "method.batch_size=63"], "method.batch_size=63"),
        ("train", ["data=toy2d", "method.sigma_init=0"], "method.sigma_init=0"),
        ("train", ["data=toy2d", "method.lr=-1"], "method.lr=-1"),
        ("train", ["data=toy2d", "method=sid", "method.alpha=5"], "method.alpha=5"),
        ("train", ["data=toy2d", "student=toy2d", "student.sample_shape=[3]"], "shape (3,)"),
    ],
)
def test_bad_input_fails_cleanly_before_any_work(tmp_path, monkeypatch, module, overrides, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILLBENCH_CACHE", str(tmp_path / "cache"))
    code, _, stderr = run_in_process(f"distillbench.{module}", "threads=1", *overrides,
                                     "hydra.run.dir=" + str(tmp_path / "run"))  # fmt: skip
    assert code == 2, stderr[-2000:]
    assert message in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists(), "a failed run must not leave a folder that looks finished"


@pytest.mark.parametrize(
    "experiment", sorted(p.relative_to(ROOT / "conf/experiment").with_suffix("").as_posix()
                         for p in (ROOT / "conf/experiment").rglob("*.yaml"))
)  # fmt: skip
def test_every_experiment_config_composes_and_instantiates(experiment):
    """Every experiment builds what its command builds (the papers' CIFAR-10 ones, whose teachers are not
    shipped, run a step on stand-ins in test_paper_configs)."""
    if experiment in EVALUATE_EXPERIMENTS:
        cfg = compose("evaluate", [f"experiment={experiment}"])
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
        data = hydra.utils.instantiate(cfg.data)
        teacher = hydra.utils.instantiate(cfg.teacher, datamodule=data)
        sampler = hydra.utils.instantiate(cfg.sampler)
        z = torch.randn(2, *teacher.sample_shape)
        labels = torch.zeros(2, dtype=torch.long) if teacher.num_classes else None
        result = sampler.sample(teacher, z * teacher.sigma_max, labels)
        assert result.x.shape == z.shape and result.nfe >= 1
        return
    cfg = compose("train", [f"experiment={experiment}"])
    assert cfg.method._target_.startswith("distillbench.methods.")
    assert cfg.method.batch_size > 0 and cfg.method.lr > 0
    if experiment.startswith("paper/"):
        return
    validate_train_config(cfg)
    data = hydra.utils.instantiate(cfg.data)
    teacher = hydra.utils.instantiate(cfg.teacher, datamodule=data)
    student = hydra.utils.instantiate(cfg.student) if cfg.get("student") else None
    method = hydra.utils.instantiate(cfg.method, teacher=teacher, student=student)
    assert isinstance(method, DistillationMethod) and method.batch_size == cfg.method.batch_size
    z = torch.randn(2, *teacher.sample_shape)
    assert method.sample(z).shape == z.shape


def test_sample_the_shipped_digits_teacher(tmp_path):
    proc = run_here(
        "distillbench.sample", "teacher=digits", "sampler=dpmpp2m", "sampler.steps=4", "n=32",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    folder = run_folder(proc)
    samples = np.load(folder / "samples.npz")
    assert samples["x"].shape == (32, 1, 8, 8) and samples["labels"].shape == (32,)
    assert samples["x"].min() >= -1 and samples["x"].max() <= 1
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["nfe"] == 4 and "fid_clf@32" in summary and "is_clf@32" in summary


def test_main_job_writes_the_output_contract(tmp_path):
    """`python -m distillbench.train` (the main job), on a tiny budget."""
    proc = run_cli(
        "distillbench.train", "method.batch_size=16", "method.duration_kimg=0.048", "eval.n=64",
        "eval.every_kimg=0.032", "teacher_sampler.steps=2", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    folder = run_folder(proc)
    for name in ["config.yaml", "metrics.csv", "student.png", "teacher.png", "curves.png", "samples.npz"]:
        assert (folder / name).is_file(), name
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == "SIM" and summary["gen_steps"] == 3
    assert summary["student"]["nfe"] == 1 and summary["teacher"]["nfe"] == 3
    assert "fid_clf@64" in summary["student"] and "is_clf@64" in summary["teacher"]
    evals = [line for line in (folder / "metrics.csv").read_text().splitlines()[1:] if line.split(",")[1]]
    assert len(evals) == 3, "evaluations at kimg 0, after 2 steps, and at the end"
    train = pd.read_csv(folder / "metrics.csv").dropna(subset=["train/loss_gen"])
    assert train["train/gen_step"].tolist() == [3.0], "train scalars on Lightning's log steps: here the last"
    assert "SIM on digits" in proc.stdout and "student" in proc.stdout
    # best.ckpt holds the evaluation with the lowest FID, and the summary says where its figures come from
    rows = pd.read_csv(folder / "eval.csv")
    best = rows.loc[rows["fid_clf@64"].idxmin()]
    assert summary["figures_from"] == "checkpoints/last.ckpt"
    assert summary["best"]["metric"] == "fid_clf@64" and summary["best"]["gen_step"] == best["gen_step"]
    assert summary["best"]["value"] == pytest.approx(best["fid_clf@64"])
    state = torch.load(folder / "checkpoints" / "best.ckpt", weights_only=False)
    assert int(state["state_dict"]["gen_steps"]) == best["gen_step"]


def test_bf16_mixed_precision_trains_fp32_weights_through_bf16_networks(tmp_path):
    """trainer.precision: 32-true (default) or bf16-mixed (autocast; weights and preconditioning in fp32)."""
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        run_here("distillbench.train", "method=sid", "data=digits", f"trainer.precision={precision}",
                "method.batch_size=8", "method.duration_kimg=0.016", "eval.n=64", "eval.teacher=false",
                "logger=csv", f"hydra.run.dir={tmp_path / precision}", cwd=tmp_path)  # fmt: skip
        runs[precision] = torch.load(tmp_path / precision / "checkpoints/last.ckpt", weights_only=False)
    fp32, bf16 = (runs[p]["state_dict"] for p in ("32-true", "bf16-mixed"))
    assert {t.dtype for k, t in bf16.items() if k.startswith("generator.")} == {torch.float32}
    moved = [k for k in fp32 if k.startswith("generator.") and not torch.equal(fp32[k], bf16[k])]
    assert moved, "the bf16 networks took other steps than the fp32 ones"
    losses = pd.read_csv(tmp_path / "bf16-mixed" / "metrics.csv")["train/loss_gen"].dropna()
    assert len(losses) and np.isfinite(losses).all()


def test_debug_fast_shortens_train_and_teacher():
    train = compose("train", ["debug=fast"])
    assert train.method.duration_kimg == 0.128 and train.eval.n == 64 and not train.eval.teacher
    assert train.checkpoint.every_kimg == 0.064, "a checkpoint is written within the short run"
    teacher = compose("train_teacher", ["debug=fast"])
    assert teacher.trainer.max_steps == 5


def test_the_training_bar_counts_kimg_of_the_total_with_an_eta_and_evaluations_show_theirs(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_in_process("distillbench.train", "debug=fast", "data=toy2d", "threads=1",
                                    "eval.n=300", "eval.batch_size=100",
                                    f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert code == 0, err[-2000:]
    lines = (out + err).replace("\r", "\n").splitlines()
    bars = [line for line in lines if line.startswith("train")]
    assert bars and "0.13/0.13 kimg [" in bars[-1] and "<" in bars[-1], bars[-1:]
    assert "loss_gen=" in bars[-1] and "Epoch" not in out + err
    evaluations = [line for line in lines if line.startswith("eval @ 0.00 kimg")]
    assert evaluations and "0/300 samples" in evaluations[0], evaluations
    assert "300/300 samples" in evaluations[-1] and "metrics of 300 samples" in evaluations[-1], evaluations
    assert any(line.startswith("eval @ 0.13 kimg") for line in lines), "the last evaluation has its bar too"
