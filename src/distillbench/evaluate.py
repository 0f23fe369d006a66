"""``python -m distillbench.evaluate run=<training run folder | checkpoint | teacher | floor> n=2000``.

Evaluates a trained one-step student (its EMA generator) or, with ``run=teacher``, the ``teacher`` with the
``sampler`` choice, on the fixed evaluation noise and labels that training's periodic evaluation uses, so
the figures compare. ``run=floor`` measures the data's own independent samples instead (``MetricSuite.floor``:
the ``test`` split, keyed by the noise seed): the value an exact model reaches at this n, the floor row of a
comparison. ``noise_seed`` may be a list (``noise_seed=[0,1,2]``): one row per evaluation-noise set, in one
process. The row (model, method, data, extractor, n, NFE, FID, IS, KID, precision, recall,
samples/s and the metric suite's protocol record) goes into the cumulative table ``results`` (CSV, rewritten
atomically). A row is keyed by (model, data, n, extractor, noise_seed); a key already in the table is reused
instead of recomputed unless ``force=true`` or its protocol differs from the suite's now (other weights,
preprocessing or real statistics), so sweeps that cross students with sampler settings stay cheap and resume
after a stop.

Each job writes its run folder: ``config.yaml``, ``samples.png`` and ``summary.json`` (the row). After a
``-m`` sweep, :class:`SweepReport` (a Hydra callback) gathers the jobs' rows into ``results.csv``,
``results.md``, ``fid_vs_nfe.png`` and ``precision_recall.png`` in the sweep folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import hydra
import pandas as pd
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, open_dict

from distillbench import stats
from distillbench.config import CONFIG_DIR
from distillbench.errors import ConfigError
from distillbench.metrics.suite import PROTOCOL, MetricSuite, format_count, protocol_text
from distillbench.runs import CHECKPOINT, load_run, locate_run
from distillbench.samplers.generate import StudentSampler, generate
from distillbench.sweeps import HIGHER_IS_BETTER, metric_kind
from distillbench.utils.command import (
    cli,
    hydra_choice,
    output_dir,
    require_at_least_one,
    resolve_device,
    task,
    write_config,
    write_summary,
)
from distillbench.utils.images import save_samples_figure
from distillbench.utils.io import atomic_write_text, atomic_writer
from distillbench.utils.tables import print_summary

#: figures of data with an exact law (data=gmm_*), empty for other data; tables written before them lack them
GROUND_TRUTH = ("log_density_gap", "coverage_tv", "clamped_fraction")
COLUMNS = ("time", "model", "method", "data", "extractor", "n", "noise_seed", "nfe",
           "fid", "is", "kid", "precision", "recall", *GROUND_TRUTH, "samples_per_second",
           PROTOCOL)  # fmt: skip
KEY = ("model", "data", "n", "extractor", "noise_seed")
FIGURES = ("fid", "is", "kid", "precision", "recall", *GROUND_TRUTH)
FLOOR = "floor"  # run=floor, and the model column's prefix of its rows
INTEGERS = ("n", "noise_seed", "nfe")
FLOATS = (*FIGURES, "samples_per_second")
TEACHER_PREFIX = "teacher/"


@dataclass
class Subject:
    """What one evaluation samples (``sampler`` run on ``denoiser`` by :func:`generate`) and measures."""

    model: str
    method: str
    denoiser: torch.nn.Module
    sampler: object
    datamodule: object
    metrics: MetricSuite

    def key(self, cfg: DictConfig) -> dict:
        return {"model": self.model, "data": self.datamodule.name, "n": int(cfg.n),
                "extractor": self.metrics.extractor.name, "noise_seed": int(cfg.noise_seed)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# What to evaluate


def teacher_label(cfg: DictConfig) -> str:
    """The teacher's name in the model column: its config choice, or its folder for ``teacher=checkpoint``."""
    choice = hydra_choice("teacher")
    if choice in (None, "checkpoint") and "path" in cfg.teacher:
        return str(cfg.teacher.path)
    return choice or cfg.teacher._target_.rsplit(".", 1)[-1]


def teacher_subject(cfg: DictConfig) -> Subject:
    """The ``teacher`` with the ``sampler`` choice, measured by the data's metric suite."""
    if not cfg.get("metrics"):
        raise ConfigError(f"no metric suite for data={hydra_choice('data')}: choose one with metrics=")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.arrays("train")  # missing data or packages fail here, first
    teacher = hydra.utils.instantiate(cfg.teacher, datamodule=datamodule)
    sampler = hydra.utils.instantiate(cfg.sampler)
    metrics = hydra.utils.instantiate(cfg.metrics, n=cfg.n)
    name = hydra_choice("sampler") or type(sampler).__name__
    schedule = getattr(sampler.schedule, "func", sampler.schedule).__name__
    if schedule != "karras":  # EDM's schedule is the default and goes unnamed
        name = f"{name}+{schedule}"
    model = f"{TEACHER_PREFIX}{teacher_label(cfg)}/{name}-{sampler.steps}"
    return Subject(model, name, teacher, sampler, datamodule, metrics)


def display_path(path: Path) -> str:
    """``path`` relative to the working folder when inside it, else absolute."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def student_subject(cfg: DictConfig) -> Subject:
    """A training run's student with its run's data and metric suite (at this command's ``n``)."""
    run_dir, checkpoint = locate_run(cfg.run)
    run_cfg, method, datamodule = load_run(checkpoint)
    if not run_cfg.get("metrics"):
        raise ConfigError(f"{run_dir / 'config.yaml'} has no metrics config to evaluate with")
    metrics = hydra.utils.instantiate(run_cfg.metrics, n=cfg.n, cache_dir=cfg.paths.cache_dir)
    model = display_path(run_dir if checkpoint == run_dir / CHECKPOINT else checkpoint)
    return Subject(model, type(method).__name__, method, StudentSampler(), datamodule, metrics)


def floor_subject(cfg: DictConfig) -> Subject:
    """The data's own independent samples (``run=floor``), measured by the data's metric suite."""
    if not cfg.get("metrics"):
        raise ConfigError(f"no metric suite for data={hydra_choice('data')}: choose one with metrics=")
    datamodule = hydra.utils.instantiate(cfg.data)
    metrics = hydra.utils.instantiate(cfg.metrics, n=cfg.n)
    return Subject(f"{FLOOR}/{datamodule.name}", FLOOR, None, None, datamodule, metrics)


def build(cfg: DictConfig) -> Subject:
    """Check the request and instantiate what it evaluates; every bad-input check happens here."""
    require_at_least_one(cfg, ("n", "batch_size", "grid_size"))
    seeds = noise_seeds(cfg)
    if not seeds or len(set(seeds)) != len(seeds) or any(seed < 0 for seed in seeds):
        raise ConfigError(f"noise_seed={seeds} must be an integer >= 0 or a list of distinct ones")
    if str(cfg.run) == FLOOR:
        return floor_subject(cfg)
    return teacher_subject(cfg) if str(cfg.run) == "teacher" else student_subject(cfg)


def noise_seeds(cfg: DictConfig) -> list[int]:
    """``noise_seed`` as a list: one evaluation-noise set, or several."""
    value = cfg.noise_seed
    return [int(v) for v in value] if isinstance(value, (list, ListConfig)) else [int(value)]


# ---------------------------------------------------------------------------------------------------------
# Sampling and measuring


def draw(subject: Subject, n: int, cfg: DictConfig, progress: bool = False):
    """``n`` samples on the fixed evaluation noise (and labels when conditional): (x, labels, nfe). The
    floor's are the data's ``test`` samples keyed by the noise seed (NFE 0)."""
    if subject.method == FLOOR:
        x, labels = subject.datamodule.real_samples(n, "test", int(cfg.noise_seed))
        return x, labels, 0
    conditional = getattr(subject.denoiser, "num_classes", 0)
    probs = subject.datamodule.label_distribution if conditional else None
    return generate(subject.sampler, subject.denoiser, n, cfg.batch_size, cfg.noise_seed, probs, progress)


def measure(subject: Subject, cfg: DictConfig) -> tuple[dict, torch.Tensor]:
    """Sample ``n``, time it, compute the metrics: (the table row, the first ``grid_size`` samples)."""
    start = time.perf_counter()
    x, _, nfe = draw(subject, cfg.n, cfg, progress=True)
    rate = cfg.n / (time.perf_counter() - start)
    figures = {
        metric_kind(name): value for name, value in subject.metrics.evaluate(x, subject.datamodule).items()
    }
    row = {"time": datetime.now().isoformat(timespec="seconds"), "method": subject.method, "nfe": int(nfe),
           **subject.key(cfg), **{kind: figures.get(kind) for kind in FIGURES},
           "samples_per_second": rate, PROTOCOL: subject.metrics.protocol(subject.datamodule)}  # fmt: skip
    return {column: row[column] for column in COLUMNS}, x[: cfg.grid_size]


# ---------------------------------------------------------------------------------------------------------
# The results table: text cells kept as written, rewritten atomically under a lock


def read_table(path: Path) -> pd.DataFrame:
    """The results table with every cell as text; an empty one with the header when the file is missing.

    A table written before rows carried their protocol gets an empty protocol column: its rows are then
    never reused, only recomputed."""
    if not path.is_file():
        return pd.DataFrame(columns=list(COLUMNS), dtype=str)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in (PROTOCOL, *GROUND_TRUTH):
        if column not in table.columns:
            table[column] = ""
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise ConfigError(f"results={path} is not a results table (it lacks {missing}); choose another file")
    return table


def key_mask(table: pd.DataFrame, key: dict) -> pd.Series:
    mask = pd.Series(True, index=table.index)
    for column, value in key.items():
        mask &= table[column] == str(value)
    return mask


def typed_row(cells: dict[str, str]) -> dict:
    """A table row's text cells as numbers where they are numbers (empty figures as None)."""

    def convert(column: str, text: str):
        if column == PROTOCOL:
            return json.loads(text) if text else None
        if column in INTEGERS:
            return int(text)
        if column in FLOATS:
            return float(text) if text else None
        return text

    return {column: convert(column, cells[column]) for column in COLUMNS}


def find_row(table: pd.DataFrame, key: dict) -> dict | None:
    rows = table[key_mask(table, key)]
    return None if rows.empty else typed_row(rows.iloc[-1].to_dict())


def as_cell(value) -> str:
    if isinstance(value, dict):
        return protocol_text(value)
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


@contextmanager
def table_lock(path: Path):
    """An exclusive lock on ``.<name>.lock`` beside the table, so that parallel jobs keep every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def upsert_row(path: Path, row: dict) -> None:
    """Write ``row`` into the table at ``path`` (created with its header), replacing a row with its key."""
    with table_lock(path):
        table = read_table(path)
        kept = table[~key_mask(table, {column: row[column] for column in KEY})]
        new = pd.DataFrame([{column: as_cell(value) for column, value in row.items()}])
        merged = pd.concat([kept, new], ignore_index=True) if len(kept) else new
        with atomic_writer(path) as tmp:
            merged.to_csv(tmp, index=False)


# ---------------------------------------------------------------------------------------------------------
# The command


def evaluate(cfg: DictConfig) -> dict:
    """The row of each noise seed (written into ``results``); ``summary.json`` holds the row, or with a list
    of noise seeds ``{"rows": [...]}``."""
    subject = build(cfg)
    write_config(cfg)
    device = resolve_device(cfg.device)
    if subject.denoiser is not None:
        subject.denoiser.to(device)
    subject.metrics.to(device)
    seeds = noise_seeds(cfg)
    rows = []
    for seed in seeds:
        one = cfg.copy()
        with open_dict(one):
            one.noise_seed = seed
        rows.append(evaluate_one(subject, one, first=seed == seeds[0]))
    summary = (
        rows[0] if len(seeds) == 1 and not isinstance(cfg.noise_seed, (list, ListConfig)) else {"rows": rows}
    )
    write_summary(cfg, summary)
    return summary


def evaluate_one(subject: Subject, cfg: DictConfig, first: bool) -> dict:
    """One noise seed's row: measured, or reused from ``results``; the first seed's samples go to the grid."""
    results = Path(cfg.results)
    key = subject.key(cfg)
    row = None if cfg.force else find_row(read_table(results), key)
    if row is not None and row[PROTOCOL] != subject.metrics.protocol(subject.datamodule):
        print(f"results: the row of {key} in {results} was measured under another protocol; measuring again")
        row = None
    if row is None:
        row, grid = measure(subject, cfg)
        upsert_row(results, row)
        print(f"results: wrote the row of {subject.model} into {results}")
    else:
        grid = draw(subject, cfg.grid_size, cfg)[0] if first else None
        print(f"results: reused the row of {key} from {results} (force=true recomputes it)")
    if first:
        save_samples_figure(grid, output_dir(cfg) / "samples.png", title=f"{subject.model}, {row['nfe']} NFE")
    print_summary(row, title=f"evaluate: {subject.model}, noise seed {cfg.noise_seed}")
    return row


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@task
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


# ---------------------------------------------------------------------------------------------------------
# After a -m sweep: one table and the FID-versus-NFE figure


def summary_rows(summary: dict) -> list[dict]:
    """An evaluation's rows: its ``summary.json`` holds one, or one per noise seed (``{"rows": [...]}``)."""
    return summary["rows"] if "rows" in summary else [summary]


def gather_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """The rows (``summary.json``) of a sweep's jobs, one per key (the newest); teachers, then students."""
    rows = [
        row for p in Path(sweep_dir).glob("*/summary.json") for row in summary_rows(json.loads(p.read_text()))
    ]
    rows = [row | {PROTOCOL: protocol_text(row[PROTOCOL])} for row in rows if all(c in row for c in COLUMNS)]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table = table.sort_values("time").drop_duplicates(list(KEY), keep="last")
    table["student"] = ~table["model"].str.startswith(TEACHER_PREFIX)
    table = table.sort_values(["data", "extractor", "n", "student", "method", "nfe", "model"])
    return table.drop(columns="student").reset_index(drop=True)


def markdown_table(table: pd.DataFrame) -> str:
    """The rows without their time; the protocol records, too long for a column, listed below the table."""
    columns = [column for column in COLUMNS if column not in ("time", PROTOCOL)]

    def cell(value) -> str:
        return "" if pd.isna(value) else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    rows = table[columns].itertuples(index=False)
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    lines += ["", *(f"{PROTOCOL}: `{text}`" for text in table[PROTOCOL].unique())]
    return "\n".join(lines) + "\n"


def sampler_line(model: str) -> str:
    """``teacher/digits/heun-18`` → ``digits/heun``: one line per teacher and sampler (and schedule)."""
    return model.removeprefix(TEACHER_PREFIX).rsplit("-", 1)[0]


def plot_fid_vs_nfe(table: pd.DataFrame, path: str | Path) -> Path:
    """FID against NFE (log-log): a line per teacher sampler, a labelled star per student."""
    import matplotlib.pyplot as plt

    rows = table.dropna(subset=["fid"])
    is_teacher = rows["model"].str.startswith(TEACHER_PREFIX)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    teachers = rows[is_teacher]
    for line, points in teachers.groupby(teachers["model"].map(sampler_line)):
        points = points.sort_values("nfe")
        ax.plot(points["nfe"], points["fid"], marker="o", label=line)
    for index, student in enumerate(rows[~is_teacher].itertuples()):
        marker = "*^sDvP"[index % 6]
        ax.scatter(student.nfe, student.fid, marker=marker, s=90, zorder=3, label=f"{student.method} student")
    settings = sorted({f"{r.data}, {r.extractor}@{format_count(int(r.n))}" for r in rows.itertuples()})
    yscale = "log" if (rows["fid"] > 0).all() else "linear"  # FIDs span decades across step counts
    ax.set(xscale="log", yscale=yscale, xlabel="NFE", ylabel="FID")
    ax.set_title(f"FID vs NFE ({'; '.join(settings)})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write atomically as PNG, close."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_writer(path, binary=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def point_label(row) -> str:
    """A teacher as ``heun-18``, a student as ``<run folder> (<nfe> NFE)``, a sweep job ``<method> #<n>``."""
    if row.model.startswith(TEACHER_PREFIX):
        return row.model.rsplit("/", 1)[-1]
    name = Path(row.model).name
    return f"{f'{row.method} #{name}' if name.isdigit() else name} ({row.nfe} NFE)"


def plot_precision_recall(table: pd.DataFrame, path: str | Path) -> Path:
    """Precision (fidelity) against recall (diversity), a labelled point per model: the diversity argument of
    Direct Distillation (Li & Zhang §3.3, Fig. 7) that a student keeping the teacher's trajectory up to step
    k keeps its recall, where one-step students lose it."""
    import matplotlib.pyplot as plt

    rows = table.dropna(subset=["precision", "recall"])
    fig, ax = plt.subplots(figsize=(6, 4.6))
    for row in rows.itertuples():
        teacher = row.model.startswith(TEACHER_PREFIX)
        ax.scatter(row.recall, row.precision, marker="o" if teacher else "*", s=40 if teacher else 110,
                   color="tab:blue" if teacher else "tab:red", zorder=3)  # fmt: skip
        ax.annotate(point_label(row), (row.recall, row.precision), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)  # fmt: skip
    settings = sorted({f"{r.data}, {r.extractor}@{format_count(int(r.n))}" for r in rows.itertuples()})
    ax.set(xlabel="recall (diversity)", ylabel="precision (fidelity)")
    ax.set_title(f"precision vs recall ({'; '.join(settings)}); o teacher, * student", fontsize=9)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


REPORT_FILES = ("results.csv", "results.md", "noise_means.md", "fid_vs_nfe.png", "precision_recall.png")
SPREAD = ("fid", "precision", "recall", "samples_per_second")  # noise_means.md: mean ± interval of these
TRUTH_SPREAD = ("log_density_gap", "coverage_tv")  # and of these, with verdicts, where the data is exact


def verdicts_on(groups: dict, kind: str, among=None) -> dict:
    """Each group's verdict on the figure ``kind`` against the best group's (:func:`stats.ties_with_best`,
    ``among`` as there): higher is better for :data:`HIGHER_IS_BETTER` figures, lower for the others, and the
    log-density gap is compared by its distance from 0."""
    values = {key: (rows[kind].abs() if kind == "log_density_gap" else rows[kind]).astype(float)
              for key, rows in groups.items()}  # fmt: skip
    return stats.ties_with_best(values, lower_is_better=kind not in HIGHER_IS_BETTER, among=among)


def noise_means(table: pd.DataFrame) -> str:
    """A markdown table of each model's mean and 95% interval over the sweep's evaluation noise seeds, and
    whether its FID (and, on exact data, its log-density gap and coverage) is tied with the best model's
    (:mod:`distillbench.stats`: t interval, ddof = 1, Welch's test at α = 0.05).

    FID at a few thousand samples moves with the noise set more than the gaps between close models, so
    comparisons are made on means over several noise seeds (``-m noise_seed=0,2,3``).
    """
    truth = [kind for kind in TRUTH_SPREAD if kind in table and table[kind].notna().any()]
    groups = dict(list(table.groupby(["model", "data", "extractor", "n", "nfe", PROTOCOL], sort=False)))
    verdicts = {kind: verdicts_on(groups, kind) for kind in ("fid", *truth)}
    spread = [*SPREAD, *truth]
    judged = [f"{'FID' if kind == 'fid' else kind} against the best" for kind in verdicts]
    lines = ["| model | NFE | noise seeds | " + " | ".join([*spread, *judged]) + " |",
             "|" + "---|" * (3 + len(spread) + len(judged))]  # fmt: skip
    for key, rows in groups.items():
        model, _, _, _, nfe, _ = key
        seeds = ",".join(str(seed) for seed in sorted(rows["noise_seed"]))
        figures = [stats.interval(rows[c]).text(4) for c in spread] + [v[key] for v in verdicts.values()]
        lines.append(f"| {model} | {nfe} | {seeds} | " + " | ".join(figures) + " |")
    note = ("\nMean ± the half-width of its 95% t interval over the noise seeds (ddof = 1). 'tied': Welch's "
            "t-test does not separate the model's figure from the best one's at α = 0.05 (the log-density "
            "gap by its distance from 0); 'untested': fewer than two noise seeds.\n")  # fmt: skip
    return "\n".join(lines) + "\n" + note


def write_sweep_report(sweep_dir: str | Path) -> pd.DataFrame:
    """``REPORT_FILES`` in the sweep folder: the table, its means over noise seeds, FID against NFE,
    precision against recall."""
    sweep_dir = Path(sweep_dir)
    table = gather_sweep(sweep_dir)
    with atomic_writer(sweep_dir / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    atomic_write_text(sweep_dir / "results.md", markdown_table(table))
    atomic_write_text(sweep_dir / "noise_means.md", noise_means(table))
    plot_fid_vs_nfe(table, sweep_dir / "fid_vs_nfe.png")
    plot_precision_recall(table, sweep_dir / "precision_recall.png")
    return table


class SweepReport(Callback):
    """Hydra callback: when an evaluation sweep ends, write its table and FID-versus-NFE figure."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not any(sweep_dir.glob("*/summary.json")):
            return
        write_sweep_report(sweep_dir)
        print(f"sweep report: {', '.join(str(sweep_dir / name) for name in REPORT_FILES)}")


if __name__ == "__main__":
    main()
