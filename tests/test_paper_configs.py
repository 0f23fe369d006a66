"""The papers' CIFAR-10 experiments (conf/experiment/paper): each composes with the papers' settings and
runs one generator step end to end on stand-ins (tiny random EDM teachers in this project's checkpoint
format, CIFAR-format batches of random images, a data-space feature extractor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillbench.nets import UNetBackbone
from distillbench.teachers.checkpoint import save_denoiser
from distillbench.teachers.denoiser import EDMDenoiser
from tests.helpers import compose, run_folder, run_here
from tests.test_data import write_cifar_batches

PAPER = {  # config: (method, conditional, batch, expected FID quoted in the file)
    "cifar10_sim": ("SIM", False, 256, "2.06"),
    "cifar10_sim_cond": ("SIM", True, 256, "1.96"),
    "cifar10_sid": ("SiD", False, 256, "1.923"),
    "cifar10_sid_cond": ("SiD", True, 256, "1.710"),
    "cifar10_di": ("DiffInstruct", False, 128, "4.53"),
}
CONF = Path(__file__).resolve().parents[1] / "conf" / "experiment" / "paper"


def tiny_teacher(folder: Path, num_classes: int) -> Path:
    """A random EDM teacher for 3×32×32 images, saved as `python -m distillbench.train_teacher` saves one."""
    net = {"_target_": "distillbench.nets.UNetBackbone", "sample_size": 32, "in_channels": 3,
           "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
           "num_classes": num_classes}  # fmt: skip
    spec = {"_target_": "distillbench.teachers.denoiser.EDMDenoiser", "net": net, "sample_shape": [3, 32, 32],
            "sigma_data": 0.5, "num_classes": num_classes}  # fmt: skip
    kwargs = {k: v for k, v in net.items() if k != "_target_"}
    save_denoiser(EDMDenoiser(UNetBackbone(**kwargs), (3, 32, 32), num_classes=num_classes), spec, folder)
    return folder


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("paper")
    write_cifar_batches(tmp / "cifar" / "cifar-10-batches-py")
    return {
        "cifar": tmp / "cifar",
        "uncond": tiny_teacher(tmp / "uncond", 0),
        "cond": tiny_teacher(tmp / "cond", 10),
    }


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_experiment_has_the_paper_settings_and_runs_one_step(name, standins, tmp_path):
    method, conditional, batch, fid = PAPER[name]
    cfg = compose("train", [f"experiment=paper/{name}"])
    assert cfg.method.batch_size == batch and cfg.eval.n == 50_000 and cfg.method.lr == 1e-5
    assert cfg.metrics.extractor._target_.endswith("InceptionFeatures")
    assert cfg.metrics.reference.endswith("edm/fid-refs/cifar10-32x32.npz")
    assert cfg.teacher.path.endswith("edm-cifar10-cond" if conditional else "edm-cifar10-uncond")
    assert f"FID {fid}" in (CONF / f"{name}.yaml").read_text(), "the file quotes the paper's FID"

    teacher = standins["cond" if conditional else "uncond"]
    proc = run_here(
        "distillbench.train", f"experiment=paper/{name}", "trainer=cpu", f"data.root={standins['cifar']}",
        "data.download=false", f"teacher.path={teacher}",
        "metrics.extractor._target_=distillbench.metrics.IdentityFeatures", "+metrics.extractor.dim=3072",
        "metrics.metrics=[pr]", "metrics.reference=null", "method.batch_size=4",
        "method.duration_kimg=0.004", "eval.n=16", "eval.batch_size=16", "eval.teacher=false", "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((run_folder(proc) / "summary.json").read_text())
    assert summary["method"] == method and summary["gen_steps"] == 1 and summary["data"] == "cifar10"
