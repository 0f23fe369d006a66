"""Slow convergence checks (``make test-slow``): one-step students of the analytic toy2d teacher."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli, run_folder

pytestmark = pytest.mark.slow

# Budget and bounds for every method: the generator and fake score start from a small MLP denoiser trained
# on the mixture (the analytic teacher has no weights to copy), as real runs start from the teacher.
DISTILL = ["method.batch_size=256", "method.lr=2e-4", "method.ema_halflife_kimg=20", "eval.n=20000"]
DURATION_KIMG = 1000
MAX_SHARE_ERROR = 0.03
MAX_FRECHET = 0.03


@pytest.fixture(scope="module")
def toy_denoiser(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_teacher")
    overrides = ["data=toy2d", "trainer.max_steps=3000", "data.batch_size=512", "logger=[]"]
    run_cli("distillbench.train_teacher", *overrides, f"hydra.run.dir={folder}", cwd=folder)
    return folder / "teacher"


@pytest.mark.parametrize("method", ["sim", "sid", "di"])
def test_one_step_student_reproduces_the_mixture(method, toy_denoiser, tmp_path):
    proc = run_cli(
        "distillbench.train", "data=toy2d", f"method={method}", "student=checkpoint",
        f"student.path={toy_denoiser}", *DISTILL, f"method.duration_kimg={DURATION_KIMG}",
        f"eval.every_kimg={DURATION_KIMG // 4}", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    student = json.loads((run_folder(proc) / "summary.json").read_text())["student"]
    assert student["mode_share_err@20k"] <= MAX_SHARE_ERROR, student
    assert student["fid_data@20k"] <= MAX_FRECHET, student
