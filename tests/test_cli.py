"""End-to-end commands through their real entry points (subprocesses, as a user runs them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_cli(module: str, *overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", DISTILLBENCH_CACHE=str(cwd / "cache"), HYDRA_FULL_ERROR="0")
    flags = [o for o in overrides if o.startswith("-")]  # -m and friends go before the overrides
    proc = subprocess.run(
        [sys.executable, "-m", module, *flags, "threads=1", *(o for o in overrides if o not in flags)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_folder(proc: subprocess.CompletedProcess) -> Path:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("run folder: ")][-1]
    return Path(line.removeprefix("run folder: "))


def test_sample_analytic_toy2d_writes_the_output_contract(tmp_path):
    proc = run_cli(
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
    proc = run_cli(
        "distillbench.teacher", "data=toy2d", "trainer.max_steps=5", "data.n_train=512",
        "hydra.run.dir=" + str(tmp_path / "run"), cwd=tmp_path,
    )  # fmt: skip
    folder = run_folder(proc)
    assert (folder / "teacher" / "model.safetensors").is_file()
    from distillbench.teachers.checkpoint import load_teacher

    teacher = load_teacher(folder / "teacher")
    assert teacher.sample_shape == (2,) and teacher.info["steps"] == 5
    assert json.loads((folder / "summary.json").read_text())["steps"] == 5


def test_unknown_group_option_lists_the_valid_ones(tmp_path):
    proc = run_cli("distillbench.sample", "sampler=nope", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "sampler/nope" in proc.stderr and "heun" in proc.stderr and "dpmpp2m" in proc.stderr


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
        ("train", ["data=toy2d", "trainer=ddp_sim", "distill.batch_size=63"], "distill.batch_size=63"),
        ("train", ["data=toy2d", "distill.sigma_init=0"], "distill.sigma_init=0"),
        ("train", ["data=toy2d", "optim.lr=-1"], "optim.lr=-1"),
        ("train", ["data=toy2d", "method=sid", "method.alpha=5"], "method.alpha=5"),
        ("train", ["data=toy2d", "student=toy2d", "student.sample_shape=[3]"], "shape (3,)"),
    ],
)
def test_bad_input_fails_cleanly_before_any_work(tmp_path, module, overrides, message):
    proc = run_cli(
        f"distillbench.{module}",
        *overrides,
        "hydra.run.dir=" + str(tmp_path / "run"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists(), "a failed run must not leave a folder that looks finished"


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from distillbench.config import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


EVALUATE_EXPERIMENTS = {
    "fid_vs_nfe",
    "direct_vs_teacher",
    "direct_noise_seeds",
}  # experiments of `python -m distillbench.evaluate`; the rest train


@pytest.mark.parametrize(
    "experiment", sorted(p.relative_to(ROOT / "conf/experiment").with_suffix("").as_posix()
                         for p in (ROOT / "conf/experiment").rglob("*.yaml"))
)  # fmt: skip
def test_every_experiment_config_composes(experiment):
    if experiment in EVALUATE_EXPERIMENTS:
        cfg = compose("evaluate", [f"experiment={experiment}"])
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
        return
    cfg = compose("train", [f"experiment={experiment}"])
    assert cfg.method._target_.startswith("distillbench.methods.")
    assert cfg.distill.batch_size > 0 and cfg.optim.lr > 0


def test_sample_the_shipped_digits_teacher(tmp_path):
    proc = run_cli(
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
        "distillbench.train", "distill.batch_size=16", "distill.duration_kimg=0.048", "eval.n=64",
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


def test_bf16_mixed_precision_trains_fp32_weights_through_bf16_networks(tmp_path):
    """trainer.precision: 32-true (default) or bf16-mixed (autocast; weights and preconditioning in fp32)."""
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        run_cli("distillbench.train", "method=sid", "data=digits", f"trainer.precision={precision}",
                "distill.batch_size=8", "distill.duration_kimg=0.016", "eval.n=64", "eval.teacher=false",
                "logger=csv", f"hydra.run.dir={tmp_path / precision}", cwd=tmp_path)  # fmt: skip
        runs[precision] = torch.load(tmp_path / precision / "checkpoints/last.ckpt", weights_only=False)
    fp32, bf16 = (runs[p]["state_dict"] for p in ("32-true", "bf16-mixed"))
    assert {t.dtype for k, t in bf16.items() if k.startswith("generator.")} == {torch.float32}
    moved = [k for k in fp32 if k.startswith("generator.") and not torch.equal(fp32[k], bf16[k])]
    assert moved, "the bf16 networks took other steps than the fp32 ones"
    losses = pd.read_csv(tmp_path / "bf16-mixed" / "metrics.csv")["train/loss_gen"].dropna()
    assert len(losses) and np.isfinite(losses).all()
