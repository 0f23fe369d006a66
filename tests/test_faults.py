"""Fault injection: kills at several moments, corrupt and orphaned files, concurrent starts, folders that
cannot be written, a full disk, and bad input that must exit 2 before anything is written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distillbench.errors import ConfigError, TrainingStopped
from distillbench.utils import checkpoints as checkpoint_files
from distillbench.utils.checkpoints import (
    CorruptCheckpointError,
    digest_path,
    read_checkpoint,
    remove_orphans,
    step_checkpoints,
    write_checkpoint,
)
from distillbench.utils.command import RUN_MARKER, claim_run_folder, disk_full_in, out_of_space_message
from tests.helpers import command_environment, run_cli, run_folder, run_here, run_in_process
from tests.test_resume import poison_teacher, toy_run

# 10 generator steps of 32 on the toy 2-D data, a checkpoint after steps 5 and 10
RUN = ["data=toy2d", "method.batch_size=32", "method.duration_kimg=0.32", "checkpoint.every_kimg=0.16",
       "eval.n=64", "eval.every_kimg=0.16", "eval.teacher=false", "logger=csv",
       "trainer.deterministic=true"]  # fmt: skip


def weights(folder: Path, name: str = "last.ckpt") -> dict[str, torch.Tensor]:
    state = read_checkpoint(folder / "checkpoints" / name)["state_dict"]
    return {k: v for k, v in state.items() if k != "train_seconds"}  # all but the wall time


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted run."""
    tmp = tmp_path_factory.mktemp("faults")
    run_here("distillbench.train", *RUN, f"hydra.run.dir={tmp / 'whole'}", cwd=tmp)
    return tmp / "whole"


def copy_at_step_five(whole: Path, folder: Path) -> Path:
    """The whole run's folder as it was when the run was killed between its two checkpoints."""
    shutil.copytree(whole, folder)
    for path in [*folder.glob("checkpoints/step_0000010.ckpt*"), *folder.glob("checkpoints/last.ckpt*")]:
        path.unlink()
    (folder / "summary.json").unlink()
    return folder


# ---- run folders -------------------------------------------------------------------------------------------
def test_runs_started_in_the_same_second_get_their_own_folders_and_a_used_folder_is_refused(tmp_path):
    env = os.environ | command_environment(tmp_path)
    command = [sys.executable, "-m", "distillbench.train", "threads=1", *RUN]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:]
    folders = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(folders) == 2, "each run has a folder of its own"
    for folder in folders:
        assert json.loads((folder / "summary.json").read_text())["gen_steps"] == 10
        assert len((folder / "eval.csv").read_text().splitlines()) == 1 + 3, "its own three evaluations"

    before = snapshot(folders[0])
    proc = run_here("distillbench.train", *RUN, f"hydra.run.dir={folders[0]}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds a run" in proc.stderr and f"resume={folders[0]}" in proc.stderr
    assert snapshot(folders[0]) == before, "the finished run's files are untouched"


def test_of_two_runs_claiming_one_new_folder_at_once_exactly_one_proceeds(tmp_path):
    folder, outcomes = tmp_path / "run", []
    start = threading.Barrier(8)

    def claim():
        start.wait()
        try:
            claim_run_folder(folder)
            outcomes.append("claimed")
        except ConfigError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("claimed") == 1
    assert all("already holds a run" in o for o in outcomes if o != "claimed")
    assert json.loads((folder / RUN_MARKER).read_text())["pid"] == os.getpid()


# ---- resume ------------------------------------------------------------------------------------------------
def test_a_learning_rate_changed_on_resume_reaches_the_restored_optimisers(whole, tmp_path):
    changed = copy_at_step_five(whole, tmp_path / "changed")
    run_here("distillbench.train", f"resume={changed}", "method.lr=3e-4", cwd=tmp_path)

    # the reference: the same checkpoint, its optimisers' rate and the config rewritten to 3e-4 by hand
    reference = copy_at_step_five(whole, tmp_path / "reference")
    path = reference / "checkpoints" / "step_0000005.ckpt"
    checkpoint = read_checkpoint(path)
    for state in checkpoint["optimizer_states"]:
        for group in state["param_groups"]:
            group["lr"] = 3e-4
    write_checkpoint(checkpoint, path)
    config = OmegaConf.load(reference / "config.yaml")
    config.method.lr = 3e-4
    (reference / "config.yaml").write_text(OmegaConf.to_yaml(config))
    run_here("distillbench.train", f"resume={reference}", cwd=tmp_path)

    assert same_weights(weights(changed), weights(reference)), "as if the run had been saved with that rate"
    assert not same_weights(weights(changed), weights(whole)), "the new rate changed the second half"
    assert OmegaConf.load(changed / "config.yaml").method.lr == 3e-4


def test_a_run_killed_during_a_checkpoint_write_resumes_exactly_and_its_orphans_go(whole, tmp_path):
    folder = copy_at_step_five(whole, tmp_path / "killed")
    ckpt = folder / "checkpoints"
    newest = (whole / "checkpoints" / "step_0000010.ckpt").read_bytes()
    # what a kill leaves at each moment of writing step 10: a partial temporary file, a digest written ahead
    # of its rename, a half-swapped last.ckpt link, and a temporary file of another write
    (ckpt / ".step_0000010.ckpt.x1y2.tmp").write_bytes(newest[: len(newest) // 3])
    digest_path(ckpt / "step_0000010.ckpt").write_text("0" * 64 + "\n")
    (ckpt / ".last.ckpt.link").write_bytes(b"")
    (folder / ".eval.csv.a1b2.tmp").write_text("kimg\n")
    proc = run_here("distillbench.train", f"resume={folder}", cwd=tmp_path)
    assert "step_0000005.ckpt" in proc.stdout
    assert same_weights(weights(folder), weights(whole)), "bit for bit as the uninterrupted run"
    assert not list(folder.rglob("*.tmp")) and not list(folder.rglob("*.link"))
    assert all(d.with_suffix("").is_file() for d in ckpt.glob("*.sha256")), "no digest without its file"


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start_in_its_folder(whole, tmp_path):
    env = os.environ | command_environment(tmp_path)
    folder = tmp_path / "early"
    proc = subprocess.Popen([sys.executable, "-m", "distillbench.train", "threads=1", *RUN,
                             f"hydra.run.dir={folder}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not (folder / "config.yaml").is_file() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(folder.glob("checkpoints/*.ckpt")), "killed before its first checkpoint"
    proc = run_here("distillbench.train", f"resume={folder}", cwd=tmp_path)
    assert "starts again from the beginning" in proc.stdout and run_folder(proc) == folder
    assert same_weights(weights(folder), weights(whole))
    assert (folder / "eval.csv").read_text() == (whole / "eval.csv").read_text()


def test_a_refused_resume_writes_nothing_into_the_run_folder(whole, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(whole, folder)
    before = snapshot(folder)
    # a subprocess: what the refused attempt created is told from what was there by the process start time
    proc = run_cli("distillbench.train", f"resume={folder}", "method.batch_size=64", cwd=tmp_path,
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "method.batch_size cannot change on resume" in proc.stderr
    assert snapshot(folder) == before and not list((folder / ".hydra").glob("resume-*"))


# ---- checkpoint files --------------------------------------------------------------------------------------
def test_a_checkpoint_without_its_digest_is_verified_whole(tmp_path):
    path = tmp_path / "step_0000001.ckpt"
    write_checkpoint({"w": torch.arange(10_000.0)}, path)
    digest_path(path).unlink()
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(10_000.0)), "a whole one loads"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor's bytes: torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="has no step_0000001.ckpt.sha256.*CRC-32"):
        read_checkpoint(path)


def test_orphans_are_the_temporary_files_and_digests_without_checkpoints(tmp_path):
    write_checkpoint({"step": 1}, tmp_path / "step_0000001.ckpt")
    for name in (".step_0000002.ckpt.ab12.tmp", "step_0000002.ckpt.sha256", ".last.ckpt.link"):
        (tmp_path / name).write_text("x")
    removed = sorted(p.name for p in remove_orphans(tmp_path))
    assert removed == [".last.ckpt.link", ".step_0000002.ckpt.ab12.tmp", "step_0000002.ckpt.sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001.ckpt", "step_0000001.ckpt.sha256"]


def test_a_full_disk_stops_the_run_with_its_last_checkpoint_whole(tmp_path, monkeypatch):
    run = toy_run(tmp_path, "method.duration_kimg=0.32", "checkpoint.every_kimg=0.096",
                  "checkpoint.best=null")  # only step checkpoints are written  # fmt: skip
    real_write = checkpoint_files._HashingWriter.write
    written = {"checkpoints": 0}

    def write(self, data):  # the disk fills up after the first checkpoint
        if written["checkpoints"] >= 1:
            self.file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    real_save = checkpoint_files.write_checkpoint

    def save(checkpoint, path):
        real_save(checkpoint, path)
        written["checkpoints"] += 1

    monkeypatch.setattr(checkpoint_files._HashingWriter, "write", write)
    monkeypatch.setattr(checkpoint_files, "write_checkpoint", save)
    with pytest.raises(Exception) as caught:
        run.trainer.fit(run.method, datamodule=run.train_data)
    full = disk_full_in(caught.value)
    assert full is not None and full.errno == errno.ENOSPC, "the ENOSPC is found however deep it lies"
    kept = step_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step_0000003.ckpt"], "the first checkpoint, and nothing half-written"
    assert int(read_checkpoint(kept[0])["state_dict"]["gen_steps"]) == 3
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]["gen_steps"] == 3
    assert not list(tmp_path.rglob("*.tmp"))
    message = out_of_space_message(full, tmp_path)
    assert "is full" in message and "MiB free" in message and f"resume={tmp_path}" in message
    assert "MiB for the next checkpoint" in message


def test_the_enospc_behind_torch_own_error_is_found():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed") from err
    except RuntimeError as outer:
        assert disk_full_in(outer).errno == errno.ENOSPC
    assert disk_full_in(RuntimeError("other")) is None


# ---- non-finite values -------------------------------------------------------------------------------------
def test_the_nonfinite_stop_says_there_is_no_checkpoint_when_there_is_none(tmp_path):
    run = toy_run(tmp_path, "method.duration_kimg=1", "max_bad_steps=3", "checkpoint.every_kimg=10")
    poison_teacher(run, lambda step: True)
    with pytest.raises(TrainingStopped) as caught:
        run.trainer.fit(run.method, datamodule=run.train_data)
    message = str(caught.value)
    assert "No checkpoint was written before the streak" in message and "from the beginning" in message
    assert "predates" not in message and not list(tmp_path.glob("checkpoints/step_*.ckpt"))


# ---- bad input ---------------------------------------------------------------------------------------------
BAD_INPUT = [
    ("train", ["hydra.run.dir=/proc/x"], "hydra.run.dir='/proc/x' must be a writable folder"),
    ("train", ["-m", "data=toy2d", "hydra.sweep.dir=/proc/x"], "hydra.sweep.dir='/proc/x' must be"),
    ("sample", ["n=0"], "n=0 must be an integer >= 1"),
    ("sample", ["n=-5"], "n=-5 must be an integer >= 1"),
    ("train", ["data=cifar10"], "experiment=paper/cifar10_sid"),
    ("train", ["method.lrr=1"], "Could not override 'method.lrr'"),
    ("sample", ["sampler=nope"], "Could not find 'sampler/nope'"),
    ("train", ["method.lr=[1,"], "the override 'method.lr=[1,' does not parse"),
]


@pytest.mark.parametrize(("module", "overrides", "message"), BAD_INPUT)
def test_bad_input_exits_2_before_anything_is_written(tmp_path, monkeypatch, module, overrides, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILLBENCH_CACHE", str(tmp_path / "cache"))
    code, _, stderr = run_in_process(f"distillbench.{module}", *overrides)
    assert code == 2, stderr[-2000:]
    assert message in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no run folder and no cache entry"


def test_a_composition_error_exits_2_from_the_command_line(tmp_path):
    proc = run_cli("distillbench.train", "data=cifar10", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "experiment=paper/cifar10_sid" in proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_resume_record_keeps_one_name_however_often_hydra_resolves_it():
    from distillbench.config import hydra_subdir

    first = hydra_subdir("true")
    time.sleep(1.1)  # Hydra names the folder, then the task reads the name again, seconds apart
    assert hydra_subdir("true") == first and first.startswith(".hydra/resume-")
