"""Multi-process training on CPU (gloo): per-network DDP against one process, per-rank noise, resume under
DDP, and the direct method's one-network-per-stage training (how runs are launched: test_launchers.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distillbench.data.noise import LabelStream
from distillbench.data.toy2d import Toy2DDataModule
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


@pytest.mark.parametrize("trainer", ["ddp", "ddp_sim"])
def test_ddp_trainers_use_the_per_network_strategy(trainer):
    from tests.helpers import compose

    cfg = compose("train", [f"trainer={trainer}"])
    assert cfg.trainer.strategy._target_ == "distillbench.distributed.NetworkDDPStrategy"
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy.find_unused_parameters is False
