"""Launching training: Hydra ``-m`` sweeps with Lightning-launched ``ddp``, torchrun, SLURM through submitit
(its local stand-in), the run folder each launcher names, and the rank variables a job leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from distillbench.config import launch_id
from distillbench.distributed import DISTRIBUTED_ENV, distributed_state_reset
from tests.helpers import command_environment, compose, run_cli

TINY = ["data=toy2d", "method.batch_size=16", "method.duration_kimg=0.064", "eval.n=64",
        "eval.teacher=false", "logger=csv"]  # fmt: skip


# ---- launches ----------------------------------------------------------------------------------------------
def test_a_sweep_over_device_counts_with_lightning_ddp_runs_each_job_once_in_its_folder(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("distillbench.train", "-m", "trainer=ddp", "trainer.devices=2,1", "method=sim,sid", *TINY,
                   "method.duration_kimg=0.032", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert proc.stdout.count("Launching 4 jobs") == 1, "no rank starts a sweep of its own"
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        devices = int((job / ".hydra" / "overrides.yaml").read_text().split("trainer.devices=")[1][0])
        assert summary["gen_steps"] == 2 and (job / "train_rank1.log").is_file() == (devices == 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "sweep"], "no folder of a stray run"


def test_torchrun_launches_two_ranks_that_share_one_run_folder(tmp_path):
    env = os.environ | command_environment(tmp_path) | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "distillbench.train", *TINY, "trainer=ddp_sim", "threads=1"]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-"), "both ranks chose the same folder"
    assert json.loads((runs[0] / "summary.json").read_text())["gen_steps"] == 4


def test_launch_ids_name_the_run_folder_only_for_launchers_that_start_the_ranks(monkeypatch):
    for key in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    assert launch_id("2026-01-01_00-00-00") == "2026-01-01_00-00-00"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --standalone or --rdzv-id
    assert launch_id("t").startswith("torchrun-") and launch_id("t").endswith(f"-{os.getppid()}")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launch_id("t") == "torchrun-abc"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert launch_id("t") == "t", "a one-task SLURM job keeps its start time"
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "2")
    assert launch_id("t") == "slurm-77.2"


def test_the_rank_variables_of_a_job_are_gone_when_it_ends(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "outer-host")
    for key in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with distributed_state_reset():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", LOCAL_RANK="0", WORLD_SIZE="2")
    assert os.environ["MASTER_ADDR"] == "outer-host"
    assert not {"LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)
    assert {"LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"} <= set(DISTRIBUTED_ENV)


# ---- SLURM through submitit --------------------------------------------------------------------------------
def test_submitit_local_runs_each_sweep_job_in_its_own_fixed_folder(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("distillbench.train", "-m", "hydra/launcher=local", "method=sim,sid", *TINY,
            "method.duration_kimg=0.032", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    for job, method in (("0", "SIM"), ("1", "SiD")):
        assert json.loads((sweep / job / "summary.json").read_text())["method"] == method
    assert (sweep / ".submitit").is_dir() and (sweep / "curves.csv").is_file()


def test_the_slurm_launcher_gives_one_task_and_gpu_per_lightning_rank():
    cfg = compose("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4 and launcher.nodes == 1
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout == 0


def test_lightning_requeues_on_the_signal_slurm_was_asked_to_send(monkeypatch):
    import signal

    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from distillbench.distributed import slurm_plugins

    for key in (
        "SLURM_NTASKS",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_JOB_NAME",
        "SUBMITIT_EXECUTOR",
        "SUBMITIT_PREEMPT_SIGNAL",
    ):
        monkeypatch.delenv(key, raising=False)
    assert slurm_plugins() == [], "no SLURM, no plugin"
    monkeypatch.setenv("SLURM_NTASKS", "2")  # what sbatch/srun set for one 2-task node (as submitit asks)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (plugin,) = slurm_plugins()
    assert isinstance(plugin, SLURMEnvironment) and plugin.auto_requeue
    assert plugin.requeue_signal == signal.SIGUSR1, "sbatch --signal=USR1@<s>: Lightning's default"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert slurm_plugins()[0].requeue_signal == signal.SIGUSR2, "submitit asks SLURM for USR2"
