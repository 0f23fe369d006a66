"""Helpers shared by the test modules: commands run as a user runs them (a subprocess), or in this process
where the process boundary is not what is tested, and Hydra composition of the project's configs."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]


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


class Exit(NamedTuple):
    code: int
    stdout: str
    stderr: str


def run_in_process(module: str, *overrides: str) -> Exit:
    """``python -m <module> <overrides>`` in this process: its exit code and what it printed. What a command
    sets for its whole process (torch's threads and deterministic mode, the global seed) is put back after
    it, so the tests that run next in this worker see what they would alone."""
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [module, *overrides]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng)
    return Exit(code, out.getvalue(), err.getvalue())


def run_here(module: str, *overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """:func:`run_cli` in this process: the same command line, folder and environment, without a new
    interpreter's start (for the tests where the process boundary is not what is tested)."""
    flags = [o for o in overrides if o.startswith("-")]
    args = [*flags, "threads=1", *(o for o in overrides if o not in flags)]
    env = {"WANDB_MODE": "disabled", "DISTILLBENCH_CACHE": str(cwd / "cache"), "HYDRA_FULL_ERROR": "0"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        with contextlib.chdir(cwd):
            code, out, err = run_in_process(module, *args)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    if check and code != 0:
        raise AssertionError(f"{module} failed:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess([module, *args], code, out, err)


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
