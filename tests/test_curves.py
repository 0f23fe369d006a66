"""Hydra ``-m`` sweeps of training jobs: one folder per job, shared evaluation points, a combined figure."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml

from distillbench.callbacks.evaluation import PeriodicEvaluation, declare_wandb_metrics, gather_shards, shard
from distillbench.sweeps import check_one_protocol, load_sweep, plot_sweep, swept_keys
from tests.helpers import compose, run_here

TINY = ["data=toy2d", "method.batch_size=16", "method.duration_kimg=0.064", "eval.n=256",
        "eval.every_kimg=0.032", "teacher_sampler.steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def sweep_2x2(tmp_path_factory):
    """``-m method=sim,sid method.lr=1e-4,1e-3`` on toy2d: four tiny jobs under one sweep folder."""
    root = tmp_path_factory.mktemp("sweep")
    proc = run_here(
        "distillbench.train", "-m", "method=sim,sid", "method.lr=1e-4,1e-3", *TINY,
        f"hydra.sweep.dir={root / 'sweep'}", cwd=root,
    )  # fmt: skip
    return root / "sweep", proc


def test_a_2x2_sweep_makes_four_runs_with_the_same_evaluation_points(sweep_2x2):
    sweep, proc = sweep_2x2
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    kimgs = [tuple(pd.read_csv(job / "eval.csv")["kimg"].round(6)) for job in jobs]
    assert len(set(kimgs)) == 1 and kimgs[0] == (0.0, 0.032, 0.064)
    combined = pd.read_csv(sweep / "curves.csv")
    assert len(combined) == 4 * 3
    assert set(zip(combined["method"], combined["method.lr"], strict=True)) == {
        ("sim", 1e-4), ("sim", 1e-3), ("sid", 1e-4), ("sid", 1e-3)}  # fmt: skip
    assert (sweep / "curves.png").stat().st_size > 10_000
    assert "sweep summary:" in proc.stdout
    assert combined["protocol"].nunique() == 1, "every evaluation of every job carries the same protocol"
    record = json.loads(combined["protocol"][0])
    assert record["extractor"] == "data" and record["n"] == 256 and record["real"].startswith("toy2d/train")
    assert json.loads((jobs[0] / "summary.json").read_text())["protocol"] == record
    assert "protocol" not in swept_keys(combined)


def test_every_sweep_job_keeps_its_grids_and_its_own_wandb_name_in_one_group(sweep_2x2):
    sweep, _ = sweep_2x2
    groups, names = set(), set()
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        assert len(list((job / "grids").glob("step_*.png"))) == 3, "a sample grid per evaluation"
        wandb_cfg = yaml.safe_load((job / "config.yaml").read_text())["logger"]["wandb"]
        groups.add(wandb_cfg["group"])
        names.add(wandb_cfg["name"])
    assert groups == {f"train/{sweep.name}"}, "one W&B group per sweep"
    expected = {"method=sim,method.lr=0.0001", "method=sim,method.lr=0.001",
                "method=sid,method.lr=0.0001", "method=sid,method.lr=0.001"}  # fmt: skip
    assert names == expected, "named by the swept keys only"


def test_a_sweep_loads_and_plots_from_a_notebook(sweep_2x2, tmp_path):
    frame = load_sweep(sweep_2x2[0])
    fig = plot_sweep(frame, tmp_path / "fig.png", metrics=["fid"], hue="method", panel="method.lr")
    assert len(fig.axes) == 2 and (tmp_path / "fig.png").is_file()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["sim", "sid"]


def test_a_sweep_with_an_unknown_key_fails_before_any_job_runs(tmp_path):
    proc = run_here(
        "distillbench.train", "-m", "method=sim,sid", "method.lrr=1e-4,1e-5", *TINY,
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "method.lrr" in proc.stderr
    assert not list(tmp_path.glob("sweep/*/eval.csv")), "no job may have started"


def test_evaluation_noise_is_the_same_for_different_training_seeds(tmp_path):
    from distillbench.train import build

    inputs, train_noise = [], []
    for seed in (0, 1):
        cfg = compose("train", ["data=digits", f"seed={seed}", "eval.n=300", "logger=csv",
                                f"paths.output_dir={tmp_path / str(seed)}"])  # fmt: skip
        run = build(cfg)
        method, evaluation = run.method, run.evaluation
        inputs.append(evaluation.fixed_inputs(method))
        train_noise.append(method.draw("gen"))
    (z0, y0), (z1, y1) = inputs
    assert torch.equal(z0, z1) and torch.equal(y0, y1)
    assert not torch.equal(train_noise[0], train_noise[1]), "training noise must follow the seed"


class _Strategy:
    """Stands in for DDP's all_gather: every rank's padded share, stacked."""

    def __init__(self, shares):
        self.shares = shares

    def all_gather(self, padded):
        size = len(padded)
        return torch.stack([torch.cat([s, s.new_zeros(size - len(s))]) for s in self.shares])


class _Trainer:
    def __init__(self, world, shares=None):
        self.world_size, self.strategy = world, _Strategy(shares)


@pytest.mark.parametrize(("n", "world"), [(10, 2), (7, 3), (1000, 4)])
def test_ddp_shards_gather_back_into_the_single_process_sample_set(n, world):
    everything = torch.arange(n, dtype=torch.float32)
    bounds = [shard(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    shares = [everything[start:stop] for start, stop in bounds]
    gathered = gather_shards(_Trainer(world, shares), shares[1], n)
    assert torch.equal(gathered, everything)


def test_evaluation_shards_draw_the_noise_of_their_global_indices():
    class Module:
        sample_shape, num_classes = (2,), 0

    evaluation = PeriodicEvaluation(None, None, every_kimg=1, n=10, noise_seed=3)
    whole, _ = evaluation.fixed_inputs(Module())
    parts = [evaluation.fixed_inputs(Module(), *shard(10, 3, r))[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_wandb_summarises_fid_by_its_minimum_with_exact_names():
    calls = []

    class Run:
        summary = {}

        def define_metric(self, name, **kwargs):
            calls.append((name, kwargs.get("summary")))

    class WandbLogger:
        experiment = Run()

    trainer = type("T", (), {"loggers": [WandbLogger()]})()
    declared = set()
    row = {"kimg": 0.0, "gen_step": 0, "fid_clf@1k": 3.0, "is_clf@1k": 9.0, "precision_clf@1k": 0.8,
           "protocol": '{"extractor":"clf","n":1000}'}  # fmt: skip
    declare_wandb_metrics(trainer, row, declared)
    declare_wandb_metrics(trainer, row, declared)
    assert calls == [("eval/fid_clf@1k", "min"), ("eval/is_clf@1k", "max"), ("eval/precision_clf@1k", "max")]
    assert Run.summary == {"eval/protocol": {"extractor": "clf", "n": 1000}}, "the record, in the run summary"


def test_the_wandb_run_id_is_kept_beside_the_checkpoints(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from distillbench.utils.logging import wandb_kwargs

    monkeypatch.setenv("WANDB_MODE", "offline")
    conf = OmegaConf.create({"save_dir": str(tmp_path)})
    first = wandb_kwargs(conf, tmp_path)
    assert first["offline"] and (tmp_path / "checkpoints" / "wandb_id.txt").read_text().strip() == first["id"]
    assert wandb_kwargs(conf, tmp_path)["id"] == first["id"], "a resumed run continues the same W&B run"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_kwargs(conf, tmp_path) is None


class _Generator(__import__("lightning").LightningModule):
    """A linear one-step 'generator' with the attributes the evaluation callback reads."""

    sample_shape, num_classes, nfe = (2,), 0, 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(2, 2)
        self.register_buffer("gen_steps", torch.zeros((), dtype=torch.long))

    @property
    def kimg(self) -> float:
        return float(self.gen_steps) * 0.016

    def sample(self, z, labels=None):
        return self.net(z)

    def training_step(self, batch, batch_idx):
        self.gen_steps += 1
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 2))
        return torch.utils.data.DataLoader(data, batch_size=8)


def _evaluate_under(strategy: str, devices: int, run_dir):
    import lightning as L

    from distillbench.data.toy2d import Toy2DDataModule
    from distillbench.metrics import IdentityFeatures, MetricSuite

    metrics = MetricSuite(IdentityFeatures(dim=2), n=301, metrics=["fid", "modes"])
    evaluation = PeriodicEvaluation(metrics, Toy2DDataModule(n_train=2000), every_kimg=1.0, n=301,
                                    batch_size=64, run_dir=run_dir)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", strategy=strategy, devices=devices, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[evaluation])  # fmt: skip
    trainer.fit(_Generator())
    return pd.read_csv(run_dir / "eval.csv")


def test_two_ddp_processes_measure_the_single_process_sample_set(tmp_path):
    """Real gloo DDP: both ranks sample their share and join the gather; rank 0's figures match 1 process."""
    single = _evaluate_under("auto", 1, tmp_path / "single")
    ddp = _evaluate_under("ddp_spawn", 2, tmp_path / "ddp")
    assert ddp.loc[0, "fid_data@301"] == pytest.approx(single.loc[0, "fid_data@301"], rel=1e-6)
    assert ddp.loc[0, "mode_share_0@301"] == single.loc[0, "mode_share_0@301"]
    assert list(ddp["gen_step"]) == [0, 2], "evaluated at the start and at the end, on every rank in step"


def tensorboard_events(folder):
    """Every Event in the TFRecord files of a TensorBoard folder (length, crc, payload, crc per record)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in folder.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_tensorboard_gets_the_curves_against_generator_steps_and_a_grid_per_evaluation(tmp_path):
    run = f"hydra.run.dir={tmp_path / 'run'}"
    run_here("distillbench.train", *TINY, "logger=[csv,tensorboard]", run, cwd=tmp_path)
    events = tensorboard_events(tmp_path / "run" / "tensorboard")
    values = [(e.step, v.tag) for e in events for v in e.summary.value]
    assert [step for step, tag in values if tag == "eval/samples"] == [0, 2, 4]
    assert [step for step, tag in values if tag == "eval/fid_data_256"] == [0, 2, 4], (
        "TensorBoard turns @ into _"
    )


def test_metrics_that_differ_between_jobs_are_never_taken_for_swept_settings():
    frame = pd.DataFrame({"job": ["0", "1"], "method.sigma_init": ["1.5", "2.5"], "kimg": [0.0, 0.0],
                          "gen_step": [0, 0], "fid_clf@1k": [6.0, 7.2], "kid_clf@1k": [0.5, 0.7]},
                         )  # fmt: skip
    fig = plot_sweep(frame, metrics=["fid"])
    assert len(fig.axes) == 1 and fig.axes[0].get_legend().get_title().get_text() == "method.sigma_init"


def test_a_sweep_measured_under_two_protocols_is_refused():
    protocols = ['{"weights":"sha256:aa"}'] * 2 + ['{"weights":"sha256:bb"}']
    frame = pd.DataFrame({"job": ["0", "0", "1"], "kimg": [0.0, 1.0, 0.0], "fid_clf@1k": [6.0, 5.0, 7.0],
                          "protocol": protocols})  # fmt: skip
    with pytest.raises(ValueError, match=r"different protocols \(jobs \['0'\]: .*aa.*; jobs \['1'\]: .*bb"):
        check_one_protocol(frame, "sweep")
    check_one_protocol(frame[frame["job"] == "0"], "sweep")
