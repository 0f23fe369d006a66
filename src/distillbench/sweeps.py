"""Sweeps: gather the evaluation curves of a Hydra ``-m`` sweep into one table and one figure.

Each training job writes ``eval.csv`` (one row per evaluation: kimg, gen_step and the metrics) into its own
folder; :class:`SweepSummary`, a Hydra callback, runs when the sweep ends and writes into the sweep folder
``curves.csv`` (every job's rows, with the swept settings as columns) and ``curves.png`` (FID and IS against
kimg: one panel per metric and ``panel`` value, one line per ``hue`` value, seeds as mean and 95% t band).
The same functions load and draw any sweep folder from a notebook.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from matplotlib import pyplot as plt

from distillbench import run_folder, stats
from distillbench.metrics.suite import PROTOCOL

EVAL_FILE = run_folder.EVALUATIONS
AXES = ("kimg", "gen_step", "tfe")  # an evaluation row's x-axes: generator kimg and steps, compute spent
SEED_KEYS = ("seed",)
HIGHER_IS_BETTER = {"is", "precision", "recall"}


def job_overrides(job_dir: Path) -> dict[str, str]:
    """The ``key=value`` command-line overrides Hydra recorded for a job (``+``/``~`` prefixes dropped)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.is_file() else []
    pairs = (item.split("=", 1) for item in items or [] if "=" in item)
    return {key.lstrip("+~"): value for key, value in pairs}


def load_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """Every job's ``eval.csv`` rows, with ``job`` and one column per overridden key (``method``, ...).

    The rows must share one protocol record (the jobs measured alike), else the figures do not compare."""
    frames = []
    for csv in sorted(Path(sweep_dir).glob(f"*/{EVAL_FILE}")):
        frame = pd.read_csv(csv)
        for key, value in reversed(job_overrides(csv.parent).items()):
            frame.insert(0, key, value)
        frame.insert(0, "job", csv.parent.name)
        frames.append(frame)
    if not frames:
        raise FileNotFoundError(f"no */{EVAL_FILE} under {sweep_dir}: is it the folder of a training sweep?")
    frame = pd.concat(frames, ignore_index=True)
    check_one_protocol(frame, sweep_dir)
    return frame


def check_one_protocol(frame: pd.DataFrame, where) -> None:
    """Refuse a table whose figures were measured under more than one protocol record."""
    if PROTOCOL in frame.columns and frame[PROTOCOL].nunique(dropna=False) > 1:
        jobs = frame.groupby(PROTOCOL, dropna=False)["job"].unique()
        listing = "; ".join(f"jobs {sorted(set(j))}: {p}" for p, j in jobs.items())
        raise ValueError(
            f"the jobs under {where} were measured under different protocols ({listing}); their figures do "
            "not compare: summarise the jobs of one protocol (move the others out), or measure them again"
        )


def latest_sweep(root: str | Path) -> Path:
    """The newest sweep folder (Hydra names them by time) under ``root`` that holds a ``curves.csv``."""
    sweeps = sorted(p.parent for p in Path(root).glob("*/curves.csv"))
    if not sweeps:
        raise FileNotFoundError(
            f"no finished sweep under {root}: run the sweep first (see the notebook's top)"
        )
    return sweeps[-1]


def overrides_from_name(name: str) -> dict[str, str]:
    """Run name ``method=sid,method.lr=0.0001`` → ``{'method': 'sid', 'method.lr': '0.0001'}``."""
    return dict(item.split("=", 1) for item in (name or "").split(",") if "=" in item)


def load_wandb_group(group: str, project: str = "distillbench", api=None) -> pd.DataFrame:
    """The table of :func:`load_sweep`, read from the W&B runs of one group (needs an API key online)."""
    if api is None:
        import wandb

        api = wandb.Api()
    frames = []
    for run in api.runs(project, filters={"group": group}):
        history = run.history(samples=100_000, pandas=True)
        metrics = [c for c in history.columns if c.startswith("eval/") and c != "eval/samples"]
        frame = history.dropna(subset=metrics, how="all")[["train/kimg", "train/gen_step", *metrics]]
        frame = frame.rename(columns=lambda c: c.split("/", 1)[1])
        for key, value in reversed(overrides_from_name(run.name).items()):
            frame.insert(0, key, value)
        frame.insert(0, "job", run.name)
        frames.append(frame)
    if not frames:
        raise LookupError(f"no W&B runs in group {group!r} of project {project!r}")
    return pd.concat(frames, ignore_index=True)


def summary_table(frame: pd.DataFrame, metric: str = "fid", by=None) -> pd.DataFrame:
    """Final and best value of ``metric`` per job, then over the jobs sharing ``by`` (seeds): mean, std
    (ddof = 1), count and ``ci``, the half-width of the 95% t interval (:mod:`distillbench.stats`)."""
    column = metric_column(frame, metric)
    by = list(by) if by is not None else [k for k in swept_keys(frame) if k not in SEED_KEYS]
    ordered = frame.sort_values("kimg")
    best = "max" if metric in HIGHER_IS_BETTER else "min"
    per_job = ordered.groupby("job").agg(final=(column, "last"), best=(column, best))
    per_job = per_job.join(ordered.groupby("job")[by].first())

    def ci(values) -> float:
        return stats.interval(values).half_width

    return per_job.groupby(by)[["final", "best"]].agg(["mean", "std", "count", ci])


def override_columns(frame: pd.DataFrame) -> list[str]:
    """The settings columns: everything but the job, the x-axes, the metrics (named ``kind_ext@n``) and
    their protocol."""
    return [c for c in frame.columns if c not in ("job", *AXES, PROTOCOL) and "@" not in c]


def swept_keys(frame: pd.DataFrame) -> list[str]:
    """Override columns whose value differs between jobs, in command-line order."""
    return [c for c in override_columns(frame) if frame.groupby("job")[c].first().nunique() > 1]


#: kinds whose names hold underscores (the ground-truth metrics, named without an extractor)
COMPOUND_KINDS = ("log_density_gap", "coverage_tv", "clamped_fraction")


def metric_kind(name: str) -> str:
    """A metric's kind from its full name: ``fid_clf@1k`` → ``fid``, ``log_density_gap@1k`` →
    ``log_density_gap``."""
    base = name.split("@")[0]
    return next((kind for kind in COMPOUND_KINDS if base == kind), base.split("_")[0])


def metric_column(frame: pd.DataFrame, kind: str) -> str | None:
    """The column of a metric kind: ``fid`` → ``fid_clf@1k`` (None when the sweep did not measure it)."""
    matches = [c for c in frame.columns if metric_kind(c) == kind and "@" in c]
    return matches[0] if matches else None


def choose_axes(frame, hue, panel) -> tuple[str | None, str | None]:
    """Default hue and panel: the first and second swept keys that are not seeds."""
    keys = [k for k in swept_keys(frame) if k not in SEED_KEYS]
    hue = hue or (keys[0] if keys else None)
    panel = panel or next((k for k in keys if k != hue), None)
    return hue, panel


def plot_sweep(
    frame: pd.DataFrame,
    path: str | Path | None = None,
    metrics=("fid", "is"),
    hue: str | None = None,
    panel: str | None = None,
    title: str = "",
    references: dict[str, float] | None = None,
):
    """Metrics against kimg: a row of panels (each ``panel`` value × each metric), a line per ``hue`` value.

    Runs that share hue and panel (seeds) are drawn as their mean with its 95% t band (:mod:`stats`).
    ``references`` maps a metric column to a horizontal line (the teacher's value). Returns the figure
    (saved when ``path``).
    """
    hue, panel = choose_axes(frame, hue, panel)
    columns = [c for c in (metric_column(frame, m) for m in metrics) if c]
    panel_values = frame[panel].unique() if panel else [None]  # in sweep order
    colors = {v: f"C{i}" for i, v in enumerate(frame[hue].unique() if hue else ["all"])}
    fig, axes = plt.subplots(1, len(panel_values) * len(columns), squeeze=False,
                             figsize=(3.6 * len(panel_values) * len(columns), 3.2))  # fmt: skip
    axes = iter(axes[0])
    for value in panel_values:
        part = frame if panel is None else frame[frame[panel] == value]
        for column in columns:
            ax = next(axes)
            _draw_lines(ax, part, column, hue, colors)
            if references and column in references:
                ax.axhline(references[column], color="k", ls="--", lw=1, label="teacher")
            where = "" if panel is None else f"{panel}={value}: "
            ax.set(xlabel="kimg", ylabel=column, title=f"{where}{column.split('_')[0].upper()}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, title=hue, title_fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _draw_lines(ax, frame: pd.DataFrame, column: str, hue: str | None, colors: dict) -> None:
    groups = frame.groupby(hue, sort=False) if hue else [("all", frame)]
    for name, rows in groups:
        by_kimg = rows.groupby(rows["kimg"].round(3))[column]
        mean = by_kimg.mean()
        ax.plot(mean.index, mean.values, marker="o", ms=3, label=str(name), color=colors[name])
        if rows["job"].nunique() > 1:  # the 95% t interval over the seeds at each point
            half = by_kimg.agg(lambda values: stats.interval(values).half_width).fillna(0.0)
            ax.fill_between(mean.index, mean - half, mean + half, color=colors[name], alpha=0.2)


def teacher_references(sweep_dir: Path) -> dict[str, float]:
    """The teacher's metrics from any finished job's ``summary.json`` (the same in every job)."""
    for path in sorted(sweep_dir.glob("*/summary.json")):
        teacher = json.loads(path.read_text()).get("teacher")
        if teacher:
            return {k: v for k, v in teacher.items() if isinstance(v, float)}
    return {}


def summarise_sweep(sweep_dir, metrics=("fid", "is"), hue=None, panel=None, title: str = "") -> pd.DataFrame:
    """Write ``curves.csv`` and ``curves.png`` into the sweep folder; return the combined table."""
    sweep_dir = Path(sweep_dir)
    frame = load_sweep(sweep_dir)
    frame.to_csv(sweep_dir / "curves.csv", index=False)
    fig = plot_sweep(
        frame, sweep_dir / "curves.png", metrics, hue, panel, title, teacher_references(sweep_dir)
    )
    plt.close(fig)
    return frame


class SweepSummary(Callback):
    """Hydra callback: when a training sweep ends, combine its jobs' curves (see :func:`summarise_sweep`)."""

    def __init__(self, metrics=("fid", "is"), hue: str | None = None, panel: str | None = None, title=""):
        self.metrics, self.hue, self.panel, self.title = list(metrics), hue, panel, title

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not any(sweep_dir.glob(f"*/{EVAL_FILE}")):
            return
        summarise_sweep(sweep_dir, self.metrics, self.hue, self.panel, self.title)
        print(f"sweep summary: {sweep_dir / 'curves.csv'}, {sweep_dir / 'curves.png'}")
