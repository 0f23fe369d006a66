"""Reliability: exact resume after SIGKILL, atomic and verified checkpoints, non-finite survival."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from distillbench.data.base import ResumableBatches
from distillbench.errors import ConfigError, TrainingStopped
from distillbench.utils.checkpoints import (
    CorruptCheckpointError,
    newest_good_checkpoint,
    point_last_at,
    read_checkpoint,
    step_checkpoints,
    write_checkpoint,
)
from tests.helpers import compose, run_here

# 30 generator steps of 16 on digits, a checkpoint every 10 steps, every step's row written at once
RUN = ["method.batch_size=16", "method.duration_kimg=0.48", "eval.n=64", "eval.every_kimg=0.128",
       "checkpoint.every_kimg=0.16", "eval.teacher=false", "logger=csv", "trainer.log_every_n_steps=1",
       "+logger.csv.flush_logs_every_n_steps=1", "trainer.deterministic=true"]  # fmt: skip


def rows(path: Path) -> int:
    return sum(1 for _ in open(path)) - 1 if path.is_file() else 0


def start_and_kill(folder: Path, cwd: Path) -> int:
    """Start the run, SIGKILL it once it has logged past its first checkpoint; the rows it had written."""
    env = dict(os.environ, WANDB_MODE="disabled", DISTILLBENCH_CACHE=str(cwd / "cache"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "distillbench.train", "threads=1", *RUN, f"hydra.run.dir={folder}"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first, metrics = folder / "checkpoints" / "step_0000010.ckpt.sha256", folder / "metrics.csv"
    while not first.is_file() and proc.poll() is None:
        time.sleep(0.01)
    at_checkpoint = rows(metrics)
    while rows(metrics) < at_checkpoint + 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "summary.json").exists(), "the run finished before it was killed"
    return rows(metrics)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run killed mid-way then resumed in its folder."""
    tmp = tmp_path_factory.mktemp("resume")
    run_here("distillbench.train", *RUN, f"hydra.run.dir={tmp / 'whole'}", cwd=tmp)
    killed_rows = start_and_kill(tmp / "killed", tmp)
    proc = run_here("distillbench.train", *RUN, f"resume={tmp / 'killed'}", cwd=tmp)
    return tmp / "whole", tmp / "killed", killed_rows, proc


def test_a_run_killed_mid_way_resumes_as_if_never_stopped(runs):
    whole, killed, killed_rows, proc = runs
    assert "resuming from" in proc.stdout and "step_0000010.ckpt" in proc.stdout
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=False)
    b = torch.load(killed / "checkpoints/last.ckpt", weights_only=False)
    assert int(b["state_dict"]["gen_steps"]) == 30
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"].keys() - {"train_seconds"}:  # all but the wall time: bit for bit on CPU
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert float(b["state_dict"]["train_seconds"]) > 0, "the wall time goes on counting across the resume"
    for name in ("metrics.csv", "eval.csv"):  # no duplicated and no missing rows
        pd.testing.assert_frame_equal(pd.read_csv(whole / name), pd.read_csv(killed / name))
    at_checkpoint = read_checkpoint(killed / "checkpoints/step_0000010.ckpt")["distillbench"]["csv_rows"]
    assert killed_rows > at_checkpoint, "the killed run had written rows past its checkpoint, since cut"
    assert (killed / ".hydra" / "overrides.yaml").is_file(), "the run's original record stays"
    assert list((killed / ".hydra").glob("resume-*/overrides.yaml")), "the resume's record goes beside it"


def test_checkpoints_hold_the_run_state_and_only_the_newest_are_kept(runs):
    whole = runs[0]
    assert [p.name for p in step_checkpoints(whole / "checkpoints")] == [
        "step_0000030.ckpt", "step_0000020.ckpt", "step_0000010.ckpt"
    ]  # fmt: skip
    last = read_checkpoint(whole / "checkpoints/last.ckpt")
    assert os.path.samefile(whole / "checkpoints/last.ckpt", whole / "checkpoints/step_0000030.ckpt")
    assert len(last["optimizer_states"]) == 2, "the generator's and the fake score's Adam"
    assert any(k.startswith("ema.") for k in last["state_dict"])
    facts = last["distillbench"]
    assert facts["eval.noise_seed"] == 0 and facts["teacher"]["target"] and len(facts["rng"]) == 1
    assert facts["csv_rows"] == rows(whole / "metrics.csv")
    assert last["callbacks"]["PeriodicEvaluation"]["history"][-1]["gen_step"] == 30
    assert int(last["state_dict"]["batches_trained"]) == 30


def test_a_truncated_checkpoint_is_named_and_the_earlier_one_still_loads(runs, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(runs[0], folder)
    newest = folder / "checkpoints" / "step_0000030.ckpt"
    (folder / "checkpoints" / "last.ckpt").unlink()
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = run_here("distillbench.train", f"resume={folder}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"checkpoint {newest} is corrupt" in proc.stderr and "checkpoint.fallback=true" in proc.stderr
    assert read_checkpoint(folder / "checkpoints" / "step_0000020.ckpt")["state_dict"]["gen_steps"] == 20
    proc = run_here("distillbench.train", f"resume={folder}", "checkpoint.fallback=true", cwd=tmp_path)
    assert "resuming from" in proc.stdout and "step_0000020.ckpt" in proc.stdout
    resumed = read_checkpoint(folder / "checkpoints" / "step_0000030.ckpt")  # written again, whole
    assert int(resumed["state_dict"]["gen_steps"]) == 30


def test_resume_refuses_settings_that_would_change_the_run(runs, tmp_path):
    proc = run_here("distillbench.train", f"resume={runs[0]}", "method.betas=[0.5,0.999]", cwd=tmp_path,
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "method.betas cannot change on resume" in proc.stderr
    proc = run_here("distillbench.train", f"resume={tmp_path / 'nothing'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "is not a run folder" in proc.stderr


# ---- checkpoint files --------------------------------------------------------------------------------------
def test_checkpoint_files_are_verified_on_load(tmp_path):
    path = tmp_path / "step_0000001.ckpt"
    write_checkpoint({"w": torch.arange(1000.0)}, path)
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(1000.0))
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the archive may still open, the digest does not match
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="SHA-256 differs"):
        read_checkpoint(path)
    path.with_name(path.name + ".sha256").unlink()
    path.write_bytes(bytes(data[:100]))  # without a digest, a truncated archive is still caught
    with pytest.raises(CorruptCheckpointError, match="unreadable"):
        read_checkpoint(path)


def test_newest_good_checkpoint_falls_back_only_when_asked(tmp_path):
    for step in (1, 2):
        write_checkpoint({"step": step}, tmp_path / f"step_{step:07d}.ckpt")
    point_last_at(tmp_path / "step_0000002.ckpt")
    assert read_checkpoint(tmp_path / "last.ckpt")["step"] == 2
    (tmp_path / "step_0000002.ckpt").write_bytes(b"broken")
    with pytest.raises(CorruptCheckpointError, match="step_0000002.ckpt.*checkpoint.fallback=true"):
        newest_good_checkpoint(tmp_path)
    path, contents = newest_good_checkpoint(tmp_path, fallback=True)
    assert path.name == "step_0000001.ckpt" and contents["step"] == 1
    with pytest.raises(ConfigError, match="holds no checkpoints"):
        newest_good_checkpoint(tmp_path / "empty")


def test_resumable_batches_continue_where_they_stopped():
    data = torch.utils.data.TensorDataset(torch.arange(40.0))
    whole = [b[0] for _, b in zip(range(12), ResumableBatches(data, 4, seed=3), strict=False)]
    resumed = [b[0] for _, b in zip(range(7), ResumableBatches(data, 4, seed=3, start=5), strict=False)]
    assert all(torch.equal(x, y) for x, y in zip(whole[5:], resumed, strict=True))
    assert sorted(torch.cat(whole[:10]).tolist()) == list(range(40)), "each pass visits every sample once"
    ranks = [next(iter(ResumableBatches(data, 2, seed=3, rank=r, world=2)))[0] for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), next(iter(ResumableBatches(data, 4, seed=3)))[0])


# ---- non-finite values -------------------------------------------------------------------------------------
def toy_run(tmp_path, *overrides: str):
    from distillbench.train import build

    cfg = compose(
        "train",
        [
            "data=toy2d",
            "method.batch_size=32",
            "eval.n=256",
            "eval.every_kimg=0.064",
            "eval.teacher=false",
            "logger=csv",
            f"paths.output_dir={tmp_path}",
            *overrides,
        ],
    )
    # fmt: skip
    return build(cfg)


def poison_teacher(run, bad) -> None:
    """The teacher's output is NaN during the generator steps for which ``bad(step)`` holds."""

    def hook(module, inputs, output):
        return output * float("nan") if bad(int(run.method.gen_steps)) else output

    run.method.teacher.register_forward_hook(hook)


def test_a_few_nonfinite_teacher_outputs_are_survived_and_counted(tmp_path):
    run = toy_run(tmp_path, "method.duration_kimg=0.32", "max_bad_steps=4")
    poison_teacher(run, lambda step: step in (2, 3, 4))
    run.trainer.fit(run.method, datamodule=run.train_data)
    assert int(run.method.gen_steps) == 10, "the run reached its budget"
    assert int(run.method.dropped_samples) == 3 * 32, "every sample of the 3 poisoned steps was dropped"
    assert all(torch.isfinite(p).all() for p in run.method.generator.parameters())
    logged = pd.read_csv(tmp_path / "metrics.csv")["train/dropped_samples"].dropna()
    assert logged.max() == 96


def test_persistent_nonfinite_values_stop_the_run_with_its_last_good_checkpoint(tmp_path):
    run = toy_run(tmp_path, "method.duration_kimg=1", "max_bad_steps=3", "checkpoint.every_kimg=0.064")
    poison_teacher(run, lambda step: step >= 5)
    with pytest.raises(TrainingStopped, match="3 steps in a row had non-finite values"):
        run.trainer.fit(run.method, datamodule=run.train_data)
    newest = step_checkpoints(tmp_path / "checkpoints")[0]
    assert newest.name == "step_0000004.ckpt", "no checkpoint from inside the streak"
    state = read_checkpoint(newest)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert os.path.samefile(tmp_path / "checkpoints/last.ckpt", newest)
