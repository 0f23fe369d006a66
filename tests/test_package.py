"""The package as a user installs it: a wheel (not an editable install) with the configs and the shipped
teachers, classifiers and mixtures, whose commands run from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the checkout (setuptools writes its build/ beside the sources)."""
    out = tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".git", ".venv", "build", "outputs", ".cache", "*.egg-info", "__pycache__",
                                  ".pytest_cache", "wandb", ".whl", "notebooks", "experiments")  # fmt: skip
    source = out / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    return next(out.glob("distillbench-*.whl"))


def test_the_wheel_holds_every_config_and_shipped_asset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"distillbench/conf/{p.relative_to(ROOT / 'conf').as_posix()}"
               for p in (ROOT / "conf").rglob("*.yaml")}  # fmt: skip
    assets = {f"distillbench/{p.relative_to(ROOT / 'src/distillbench').as_posix()}"
              for p in (ROOT / "src/distillbench/assets").rglob("*") if p.is_file()}  # fmt: skip
    assert configs and configs <= names, sorted(configs - names)[:5]
    assert assets and assets <= names, sorted(assets - names)[:5]
    assert not any(n.startswith(("tests/", "benchmarks/", "experiments/")) for n in names)


def test_an_installed_wheel_runs_its_commands_from_any_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # the test environment's packages (torch, Lightning, Hydra ...) are visible through a plain path entry,
    # which does not run their .pth files, so the editable install of the checkout stays out of sight
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"WANDB_MODE": "disabled"}
    where = subprocess.run([str(python), "-c", "import distillbench; print(distillbench.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True).stdout  # fmt: skip
    assert str(venv) in where, f"imported from {where}"
    proc = subprocess.run([str(python), "-m", "distillbench.sample", "data=toy2d", "teacher=analytic", "n=64",
                           "threads=1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "samples.npz").is_file() and (tmp_path / "run" / "summary.json").is_file()
