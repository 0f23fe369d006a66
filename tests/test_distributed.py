"""Multi-process training on CPU (gloo): per-network DDP against one process, per-rank noise, Hydra ``-m``
with Lightning-launched ``ddp``, torchrun, and the direct method's one-network-per-stage training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillbench.config import launch_id
from distillbench.data.noise import LabelStream
from distillbench.data.toy2d import Toy2DDataModule
from distillbench.distributed import DISTRIBUTED_ENV, distributed_state_reset
from distillbench.methods.sim import SIM
from distillbench.nets import MLPBackbone
from distillbench.teachers.analytic import analytic_teacher
from distillbench.teachers.denoiser import EDMDenoiser
from tests.helpers import run_cli, run_folder

TINY = ["data=toy2d", "method.batch_size=16", "method.duration_kimg=0.064", "eval.n=64",
        "eval.teacher=false", "logger=csv"]  # fmt: skip


def state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


# ---- per-rank noise ----------------------------------------------------------------------------------------
def test_ranks_draw_different_rows_of_the_one_process_global_batch():
    student = EDMDenoiser(MLPBackbone(dim=2, hidden=16, depth=1, emb_dim=8), sample_shape=(2,))
    method = SIM(analytic_teacher(Toy2DDataModule()), student=student, batch_size=8)

    def phase_draws(rank: int, world: int) -> list[torch.Tensor]:
        method.rank_and_world = lambda: (rank, world)
        z = method.draw("gen")
        return [z, method.sample_sigma(len(z)), method.randn(len(z), 2)]

    single = phase_draws(0, 1)
    ranks = [phase_draws(rank, 2) for rank in (0, 1)]
    for one, zero, first in zip(single, *ranks, strict=True):
        assert zero.shape[0] == 4 and not torch.equal(zero, first), "the two ranks draw different noise"
        assert torch.equal(torch.cat([zero, first]), one), "together they draw the one-process batch"


def test_label_streams_of_the_ranks_split_the_one_process_stream():
    probs = torch.full((10,), 0.1)
    single = next(iter(LabelStream(probs, 8, seed=3)))
    ranks = [next(iter(LabelStream(probs, 4, seed=3, rank=rank, world=2))) for rank in (0, 1)]
    assert not torch.equal(*ranks) and torch.equal(torch.cat(ranks), single)


# ---- DDP against one process -------------------------------------------------------------------------------
def test_a_ddp_sim_run_matches_one_process_with_the_same_global_batch(tmp_path):
    """Two gloo processes with batch 8 each against one with 16: the same weights after 4 generator steps."""
    single = run_folder(
        run_cli("distillbench.train", *TINY, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    )
    ddp = run_folder(
        run_cli(
            "distillbench.train", *TINY, "trainer=ddp_sim", f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path
        )
    )
    one, two = state(single), state(ddp)
    assert int(two["gen_steps"]) == int(one["gen_steps"]) == 4 and float(two["nimg"]) == float(one["nimg"])
    for name in (k for k in one if k.startswith(("generator.", "fake.", "ema."))):
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)  # reduction order only
    assert (ddp / "train_rank1.log").is_file() and not (ddp / "train_rank1").exists()
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["gen_steps"] == 4 and summary["student"]["nfe"] == 1


@pytest.mark.parametrize(
    ("method", "networks"),
    [(["method=dmd2", "method.gan=true", "method.fake_updates=2"], ("generator.", "fake.", "head.")),
     (["method=cd"], ("student.", "target.", "ema."))],
    ids=["dmd2-gan", "cd"],
)  # fmt: skip
def test_the_new_methods_train_under_ddp_with_each_network_wrapped(tmp_path, method, networks):
    """Two gloo processes, each trained network in its own DDP (DMD2's GAN head with the fake score): the run
    finishes its steps (no unused-parameter or collective mismatch) and every network stays finite."""
    run = run_folder(run_cli("distillbench.train", *TINY, *method, "trainer=ddp_sim",
                             "method.duration_kimg=0.032", f"hydra.run.dir={tmp_path / 'run'}",
                             cwd=tmp_path))  # fmt: skip
    weights = state(run)
    assert int(weights["gen_steps"]) == 2
    for prefix in networks:
        tensors = [v for k, v in weights.items() if k.startswith(prefix) and v.is_floating_point()]
        assert tensors and all(torch.isfinite(t).all() for t in tensors), prefix
    assert (run / "train_rank1.log").is_file()


def test_a_ddp_sim_run_resumed_from_its_middle_checkpoint_ends_as_the_whole_run(tmp_path):
    """Each rank restores its RNG states and data position; rank 0 cuts metrics.csv back to the checkpoint."""
    settings = [*TINY, "trainer=ddp_sim", "method.duration_kimg=0.128", "checkpoint.every_kimg=0.064"]
    whole = run_folder(run_cli("distillbench.train", *settings, f"hydra.run.dir={tmp_path / 'whole'}",
                               cwd=tmp_path))  # fmt: skip
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("step_0000008.ckpt", "step_0000008.ckpt.sha256", "last.ckpt", "last.ckpt.sha256"):
        (cut / "checkpoints" / name).unlink()
    proc = run_cli("distillbench.train", *settings, f"resume={cut}", cwd=tmp_path)
    assert "step_0000004.ckpt" in proc.stdout
    a, b = state(whole), state(cut)
    assert int(b["gen_steps"]) == 8
    for name in a.keys() - {"train_seconds"}:  # all but the wall time
        assert torch.equal(a[name], b[name]), name
    assert (whole / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()


def test_direct_distillation_trains_one_network_per_stage_under_ddp(tmp_path):
    """Stage one leaves the refiner unused and stage two the student: no "unused parameters" failure (the
    two ranks stream their own shards)."""
    run_cli("distillbench.make_trajectories", "teacher=digits", "steps=4", "indices=[2]", "n=16",
            "shard_size=8", f"out_dir={tmp_path / 'pairs'}", f"hydra.run.dir={tmp_path / 'make'}",
            cwd=tmp_path)  # fmt: skip
    proc = run_cli(
        "distillbench.train", "method=direct", "data=trajectories", f"data.root={tmp_path / 'pairs'}",
        "+data@data.like=digits", "teacher=digits", "metrics=digits", "method.steps=4", "method.k=2",
        "method.iterations=2", "method.refine_iterations=2", "method.batch_size=8", "eval.n=32",
        "eval.teacher=false", "logger=csv", "trainer=ddp_sim", "data.streaming=true",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((run_folder(proc) / "summary.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == [0, 1] and summary["gen_steps"] == 4


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
    env = dict(
        os.environ, WANDB_MODE="disabled", DISTILLBENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1"
    )
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


@pytest.mark.parametrize("trainer", ["ddp", "ddp_sim"])
def test_ddp_trainers_use_the_per_network_strategy(trainer):
    from tests.helpers import compose

    cfg = compose("train", [f"trainer={trainer}"])
    assert cfg.trainer.strategy._target_ == "distillbench.distributed.NetworkDDPStrategy"
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy.find_unused_parameters is False


# ---- SLURM through submitit --------------------------------------------------------------------------------
def test_submitit_local_runs_each_sweep_job_in_its_own_fixed_folder(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("distillbench.train", "-m", "hydra/launcher=local", "method=sim,sid", *TINY,
            "method.duration_kimg=0.032", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    for job, method in (("0", "SIM"), ("1", "SiD")):
        assert json.loads((sweep / job / "summary.json").read_text())["method"] == method
    assert (sweep / ".submitit").is_dir() and (sweep / "curves.csv").is_file()


def test_the_slurm_launcher_gives_one_task_and_gpu_per_lightning_rank():
    from tests.helpers import compose

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
