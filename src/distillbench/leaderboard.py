"""``python -m distillbench.leaderboard suite=digits``: every method on one teacher under one compute budget.

A suite (``conf/suite/``) names the teacher, data and metric suite, the budget in the teacher's compute unit
(``budget_tfe``; :mod:`distillbench.methods.accounting`: teacher-forward equivalents, TFE, with a network
teacher; student-forward equivalents, SFE, with an analytic one), the seeds, the evaluation-noise sets, each
method's overrides and the teacher samplers. Its cells, each a command in its own folder under ``out_dir``:

- ``cells/<method>/seed<k>``: ``python -m distillbench.train`` with ``budget_tfe`` (the method's duration is
  set to spend it, data generation included), ``eval.curve_points`` evaluations along the way on the first
  noise set;
- ``evals/<method>/seed<k>``: ``python -m distillbench.evaluate run=<training cell>`` on the other noise
  sets (``eval.noise_seeds``), when there are any;
- ``teacher/<sampler>-<steps>``: ``python -m distillbench.evaluate run=teacher`` on every noise set;
- ``floor``: ``python -m distillbench.evaluate run=floor``: the data's own independent samples (the ``test``
  split; exact samples with an analytic teacher) on every noise set, the floor row of the table;
- ``trajectories``: direct distillation's pairs, made once and charged to every direct cell's budget.

Fairness, enforced here: method overrides may not touch the teacher, the metric suite, the evaluation, the
budget or the seed (the suite sets them for every cell), and every finished cell's recorded config must show
the same teacher, metric suite (feature extractor), sample count and evaluation noise, every figure the same
protocol record (extractor weights, preprocessing, real statistics: docs/metrics.md), and the training cells
the same configured budget and a spent budget within ``budget_tolerance`` of it, never over. The score
methods are evaluated with their generator's EMA; progressive and direct distillation keep no EMA in their
papers and are evaluated with their trained weights.

Statistics (:mod:`distillbench.stats`): each row's figures are the mean and 95% t interval over its repeats,
training seeds × noise sets for a method, noise sets for a teacher sampler and the floor; a row is marked
tied with the best method when Welch's t-test does not separate them at α = 0.05.

Resumable: a cell with ``summary.json`` is finished and skipped, one with a checkpoint resumes from it
(``resume=<cell>``), anything else starts over. The outputs are rebuilt from the cells at the end:
``leaderboard.md``, ``leaderboard.csv`` (one row per cell and noise set), ``curves.csv`` (every figure
against kimg and the budget spent, per training cell), ``within_family.csv`` (for a suite of one method's
settings, ``<method>@<setting>``: :func:`within_family`) and ``leaderboard.png`` (FID against training budget;
each figure against sampling NFE, with intervals and the floor).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import torch
from matplotlib import pyplot as plt
from omegaconf import DictConfig, OmegaConf

from distillbench import run_folder, stats
from distillbench.config import CONFIG_DIR, relocatable
from distillbench.errors import ConfigError
from distillbench.evaluate import (
    FLOOR,
    GROUND_TRUTH,
    display_path,
    save_figure,
    summary_rows,
    verdicts_on,
)
from distillbench.methods.accounting import unit_of_config
from distillbench.metrics.suite import PROTOCOL, protocol_text
from distillbench.sweeps import EVAL_FILE, metric_column, metric_kind
from distillbench.utils.command import cli, task
from distillbench.utils.io import atomic_write_json, atomic_write_text, atomic_writer

#: settings the suite fixes for every cell (fairness); a method's overrides may not set them
FIXED_KEYS = ("teacher", "metrics", "eval", "budget_tfe", "seed", "hydra")
FIGURES = ("fid", "is", "precision", "recall", *GROUND_TRUTH)
#: the figures each row is tested against the best method on (Welch), where the metric suite measures them;
#: the log-density gap by its distance from 0 (either sign is a defect)
VERDICTS = ("fid", "log_density_gap", "coverage_tv")
CELL_FILE = "cell.json"  # the overrides a cell was started with: a rerun must ask for the same
TRAJECTORY_NOISE_SEED = 1  # conf/trajectories.yaml's noise_seed, when the suite sets none
#: a training cell may spend this fraction of its budget less than configured (whole steps; staged methods
#: round each stage down), never more
BUDGET_TOLERANCE = 0.05


# ---- the suite ---------------------------------------------------------------------------------------------
def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@")[-1]


def check_suite(suite: DictConfig) -> None:
    """Every bad suite setting fails here, before any cell runs."""
    if not suite.budget_tfe > 0:
        raise ConfigError(f"suite.budget_tfe={suite.budget_tfe} must be > 0 (teacher-forward equivalents)")
    seeds = list(suite.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"suite.seeds={seeds} must be distinct integers >= 0, at least one")
    if not suite.methods:
        raise ConfigError("suite.methods is empty: name at least one method with its overrides")
    for name, overrides in suite.methods.items():
        fixed = [o for o in overrides if override_key(o).split(".")[0] in FIXED_KEYS]
        if fixed:
            raise ConfigError(
                f"suite.methods.{name} sets {fixed}: the suite fixes {list(FIXED_KEYS)} for every cell "
                "(fairness); set them in the suite (suite.train, suite.eval, suite.budget_tfe, suite.seeds)"
            )
    for sampler, steps in (suite.teacher_samplers or {}).items():
        if any(not isinstance(s, int) or s < 1 for s in steps):
            raise ConfigError(f"suite.teacher_samplers.{sampler}={list(steps)} must be step counts >= 1")
    for key in ("n", "batch_size", "curve_points"):
        if not (isinstance(suite.eval[key], int) and suite.eval[key] >= 1):
            raise ConfigError(f"suite.eval.{key}={suite.eval[key]} must be an integer >= 1")
    sets = noise_sets(suite)
    if len(set(sets)) != len(sets) or any(not isinstance(s, int) or s < 0 for s in sets):
        raise ConfigError(f"suite.eval.noise_seeds={sets} must be distinct integers >= 0")
    if sets[0] != suite.eval.noise_seed:
        raise ConfigError(
            f"suite.eval.noise_seeds={sets} must start with suite.eval.noise_seed={suite.eval.noise_seed}, "
            "the "
            "noise set the training cells evaluate on"
        )
    made_from = next((o.split("=", 1)[1] for o in suite.trajectories or []
                      if override_key(o) == "noise_seed"),
                     TRAJECTORY_NOISE_SEED)  # fmt: skip
    if suite_needs_trajectories(suite) and int(made_from) in sets:
        raise ConfigError(
            f"suite.trajectories start from noise_seed={made_from}, one of the evaluation-noise sets {sets}: "
            "direct would be measured on its training trajectories' noise; set another noise_seed= there"
        )
    if not 0 <= suite.get("budget_tolerance", BUDGET_TOLERANCE) < 1:
        raise ConfigError(f"suite.budget_tolerance={suite.budget_tolerance} must be in [0, 1)")


def noise_sets(suite: DictConfig) -> list[int]:
    """The evaluation-noise sets every model is measured on: ``eval.noise_seeds``, else
    ``eval.noise_seed``."""
    return list(suite.eval.get("noise_seeds") or [suite.eval.noise_seed])


def needs_trajectories(overrides) -> bool:
    return "data=trajectories" in overrides


def suite_needs_trajectories(suite: DictConfig) -> bool:
    """Whether any method of the suite trains on teacher trajectories (direct distillation)."""
    return any(needs_trajectories(overrides) for overrides in suite.methods.values())


def train_overrides(suite: DictConfig, name: str, seed: int, out_dir: Path) -> list[str]:
    e = suite.eval
    overrides = [*suite.train, *suite.methods[name], f"seed={seed}", f"budget_tfe={suite.budget_tfe}",
                 f"eval.curve_points={e.curve_points}", f"eval.n={e.n}", f"eval.noise_seed={e.noise_seed}",
                 f"eval.batch_size={e.batch_size}", "eval.teacher=false"]  # fmt: skip
    if needs_trajectories(suite.methods[name]):
        overrides.append(f"data.root={out_dir / 'trajectories'}")
    return overrides


def seeds_override(seeds: list[int]) -> str:
    return f"noise_seed=[{','.join(map(str, seeds))}]"


def teacher_overrides(suite: DictConfig, sampler: str, steps: int, out_dir: Path) -> list[str]:
    e = suite.eval
    return [*suite.evaluate, "run=teacher", f"sampler={sampler}", f"sampler.steps={steps}", f"n={e.n}",
            seeds_override(noise_sets(suite)), f"batch_size={e.batch_size}",
            f"results={out_dir / 'teacher' / 'results.csv'}"]  # fmt: skip


def floor_overrides(suite: DictConfig, out_dir: Path) -> list[str]:
    e = suite.eval
    return [*suite.evaluate, f"run={FLOOR}", f"n={e.n}", seeds_override(noise_sets(suite)),
            f"batch_size={e.batch_size}", f"results={out_dir / FLOOR / 'results.csv'}"]  # fmt: skip


def student_eval_overrides(suite: DictConfig, name: str, seed: int, out_dir: Path) -> list[str]:
    """A training cell's student on the noise sets after the first (the training cell measured that one)."""
    e = suite.eval
    return [f"run={training_cell(out_dir, name, seed)}", f"n={e.n}", seeds_override(noise_sets(suite)[1:]),
            f"batch_size={e.batch_size}", f"results={out_dir / 'evals' / 'results.csv'}"]  # fmt: skip


# ---- running cells -----------------------------------------------------------------------------------------
def run_command(module: str, overrides: list[str], log: Path, threads) -> None:
    """``python -m <module> <overrides>``, its output into ``log``; a failure names the log and its end."""
    command = [sys.executable, "-m", module, *overrides] + ([f"threads={threads}"] if threads else [])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command)} exited {code}; its log, {log}, ends:\n{tail}")


def settle_cell(folder: Path, overrides: list[str]) -> str:
    """``done``, ``resume`` or ``start``, after checking a kept cell was started with these overrides."""
    record = folder / CELL_FILE
    if record.is_file():
        before = json.loads(record.read_text())["overrides"]
        if before != overrides:
            changed = sorted(set(before) ^ set(overrides))
            raise ConfigError(
                f"{folder} was run with other settings ({', '.join(changed)}); the suite changed since: "
                "choose another out_dir, or delete that cell to run it again"
            )
    if (folder / run_folder.SUMMARY).is_file():
        return "done"
    if record.is_file() and (folder / run_folder.CHECKPOINTS / run_folder.LAST_CHECKPOINT).is_file():
        return "resume"
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished cell with nothing to resume from
    folder.mkdir(parents=True)
    atomic_write_json(record, {"overrides": overrides})
    return "start"


def run_cell(module: str, folder: Path, overrides: list[str], threads) -> str:
    state = settle_cell(folder, overrides)
    if state == "done":
        return "skipped (finished)"
    args = [f"resume={folder}"] if state == "resume" else [*overrides, f"hydra.run.dir={folder}"]
    run_command(module, args, folder.parent / f"{folder.name}.log", threads)
    return "resumed" if state == "resume" else "ran"


def training_cell(out_dir: Path, name: str, seed: int) -> Path:
    return out_dir / "cells" / name / f"seed{seed}"


def sampler_cell(out_dir: Path, sampler: str, steps: int) -> Path:
    return out_dir / "teacher" / f"{sampler}-{steps}"


def training_cells(suite: DictConfig, out_dir: Path):
    """(method name, seed, folder) of every training cell, seed by seed: a suite stopped part-way holds
    whole seeds of every method."""
    for seed in suite.seeds:
        for name in suite.methods:
            yield name, seed, training_cell(out_dir, name, seed)


def eval_cell(out_dir: Path, name: str, seed: int) -> Path:
    return out_dir / "evals" / name / f"seed{seed}"


def floor_cell(out_dir: Path) -> Path:
    return out_dir / FLOOR / "cell"


def eval_cells(suite: DictConfig, out_dir: Path):
    """(method name, seed, folder) of every training cell's evaluation on the other noise sets (none with one
    noise set)."""
    if len(noise_sets(suite)) > 1:
        for name, seed, _ in training_cells(suite, out_dir):
            yield name, seed, eval_cell(out_dir, name, seed)


def sampler_cells(suite: DictConfig, out_dir: Path):
    """(sampler, steps, folder) of every teacher-sampler cell."""
    for sampler, counts in (suite.teacher_samplers or {}).items():
        for steps in counts:
            yield sampler, steps, sampler_cell(out_dir, sampler, steps)


def cells(suite: DictConfig, out_dir: Path):
    """(label, module, folder, overrides) of every cell: the floor, the training cells, their evaluations on
    the other noise sets, the teacher samplers."""
    yield "floor", "distillbench.evaluate", floor_cell(out_dir), floor_overrides(suite, out_dir)
    for name, seed, folder in training_cells(suite, out_dir):
        yield (f"{name} seed {seed}", "distillbench.train", folder,
               train_overrides(suite, name, seed, out_dir))  # fmt: skip
    for name, seed, folder in eval_cells(suite, out_dir):
        yield (f"{name} seed {seed}, noise sets {noise_sets(suite)[1:]}", "distillbench.evaluate", folder,
               student_eval_overrides(suite, name, seed, out_dir))  # fmt: skip
    for sampler, steps, folder in sampler_cells(suite, out_dir):
        overrides = teacher_overrides(suite, sampler, steps, out_dir)
        yield f"teacher {sampler}-{steps}", "distillbench.evaluate", folder, overrides


def make_trajectories(suite: DictConfig, out_dir: Path, threads) -> None:
    """Direct distillation's pairs, once per suite (the trajectories command skips finished shards)."""
    overrides = [*suite.trajectories, f"out_dir={out_dir / 'trajectories'}",
                 f"hydra.run.dir={out_dir / 'logs' / 'trajectories'}"]  # fmt: skip
    run_command("distillbench.make_trajectories", overrides, out_dir / "logs" / "trajectories.log", threads)


# ---- the table ---------------------------------------------------------------------------------------------
def cell_config(folder: Path) -> DictConfig:
    return OmegaConf.load(folder / run_folder.CONFIG)


def cell_summary(folder: Path) -> dict:
    """A finished cell's ``summary.json``, which must hold the protocol record of its figures."""
    path = folder / run_folder.SUMMARY
    summary = json.loads(path.read_text())
    if not all(row.get(PROTOCOL) for row in summary_rows(summary)):
        raise ConfigError(
            f"{path} holds no protocol record (the cell finished before figures carried one), so its figures "
            f"cannot be checked to compare: delete {folder} to measure the cell again"
        )
    return summary


def fairness_record(cfg: DictConfig, protocol: dict, training: bool) -> dict:
    """What must be the same in every cell: teacher, metric suite, sample count and the protocol record of the
    figures (extractor weights, preprocessing, real statistics); the noise sets are checked per row."""
    n = cfg.eval.n if training else cfg.n
    metrics = {k: v for k, v in OmegaConf.to_container(cfg.metrics).items() if k not in ("n", "cache_dir")}
    teacher = OmegaConf.to_container(cfg.teacher)
    # each cell's own assets folder (none recorded: paths as they are), so cells of a moved checkout compare
    assets = OmegaConf.select(cfg, "paths.assets_dir", default=None)
    return {
        "teacher": relocatable(teacher, assets),
        "metrics": relocatable(metrics, assets),
        "n": n,
        PROTOCOL: protocol,
    }


def check_fair(records: dict[str, dict], budgets: dict[str, float], spent: dict[str, float],
               tolerance: float) -> None:  # fmt: skip
    """Every cell shares the first cell's fairness record; every training cell the same configured budget,
    and spent within ``tolerance`` of it, never over."""
    (first, reference), *rest = records.items()
    for label, record in rest:
        changed = [k for k in reference if k in record and record[k] != reference[k]]
        if changed:
            raise ConfigError(
                f"{label} differs from {first} in {changed}: the leaderboard compares only cells with the "
                "same teacher, metric suite, sample count, evaluation noise and protocol"
            )
    if len(set(budgets.values())) > 1:
        raise ConfigError(f"the training cells ran with different budgets: {budgets}")
    for label, used in spent.items():
        budget = budgets[label]
        if not budget * (1 - tolerance) <= used <= budget * (1 + 1e-9):
            raise ConfigError(
                f"{label} spent {used:.6g} of its budget of {budget:.6g}: the cells compare only when each "
                f"spends between {1 - tolerance:.0%} of the budget and all of it (suite.budget_tolerance)"
            )


def figures_of(row: dict) -> dict:
    return {k: row.get(k) for k in FIGURES}


def student_row(name: str, seed: int, summary: dict, unit) -> dict:
    """The training cell's own figures (its last evaluation, on the first noise set)."""
    student = summary["student"]
    figures = {metric_kind(k): v for k, v in student.items() if "@" in k}
    return {"method": name, "seed": seed, "noise_seed": None, "nfe": student["nfe"], **figures_of(figures),
            "tfe": summary["tfe"], "unit": unit.name, "train_seconds": summary["train_seconds"],
            "samples_per_second": student["samples_per_second"],
            PROTOCOL: protocol_text(summary[PROTOCOL])}  # fmt: skip


def evaluated_row(base: dict, row: dict) -> dict:
    """A row of an evaluate cell, with the method's name, seed and spent budget."""
    return base | {
        "noise_seed": row["noise_seed"],
        "nfe": row["nfe"],
        **figures_of(row),
        "samples_per_second": row["samples_per_second"],
        PROTOCOL: protocol_text(row[PROTOCOL]),
    }


def collect(suite: DictConfig, out_dir: Path) -> pd.DataFrame:
    """One row per cell and noise set, after checking the cells compare."""
    rows, records, budgets, spent = [], {}, {}, {}
    sets, tolerance = noise_sets(suite), suite.get("budget_tolerance", BUDGET_TOLERANCE)
    for name, seed, folder in training_cells(suite, out_dir):
        cfg, summary = cell_config(folder), cell_summary(folder)
        label = f"{name} seed {seed}"
        records[label] = fairness_record(cfg, summary[PROTOCOL], True) | {"noise_seed": cfg.eval.noise_seed}
        budgets[label], spent[label] = cfg.budget_tfe, summary["tfe"]
        first = student_row(name, seed, summary, unit_of_config(cfg.teacher)) | {"noise_seed": sets[0]}
        rows.append(first)
        if len(sets) > 1:
            evaluated = summary_rows(cell_summary(eval_cell(out_dir, name, seed)))
            check_noise_sets(f"{label}'s evaluation", evaluated, sets[1:])
            records[f"{label}, noise sets {sets[1:]}"] = {
                "n": evaluated[0]["n"],
                PROTOCOL: evaluated[0][PROTOCOL],
            }
            rows += [evaluated_row(first, row) for row in evaluated]
    for sampler, steps, folder in sampler_cells(suite, out_dir):
        summary = cell_summary(folder)
        evaluated = summary_rows(summary)
        check_noise_sets(f"teacher {sampler}-{steps}", evaluated, sets)
        records[f"teacher {sampler}-{steps}"] = fairness_record(
            cell_config(folder), evaluated[0][PROTOCOL], False
        )
        base = {"method": f"teacher {sampler}", "seed": None, "tfe": 0.0, "unit": None, "train_seconds": 0.0}
        rows += [evaluated_row(base, row) for row in evaluated]
    floor = summary_rows(cell_summary(floor_cell(out_dir)))
    check_noise_sets(FLOOR, floor, sets)
    records[FLOOR] = {"n": floor[0]["n"], PROTOCOL: floor[0][PROTOCOL]}
    base = {"method": FLOOR, "seed": None, "tfe": 0.0, "unit": None, "train_seconds": 0.0}
    rows += [evaluated_row(base, row) for row in floor]
    check_fair(records, budgets, spent, tolerance)
    return pd.DataFrame(rows).astype({"seed": "Int64", "noise_seed": "Int64"})


def check_noise_sets(label: str, rows: list[dict], expected: list[int]) -> None:
    """An evaluate cell measured exactly the noise sets the suite asks of it, each under one protocol."""
    found = [int(r["noise_seed"]) for r in rows]
    if found != list(expected):
        raise ConfigError(
            f"{label} was measured on the noise sets {found}, the suite asks for {list(expected)}"
        )
    if len({protocol_text(r[PROTOCOL]) for r in rows}) > 1:
        raise ConfigError(f"{label}'s noise sets were measured under different protocols")


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and NFE: the mean and the half-width of its 95% t interval over its repeats (seeds × noise
    sets) of every figure (:mod:`distillbench.stats`), the repeat count, and per :data:`VERDICTS` figure the
    verdict against the best method (Welch's test; the floor row gets none)."""
    grouped = dict(list(table.groupby(["method", "nfe"], sort=False)))
    columns = [*FIGURES, "tfe", "train_seconds", "samples_per_second"]
    rows = []
    for (method, nfe), group in grouped.items():
        row = {"method": method, "nfe": nfe, "seeds": group["seed"].nunique(),
               "noise_sets": group["noise_seed"].nunique(), "repeats": len(group),
               "unit": group["unit"].dropna().iloc[0] if group["unit"].notna().any() else None}  # fmt: skip
        for column in columns:
            spread = stats.interval(group[column].astype(float))
            row[f"{column}_mean"], row[f"{column}_ci"] = spread.mean, spread.half_width
        rows.append(row)
    summary = pd.DataFrame(rows)
    trained = {key for key, group in grouped.items() if (group["tfe"] > 0).any()}
    for kind in VERDICTS:
        measured = {
            key: group for key, group in grouped.items() if key[0] != FLOOR and group[kind].notna().any()
        }
        verdicts = verdicts_on(measured, kind, among=trained)
        summary[f"{kind}_verdict"] = [verdicts.get((r.method, r.nfe), "") for r in summary.itertuples()]
    floor_last = summary["method"] == FLOOR
    summary = summary.assign(_floor=floor_last).sort_values(["_floor", "fid_mean"]).drop(columns="_floor")
    return summary.reset_index(drop=True)


def within_family(table: pd.DataFrame, separator: str = "@") -> pd.DataFrame:
    """A suite whose method names read ``<method><separator><setting>`` (``sim@1e-4``: suite=gmm_digits_lr),
    read method by method: per cell name its family and setting, the mean and 95% t interval of each
    :data:`VERDICTS` figure over its repeats, and the verdict against the family's own best setting (Welch's
    test, :func:`distillbench.stats.ties_with_best`): how far a method's figures move with the setting."""
    students = table[table["method"].str.contains(separator, regex=False)]
    rows = []
    for family, group in students.groupby(students["method"].str.split(separator).str[0], sort=False):
        cells = dict(list(group.groupby("method", sort=False)))
        verdicts = {kind: verdicts_on(cells, kind) for kind in VERDICTS if group[kind].notna().any()}
        for name, cell in cells.items():
            row = {"family": family, "setting": name.split(separator, 1)[1], "repeats": len(cell)}
            for kind in verdicts:
                spread = stats.interval(cell[kind].astype(float))
                row |= {f"{kind}_mean": spread.mean, f"{kind}_ci": spread.half_width,
                        f"{kind}_verdict": verdicts[kind][name]}  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)


def plus_minus(mean: float, half_width: float, digits: int = 3) -> str:
    """``mean ± half-width`` (``mean`` alone for one repeat, ``—`` for a figure the metric suite lacks)."""
    return stats.Interval(mean, half_width, 0 if np.isnan(mean) else 2).text(digits)


def measured_figures(summary: pd.DataFrame) -> list[str]:
    """The figures the metric suite measured (the ground-truth ones only with an exact law)."""
    return [k for k in FIGURES if summary[f"{k}_mean"].notna().any()]


NOTE = (
    "Each figure is the mean ± the half-width of its 95% t interval (ddof = 1) over the row's repeats: "
    "training seeds × evaluation-noise sets for a method, noise sets for a teacher sampler and for the floor "
    "(the data's own independent samples at the same n: what an exact model scores). 'tied': Welch's t-test "
    "does not separate the row from the best method at α = 0.05 (the log-density gap by its distance from "
    "0); 'worse' or 'better' (a teacher sampler only): it does; 'untested': fewer than two repeats on either "
    "side. The repeats of one training seed share its weights, so the interval counts them as independent "
    "where they are not: read a tie as a tie, a separation near α with care."
)
HEADINGS = {
    "fid": "FID",
    "is": "IS",
    "precision": "precision",
    "recall": "recall",
    "log_density_gap": "log-density gap",
    "coverage_tv": "coverage TV",
    "clamped_fraction": "clamped",
}


def markdown(summary: pd.DataFrame, suite: DictConfig, header: dict, unit) -> str:
    figures = measured_figures(summary)
    verdicts = [k for k in VERDICTS if k in figures]
    heads = []
    for kind in figures:
        heads.append(HEADINGS[kind])
        if kind in verdicts:
            heads.append(f"{HEADINGS[kind]} against the best")
    other = "TFE" if unit.name == "SFE" else "SFE"
    heads += [f"training budget used ({unit.name})", f"the same in {other}", "training wall time (s)",
              "samples/s", "seeds × noise sets"]  # fmt: skip
    lines = [f"# Leaderboard: {suite.name}", "", *[f"- {key}: {value}" for key, value in header.items()], "",
             "| method | NFE | " + " | ".join(heads) + " |", "|---" * (2 + len(heads)) + "|"]  # fmt: skip
    for r in summary.itertuples():
        trained = r.tfe_mean > 0
        cells = [r.method, r.nfe]
        for kind in figures:
            cells.append(plus_minus(getattr(r, f"{kind}_mean"), getattr(r, f"{kind}_ci")))
            if kind in verdicts:
                cells.append(getattr(r, f"{kind}_verdict") or "—")
        if trained:
            converted = r.tfe_mean * unit.tfe_per_unit if unit.name == "SFE" else r.tfe_mean
            cells += [f"{r.tfe_mean:.4g}", f"{converted:.4g}", f"{r.train_seconds_mean:.3g}"]
        else:
            cells += ["—"] * 3
        cells += [f"{r.samples_per_second_mean:.4g}", f"{r.seeds} × {r.noise_sets}" if trained else
                  f"{r.noise_sets} noise sets"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", NOTE]
    return "\n".join(lines) + "\n"


def curves(suite: DictConfig, out_dir: Path) -> dict[str, list[pd.DataFrame]]:
    """Each method's figures along its training (kimg, the compute spent, every :data:`FIGURES` kind the
    metric suite measured), one frame per seed, from the cells' eval.csv."""
    found = {name: [] for name in suite.methods}
    for name, _, folder in training_cells(suite, out_dir):
        frame = pd.read_csv(folder / EVAL_FILE)
        columns = {column: kind for kind in FIGURES if (column := metric_column(frame, kind))}
        found[name].append(frame[["kimg", "tfe", *columns]].rename(columns=columns))
    return found


def curve_table(per_method: dict[str, list[pd.DataFrame]], seeds) -> pd.DataFrame:
    """:func:`curves`' frames as one table, one row per evaluation: method, seed, the evaluation's index
    along its run (``point``), kimg, the budget spent and the figures."""
    frames = [frame.assign(method=name, seed=seed, point=np.arange(len(frame)))
              for name, found in per_method.items()
              for seed, frame in zip(seeds, found, strict=True)]  # fmt: skip
    table = pd.concat(frames, ignore_index=True)
    return table[["method", "seed", "point", *table.columns.drop(["method", "seed", "point"])]]


def plot(table: pd.DataFrame, per_method: dict[str, list[pd.DataFrame]], path: Path, title: str,
         unit) -> Path:  # fmt: skip
    """First panel: FID against training budget (mean over seeds, its 95% t band). Then each measured figure
    (FID and the ground-truth ones) against sampling NFE: methods as points with their 95% t interval over
    seeds × noise sets, the teacher's samplers as lines with theirs, the floor as a band."""
    kinds = [k for k in VERDICTS if table[k].notna().any()]
    columns = 2 if kinds[1:] else 1 + len(kinds)  # a 2 × 2 grid with the ground-truth panels
    rows = math.ceil((1 + len(kinds)) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 4.6 * rows), squeeze=False)
    left, *right = axes.flat
    for name, frames in per_method.items():
        points = min(len(f) for f in frames)
        spent = np.mean([f["tfe"].to_numpy()[:points] for f in frames], axis=0)
        fid = np.stack([f["fid"].to_numpy()[:points] for f in frames])
        spreads = [stats.interval(fid[:, i]) for i in range(points)]
        mean = np.array([s.mean for s in spreads])
        half = np.nan_to_num(np.array([s.half_width for s in spreads]))
        (line,) = left.plot(spent, mean, marker="o", label=name)
        left.fill_between(spent, mean - half, mean + half, color=line.get_color(), alpha=0.2)
    left.set(xlabel=f"training budget spent ({unit.name})", ylabel="FID", yscale="log",
             title="FID against training budget (first noise set)")  # fmt: skip
    trained = table[table["tfe"] > 0]
    for axis, kind in zip(right, kinds, strict=True):
        for name, rows in trained.groupby("method", sort=False):
            spread = stats.interval(rows[kind].astype(float))
            axis.errorbar(rows["nfe"].mean(), spread.mean, yerr=np.nan_to_num(spread.half_width), marker="o",
                          capsize=4, linestyle="none", label=name)  # fmt: skip
        for name, rows in table[(table["tfe"] == 0) & (table["method"] != FLOOR)].groupby(
            "method", sort=False
        ):
            by_nfe = [(nfe, stats.interval(group[kind].astype(float))) for nfe, group in rows.groupby("nfe")]
            nfe = [n for n, _ in by_nfe]
            half = np.nan_to_num([s.half_width for _, s in by_nfe])
            axis.errorbar(nfe, [s.mean for _, s in by_nfe], yerr=half,
                          marker="s", linestyle="--", capsize=3, label=name)  # fmt: skip
        floor = stats.interval(table.loc[table["method"] == FLOOR, kind].astype(float))
        axis.axhline(floor.mean, color="k", lw=1, label="floor (exact vs exact)")
        if not np.isnan(floor.half_width):
            axis.axhspan(floor.low, floor.high, color="k", alpha=0.1)
        log = kind == "fid" and (table[kind] > 0).all()
        if kind == "log_density_gap":  # a few-step sampler's gap runs to −10⁴ where methods sit near −1
            axis.set_yscale("symlog", linthresh=0.1)
        elif log:
            axis.set_yscale("log")
        axis.set(xlabel="sampling NFE", ylabel=HEADINGS[kind], xscale="log",
                 title=f"{HEADINGS[kind]} against sampling NFE (95% t intervals)")  # fmt: skip
    for axis in (left, *right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def teacher_name(teacher: DictConfig) -> str:
    return display_path(teacher.path) if "path" in teacher else teacher._target_


def measured_when(suite: DictConfig, out_dir: Path) -> str:
    """When the cells finished: the first and last ``summary.json`` (a resumed suite spans several runs)."""
    files = [folder / run_folder.SUMMARY for _, _, folder, _ in cells(suite, out_dir)]
    times = sorted(datetime.fromtimestamp(p.stat().st_mtime) for p in files)
    first, last = (t.isoformat(sep=" ", timespec="minutes") for t in (times[0], times[-1]))
    return first if first == last else f"{first} to {last}"


def write_outputs(suite: DictConfig, out_dir: Path) -> pd.DataFrame:
    table = collect(suite, out_dir)
    with atomic_writer(out_dir / "leaderboard.csv") as tmp:
        table.to_csv(tmp, index=False)
    summary = summarise(table)
    first = cell_config(training_cell(out_dir, next(iter(suite.methods)), suite.seeds[0]))
    unit = unit_of_config(first.teacher)
    budget = f"{suite.budget_tfe:.4g} {unit.describe()}"
    if unit.name == "SFE":
        budget += f"; {suite.budget_tfe * unit.tfe_per_unit:.4g} TFE"
    header = {"command": f"python -m distillbench.leaderboard suite={suite.name}",
              "measured": measured_when(suite, out_dir),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                         f"{torch.__version__}",
              "budget per method": budget,
              "teacher": teacher_name(first.teacher),
              "evaluation": f"{suite.eval.n} samples on each of the noise sets {noise_sets(suite)}, "
                            f"{first.metrics.extractor._target_.rsplit('.', 1)[-1]} features",
              PROTOCOL: f"`{table[PROTOCOL].iloc[0]}`",
              "seeds": list(suite.seeds)}  # fmt: skip
    atomic_write_text(out_dir / "leaderboard.md", markdown(summary, suite, header, unit))
    title = f"{suite.name}: {suite.budget_tfe:.3g} {unit.name} per method"
    per_method = curves(suite, out_dir)
    with atomic_writer(out_dir / "curves.csv") as tmp:  # the figure's budget curves
        curve_table(per_method, suite.seeds).to_csv(tmp, index=False)
    families = within_family(table)
    if not families.empty:  # settings of one method (``sim@1e-4``): each read against the method's best
        with atomic_writer(out_dir / "within_family.csv") as tmp:
            families.to_csv(tmp, index=False)
    plot(table, per_method, out_dir / "leaderboard.png", title, unit)
    return summary


def readme_markers(name: str) -> tuple[str, str]:
    return f"<!-- leaderboard:{name} -->", f"<!-- /leaderboard:{name} -->"


def check_readme(path: Path, name: str) -> None:
    """``page`` must hold the suite's block (its two markers), so that only that block is rewritten."""
    start, end = readme_markers(name)
    text = path.read_text() if path.is_file() else ""
    if not (start in text and end in text and text.index(start) < text.index(end)):
        raise ConfigError(
            f"page={path} has no leaderboard block for suite {name}: add the lines {start} and {end} "
            "where the table should go, or leave page unset"
        )


def update_readme(path: Path, name: str, table: str, figure: Path) -> None:
    """Replace the suite's block in ``path`` with the table and the figure (copied beside the page)."""
    picture = path.parent / f"leaderboard_{name}.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure, picture)
    start, end = readme_markers(name)
    text = path.read_text()
    block = f"{start}\n{table}\n![leaderboard {name}]({picture.relative_to(path.parent)})\n{end}"
    atomic_write_text(path, text[: text.index(start)] + block + text[text.index(end) + len(end) :])


def leaderboard(cfg: DictConfig) -> pd.DataFrame:
    suite, out_dir = cfg.suite, Path(cfg.out_dir)
    check_suite(suite)
    if cfg.page:
        check_readme(Path(cfg.page), suite.name)
    if suite_needs_trajectories(suite):
        make_trajectories(suite, out_dir, cfg.threads)
    for label, module, folder, overrides in cells(suite, out_dir):
        print(f"{label}: {run_cell(module, folder, overrides, cfg.threads)}", flush=True)
    summary = write_outputs(suite, out_dir)
    table = (out_dir / "leaderboard.md").read_text()
    if cfg.page:
        update_readme(Path(cfg.page), suite.name, table.split("\n", 2)[2], out_dir / "leaderboard.png")
    print(table)
    print(f"leaderboard: {out_dir}/leaderboard.md, leaderboard.csv, leaderboard.png")
    return summary


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="leaderboard")
@task
def main(cfg: DictConfig) -> None:
    leaderboard(cfg)


if __name__ == "__main__":
    main()
