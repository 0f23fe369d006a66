"""``python -m distillbench.leaderboard suite=digits``: every method on one teacher under one compute budget.

A suite (``conf/suite/``) names the teacher, data and metric suite, the budget in teacher-forward equivalents
(TFE: a network's forward pass of one sample = 1, its backward = 2, scaled by its parameter count over the
teacher's), the seeds, each method's overrides and the teacher samplers. Its cells, each a command in its own
folder under ``out_dir``:

- ``cells/<method>/seed<k>``: ``python -m distillbench.train`` with ``budget_tfe`` (the method's duration is
  set to spend it, data generation included), ``eval.curve_points`` evaluations along the way;
- ``teacher/<sampler>-<steps>``: ``python -m distillbench.evaluate run=teacher``;
- ``trajectories``: direct distillation's pairs, made once and charged to every direct cell's budget.

Fairness, enforced here: method overrides may not touch the teacher, the metric suite, the evaluation, the
budget or the seed (the suite sets them for every cell), and every finished cell's recorded config must show
the same teacher, metric suite (feature extractor), sample count and evaluation noise, its ``summary.json``
the same protocol record (extractor weights, preprocessing, real statistics: docs/metrics.md), and the
training cells the same budget. The score methods are evaluated with their generator's EMA; progressive and
direct distillation keep no EMA in their papers and are evaluated with their trained weights.

Resumable: a cell with ``summary.json`` is finished and skipped, one with a checkpoint resumes from it
(``resume=<cell>``), anything else starts over. The outputs are rebuilt from the cells at the end:
``leaderboard.md``, ``leaderboard.csv`` (one row per cell) and ``leaderboard.png`` (FID against training
budget; FID against sampling NFE).
"""

from __future__ import annotations

import json
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
from distillbench.config import CONFIG_DIR
from distillbench.errors import ConfigError
from distillbench.evaluate import display_path, save_figure
from distillbench.metrics.suite import PROTOCOL, protocol_text
from distillbench.sweeps import EVAL_FILE, metric_column, metric_kind
from distillbench.utils.command import cli, task
from distillbench.utils.io import atomic_write_json, atomic_write_text, atomic_writer

#: settings the suite fixes for every cell (fairness); a method's overrides may not set them
FIXED_KEYS = ("teacher", "metrics", "eval", "budget_tfe", "seed", "hydra")
FIGURES = ("fid", "is", "precision", "recall")
CELL_FILE = "cell.json"  # the overrides a cell was started with: a rerun must ask for the same


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


def needs_trajectories(overrides) -> bool:
    return "data=trajectories" in overrides


def train_overrides(suite: DictConfig, name: str, seed: int, out_dir: Path) -> list[str]:
    e = suite.eval
    overrides = [*suite.train, *suite.methods[name], f"seed={seed}", f"budget_tfe={suite.budget_tfe}",
                 f"eval.curve_points={e.curve_points}", f"eval.n={e.n}", f"eval.noise_seed={e.noise_seed}",
                 f"eval.batch_size={e.batch_size}", "eval.teacher=false"]  # fmt: skip
    if needs_trajectories(suite.methods[name]):
        overrides.append(f"data.root={out_dir / 'trajectories'}")
    return overrides


def teacher_overrides(suite: DictConfig, sampler: str, steps: int, out_dir: Path) -> list[str]:
    e = suite.eval
    return [*suite.evaluate, "run=teacher", f"sampler={sampler}", f"sampler.steps={steps}", f"n={e.n}",
            f"noise_seed={e.noise_seed}", f"batch_size={e.batch_size}",
            f"results={out_dir / 'teacher' / 'results.csv'}"]  # fmt: skip


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
    """(method name, seed, folder) of every training cell."""
    for name in suite.methods:
        for seed in suite.seeds:
            yield name, seed, training_cell(out_dir, name, seed)


def sampler_cells(suite: DictConfig, out_dir: Path):
    """(sampler, steps, folder) of every teacher-sampler cell."""
    for sampler, counts in (suite.teacher_samplers or {}).items():
        for steps in counts:
            yield sampler, steps, sampler_cell(out_dir, sampler, steps)


def cells(suite: DictConfig, out_dir: Path):
    """(label, module, folder, overrides) of every cell, training cells first."""
    for name, seed, folder in training_cells(suite, out_dir):
        yield (f"{name} seed {seed}", "distillbench.train", folder,
               train_overrides(suite, name, seed, out_dir))  # fmt: skip
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
    if not summary.get(PROTOCOL):
        raise ConfigError(
            f"{path} holds no protocol record (the cell finished before figures carried one), so its figures "
            f"cannot be checked to compare: delete {folder} to measure the cell again"
        )
    return summary


def fairness_record(cfg: DictConfig, summary: dict, training: bool) -> dict:
    """What must be the same in every cell: teacher, metric suite, sample count, evaluation noise and the
    protocol record of the figures (extractor weights, preprocessing, real statistics)."""
    n, noise = (cfg.eval.n, cfg.eval.noise_seed) if training else (cfg.n, cfg.noise_seed)
    metrics = {k: v for k, v in OmegaConf.to_container(cfg.metrics).items() if k not in ("n", "cache_dir")}
    return {"teacher": OmegaConf.to_container(cfg.teacher), "metrics": metrics, "n": n, "noise_seed": noise,
            PROTOCOL: summary[PROTOCOL]}  # fmt: skip


def check_fair(records: dict[str, dict], budgets: dict[str, float]) -> None:
    """Every cell shares the first cell's fairness record; every training cell the same budget."""
    (first, reference), *rest = records.items()
    for label, record in rest:
        changed = [k for k in reference if record[k] != reference[k]]
        if changed:
            raise ConfigError(
                f"{label} differs from {first} in {changed}: the leaderboard compares only cells with the "
                "same teacher, metric suite, sample count, evaluation noise and protocol"
            )
    if len(set(budgets.values())) > 1:
        raise ConfigError(f"the training cells ran with different budgets: {budgets}")


def student_row(name: str, seed: int, summary: dict) -> dict:
    student = summary["student"]
    figures = {metric_kind(k): v for k, v in student.items() if "@" in k}
    return {"method": name, "seed": seed, "nfe": student["nfe"], **{k: figures.get(k) for k in FIGURES},
            "tfe": summary["tfe"], "train_seconds": summary["train_seconds"],
            "samples_per_second": student["samples_per_second"],
            PROTOCOL: protocol_text(summary[PROTOCOL])}  # fmt: skip


def teacher_row(sampler: str, steps: int, row: dict) -> dict:
    return {"method": f"teacher {sampler}", "seed": None, "nfe": row["nfe"], **{k: row[k] for k in FIGURES},
            "tfe": 0.0, "train_seconds": 0.0, "samples_per_second": row["samples_per_second"],
            PROTOCOL: protocol_text(row[PROTOCOL])}  # fmt: skip


def collect(suite: DictConfig, out_dir: Path) -> pd.DataFrame:
    """One row per cell, after checking the cells compare."""
    rows, records, budgets = [], {}, {}
    for name, seed, folder in training_cells(suite, out_dir):
        cfg, summary = cell_config(folder), cell_summary(folder)
        label = f"{name} seed {seed}"
        records[label], budgets[label] = fairness_record(cfg, summary, True), cfg.budget_tfe
        rows.append(student_row(name, seed, summary))
    for sampler, steps, folder in sampler_cells(suite, out_dir):
        summary = cell_summary(folder)
        records[f"teacher {sampler}-{steps}"] = fairness_record(cell_config(folder), summary, False)
        rows.append(teacher_row(sampler, steps, summary))
    check_fair(records, budgets)
    return pd.DataFrame(rows).astype({"seed": "Int64"})


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and NFE: the mean and the half-width of its 95% t interval over seeds of every figure
    (:mod:`distillbench.stats`), the seed count, and the FID verdict against the best row (Welch's test)."""
    grouped = table.groupby(["method", "nfe"], sort=False)
    columns = [*FIGURES, "tfe", "train_seconds", "samples_per_second"]
    rows = []
    for (method, nfe), group in grouped:
        row = {"method": method, "nfe": nfe, "seeds": len(group)}
        for column in columns:
            spread = stats.interval(group[column])
            row[f"{column}_mean"], row[f"{column}_ci"] = spread.mean, spread.half_width
        rows.append(row)
    verdicts = stats.ties_with_best({key: group["fid"] for key, group in grouped})
    summary = pd.DataFrame(rows)
    summary["fid_verdict"] = [verdicts[(r.method, r.nfe)] for r in summary.itertuples()]
    return summary.sort_values(["fid_mean"]).reset_index(drop=True)


def plus_minus(mean: float, half_width: float, digits: int = 3) -> str:
    """``mean ± half-width`` (``mean`` alone for one seed, ``—`` for a figure the metric suite lacks)."""
    return stats.Interval(mean, half_width, 0 if np.isnan(mean) else 2).text(digits)


def markdown(summary: pd.DataFrame, suite: DictConfig, header: dict) -> str:
    lines = [f"# Leaderboard: {suite.name}", "",
             *[f"- {key}: {value}" for key, value in header.items()], "",
             "| method | NFE | FID | FID against the best | IS | precision | recall "
             "| training budget used (TFE) | training wall time (s) | samples/s | seeds |",
             "|---" * 11 + "|"]  # fmt: skip
    for r in summary.itertuples():
        trained = r.tfe_mean > 0
        figures = [plus_minus(getattr(r, f"{k}_mean"), getattr(r, f"{k}_ci")) for k in FIGURES]
        figures.insert(1, r.fid_verdict)
        training = [f"{r.tfe_mean:.4g}", f"{r.train_seconds_mean:.3g}", r.seeds] if trained else ["—"] * 3
        cells = [r.method, r.nfe, *figures, *training[:2], f"{r.samples_per_second_mean:.4g}", training[2]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Each figure is the mean ± the half-width of its 95% t interval over the seeds (ddof = 1; "
              "the mean alone for one seed). 'tied': Welch's t-test does not separate the row's FID from the "
              "best row's at α = 0.05; 'untested': fewer than two seeds on either side."]  # fmt: skip
    return "\n".join(lines) + "\n"


def curves(suite: DictConfig, out_dir: Path) -> dict[str, pd.DataFrame]:
    """Each method's FID against the compute spent, one frame per seed (from the cells' eval.csv)."""
    found = {name: [] for name in suite.methods}
    for name, _, folder in training_cells(suite, out_dir):
        frame = pd.read_csv(folder / EVAL_FILE)
        fid = metric_column(frame, "fid")
        found[name].append(frame[["tfe", fid]].rename(columns={fid: "fid"}))
    return found


def plot(table: pd.DataFrame, per_method: dict[str, list[pd.DataFrame]], path: Path, title: str) -> Path:
    """Left: FID against training budget (mean over seeds, min–max band). Right: FID against NFE (students as
    points with their seed spread, the teacher's samplers as lines)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, frames in per_method.items():
        points = min(len(f) for f in frames)
        tfe = np.mean([f["tfe"].to_numpy()[:points] for f in frames], axis=0)
        fid = np.stack([f["fid"].to_numpy()[:points] for f in frames])
        (line,) = left.plot(tfe, fid.mean(0), marker="o", label=name)
        left.fill_between(tfe, fid.min(0), fid.max(0), color=line.get_color(), alpha=0.2)
    left.set(xlabel="training budget spent (teacher-forward equivalents)", ylabel="FID", yscale="log",
             title="FID against training budget")  # fmt: skip
    trained = table[table["tfe"] > 0]
    for name, rows in trained.groupby("method", sort=False):
        spread = stats.interval(rows["fid"]).half_width if len(rows) > 1 else None
        right.errorbar(rows["nfe"].mean(), rows["fid"].mean(), yerr=spread, marker="o", capsize=4,
                       linestyle="none", label=name)  # fmt: skip
    for name, rows in table[table["tfe"] == 0].groupby("method", sort=False):
        rows = rows.sort_values("nfe")
        right.plot(rows["nfe"], rows["fid"], marker="s", linestyle="--", label=name)
    right.set(
        xlabel="sampling NFE", ylabel="FID", xscale="log", yscale="log", title="FID against sampling NFE"
    )
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
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
    header = {"command": f"python -m distillbench.leaderboard suite={suite.name}",
              "measured": measured_when(suite, out_dir),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                         f"{torch.__version__}",
              "budget per method": f"{suite.budget_tfe:.4g} teacher-forward equivalents (forward 1, backward "
                                   "2, scaled by parameters over the teacher's)",
              "teacher": teacher_name(first.teacher),
              "evaluation": f"{suite.eval.n} samples on noise seed {suite.eval.noise_seed}, "
                            f"{first.metrics.extractor._target_.rsplit('.', 1)[-1]} features",
              PROTOCOL: f"`{table[PROTOCOL].iloc[0]}`",
              "seeds": list(suite.seeds)}  # fmt: skip
    atomic_write_text(out_dir / "leaderboard.md", markdown(summary, suite, header))
    title = f"{suite.name}: {suite.budget_tfe:.3g} teacher-forward equivalents per method"
    plot(table, curves(suite, out_dir), out_dir / "leaderboard.png", title)
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
    if any(needs_trajectories(o) for o in suite.methods.values()):
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
