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

import pandas as pd
import torch
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]


def command_arguments(overrides) -> list[str]:
    """A test command's arguments: ``-m`` and other flags first, then one torch thread and the overrides."""
    flags = [o for o in overrides if o.startswith("-")]
    return [*flags, "threads=1", *(o for o in overrides if o not in flags)]


def command_environment(cwd: Path) -> dict[str, str]:
    """What a test command adds to the environment: W&B off, a cache in its folder, short Hydra errors."""
    return {"WANDB_MODE": "disabled", "DISTILLBENCH_CACHE": str(cwd / "cache"), "HYDRA_FULL_ERROR": "0"}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """``os.environ`` with ``values`` set inside the block, as it was after it."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def checked(module: str, proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_cli(module: str, *overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *command_arguments(overrides)],
        cwd=cwd, env=os.environ | command_environment(cwd), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return checked(module, proc, check)


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
    args = command_arguments(overrides)
    with environment(command_environment(cwd)), contextlib.chdir(cwd):
        code, out, err = run_in_process(module, *args)
    return checked(module, subprocess.CompletedProcess([module, *args], code, out, err), check)


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


def family_table(shifts: dict[str, dict[str, float]], repeats: int) -> pd.DataFrame:
    """A leaderboard.csv as a suite of ``<method>@<setting>`` cells writes it (suite=gmm_digits_lr), with
    ``repeats`` seeds × ``repeats`` noise sets per cell: FID = base + shift + 0.01·seed + 0.02·noise (base 2
    for the first method, one more for each next), log-density gap −1 − shift, coverage TV 0.1 + 0.01·noise;
    and the floor on the same noise sets."""
    rows = [{"method": f"{family}@{setting}", "nfe": 1, "seed": seed, "noise_seed": noise,
             "fid": 2.0 + index + shift + 0.01 * seed + 0.02 * noise, "log_density_gap": -1.0 - shift,
             "coverage_tv": 0.1 + 0.01 * noise}
            for index, (family, settings) in enumerate(shifts.items()) for setting, shift in settings.items()
            for seed in range(repeats) for noise in range(repeats)]  # fmt: skip
    rows += [{"method": "floor", "nfe": 0, "seed": 0, "noise_seed": noise, "fid": 1.0 + 0.1 * noise,
              "log_density_gap": 0.01 * noise, "coverage_tv": 0.02} for noise in range(repeats)]  # fmt: skip
    return pd.DataFrame(rows)
