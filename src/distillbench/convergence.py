"""``python -m distillbench.convergence suite=<name>``: where each method of a finished leaderboard suite
stops improving, read from its training cells' curves (docs/evaluation.md, "Convergence").

A suite made for it (``conf/suite/gmm_digits_convergence.yaml``) trains well past the leaderboard's budget
with many evaluations along the way; ``python -m distillbench.leaderboard suite=<name>`` runs its cells. Here,
per method and per figure of :data:`CURVE_FIGURES` its metric suite measured (the first noise set; the
repeats are the training seeds, whose evaluations fall at the same kimg: one budget, the same steps):

- the curve: the mean and the 95% t interval over seeds at every evaluation;
- its best evaluation (the best mean; the log-density gap by its distance from 0) and the first evaluation
  Welch's test does not separate from it (α = 0.05): where the method stops improving;
- its end against its best: ``best`` or ``tied`` when the run ends at its best, ``worse`` when it does not;
  a run whose best evaluation is its last has not stopped improving;
- its best FID over each teacher sampler's on the same noise set.

The final students against the teacher's samplers, over seeds × noise sets, are the suite's own
``leaderboard.md``. Outputs in ``report_dir``: ``convergence.md``, ``convergence.csv`` (each evaluation's mean
and interval), ``curves.csv`` (every seed's curve) and ``convergence.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from omegaconf import DictConfig

from distillbench import leaderboard as lb
from distillbench import run_folder, stats
from distillbench.config import CONFIG_DIR
from distillbench.errors import ConfigError
from distillbench.evaluate import FLOOR, save_figure, verdicts_on
from distillbench.methods.accounting import unit_of_config
from distillbench.utils.command import cli, task
from distillbench.utils.io import atomic_write_text, atomic_writer

#: the figures followed along the curves: the leaderboard's verdict figures and recall, which shows a
#: mode-seeking student
CURVE_FIGURES = ("fid", "log_density_gap", "recall", "coverage_tv")


def measured(table: pd.DataFrame) -> list[str]:
    """The followed figures the curves hold (the ground-truth ones only with an exact law)."""
    return [kind for kind in CURVE_FIGURES if kind in table and table[kind].notna().any()]


def followed(points: pd.DataFrame) -> list[str]:
    """The followed figures :func:`by_point` summarised."""
    return [kind for kind in CURVE_FIGURES if f"{kind}_mean" in points]


def by_point(curves: pd.DataFrame) -> pd.DataFrame:
    """Per method and evaluation: kimg and spent budget (means over seeds), each figure's mean and 95% t
    half-width over the seeds, and its verdict against the method's best evaluation."""
    rows = []
    for method, cells in curves.groupby("method", sort=False):
        points = dict(list(cells.groupby("point")))
        verdicts = {kind: verdicts_on(points, kind) for kind in measured(cells)}
        for point, group in points.items():
            row = {"method": method, "point": point, "kimg": group["kimg"].mean(), "tfe": group["tfe"].mean(),
                   "seeds": len(group)}  # fmt: skip
            for kind in verdicts:
                spread = stats.interval(group[kind])
                row |= {f"{kind}_mean": spread.mean, f"{kind}_ci": spread.half_width,
                        f"{kind}_verdict": verdicts[kind][point]}  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)


def settle(points: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Per method, for one figure: its best evaluation, the first one tied with it (where the method stops
    improving), and its end's verdict against the best."""
    rows = []
    for method, group in points.groupby("method", sort=False):
        verdict = group[f"{kind}_verdict"]
        best = group[verdict == "best"].iloc[0]
        reached = group[verdict.isin(["best", "tied"])].iloc[0]
        end = group.iloc[-1]
        rows.append({"method": method, "best_kimg": best.kimg, "best_mean": best[f"{kind}_mean"],
                     "best_ci": best[f"{kind}_ci"], "reached_kimg": reached.kimg, "end_kimg": end.kimg,
                     "end_mean": end[f"{kind}_mean"], "end_ci": end[f"{kind}_ci"],
                     "end_verdict": end[f"{kind}_verdict"],
                     "improving_at_end": best.point == end.point})  # fmt: skip
    return pd.DataFrame(rows)


def references(table: pd.DataFrame, noise_seed: int) -> pd.DataFrame:
    """The teacher samplers' and the floor's rows on the curves' noise set (the leaderboard's table)."""
    rows = table[(table["tfe"] == 0) & (table["noise_seed"] == noise_seed)]
    labels = [m if m == FLOOR else f"{m}-{nfe}" for m, nfe in zip(rows.method, rows.nfe, strict=True)]
    return rows.assign(label=labels)


def markdown(
    suite: DictConfig, points: pd.DataFrame, refs: pd.DataFrame, seconds: pd.Series, unit: str
) -> str:
    teachers = refs[refs["method"] != FLOOR]
    lines = [f"# Convergence: {suite.name}", "",
             f"- command: `python -m distillbench.leaderboard suite={suite.name}`, then "
             f"`python -m distillbench.convergence suite={suite.name}`",
             f"- budget per method: {suite.budget_tfe:.4g} {unit}; {points.groupby('method').size().max()} "
             f"evaluations along each run (its start included) on noise set {suite.eval.noise_seed}, "
             f"{suite.eval.n} samples each; seeds {list(suite.seeds)}", ""]  # fmt: skip
    for kind in followed(points):
        heads = ["method", "best", "at kimg", "first tied with the best at kimg", "end", "end kimg",
                 "end against the best", "stopped improving"]  # fmt: skip
        if kind == "fid":
            heads += [f"best / {label}" for label in teachers["label"]]
        lines += [f"## {lb.HEADINGS[kind]}", "", "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
        for r in settle(points, kind).itertuples():
            cells = [r.method, lb.plus_minus(r.best_mean, r.best_ci), f"{r.best_kimg:.3g}",
                     f"{r.reached_kimg:.3g}", lb.plus_minus(r.end_mean, r.end_ci), f"{r.end_kimg:.3g}",
                     r.end_verdict, "no: best at the end" if r.improving_at_end else "yes"]  # fmt: skip
            if kind == "fid":
                cells += [f"{r.best_mean / fid:.3g}" for fid in teachers["fid"]]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        reference = ", ".join(f"{r.label} {r[kind]:.3g}" for _, r in refs.iterrows())
        lines += ["", f"On the same noise set: {reference}.", ""]
    lines += [
        "Training wall time per cell (s, mean over seeds): "
        + ", ".join(f"{m} {s:.0f}" for m, s in seconds.items())
        + ".",
        "",
        "Each figure is the mean ± the half-width of its 95% t interval (ddof = 1) over the training "
        "seeds at one evaluation (the first noise set). 'first tied with the best': the first "
        "evaluation Welch's t-test does not separate from the best one at α = 0.05 (the log-density "
        "gap by its distance from 0): where the curve stops improving. 'end against the best': the "
        "last evaluation's verdict, 'tied' when the run ends within noise of its best. 'stopped "
        "improving': 'no' when the best evaluation is the last one (a longer run may do better).",
    ]
    return "\n".join(lines) + "\n"


def plot(points: pd.DataFrame, refs: pd.DataFrame, path: Path, title: str) -> Path:
    """Each followed figure against kimg: per method the mean over seeds with its 95% t band; each teacher
    sampler's value on the same noise set as a dashed line, the floor's as a black one. With the exact
    log-density and recall, a last panel puts one against the other: the trade a student makes between
    diversity and staying on the law's high-density set, evaluation by evaluation."""
    kinds = followed(points)
    frontier = {"recall", "log_density_gap"} <= set(kinds)
    panels = len(kinds) + frontier
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.4 * columns, 4.4 * rows), squeeze=False)
    for axis, kind in zip(axes.flat, kinds, strict=False):
        for method, group in points.groupby("method", sort=False):
            mean, half = group[f"{kind}_mean"], np.nan_to_num(group[f"{kind}_ci"])
            (line,) = axis.plot(group["kimg"], mean, marker="o", ms=3, label=method)
            axis.fill_between(group["kimg"], mean - half, mean + half, color=line.get_color(), alpha=0.2)
        for _, r in refs.iterrows():
            floor = r.method == FLOOR
            axis.axhline(r[kind], color="k" if floor else "gray", lw=1, ls="-" if floor else "--",
                         label=r.label)  # fmt: skip
        axis.set(xlabel="generator kimg", ylabel=lb.HEADINGS[kind], title=lb.HEADINGS[kind])
    if frontier:
        axis = axes.flat[len(kinds)]
        for method, group in points.groupby("method", sort=False):
            axis.plot(group["recall_mean"], group["log_density_gap_mean"], marker="o", ms=3, label=method)
        for _, r in refs.iterrows():
            axis.plot(r.recall, r.log_density_gap, marker="*" if r.method == FLOOR else "s", ms=9,
                      linestyle="none", color="k" if r.method == FLOOR else None, label=r.label)  # fmt: skip
        axis.set(xlabel="recall", ylabel=lb.HEADINGS["log_density_gap"],
                 title="log-density gap against recall, along each run")  # fmt: skip
    for axis, kind in zip(axes.flat, [*kinds, *["log_density_gap"] * frontier], strict=False):
        if kind == "fid":
            axis.set_yscale("log")
        elif kind == "log_density_gap":
            axis.set_yscale("symlog", linthresh=0.1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in axes.flat[panels:]:
        axis.set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)


def check_finished(suite: DictConfig, out_dir: Path) -> None:
    missing = [str(folder) for _, _, folder in lb.training_cells(suite, out_dir)
               if not (folder / run_folder.SUMMARY).is_file()]  # fmt: skip
    if missing:
        raise ConfigError(
            f"{len(missing)} training cells of suite {suite.name} are not finished (first: {missing[0]}): "
            f"run `python -m distillbench.leaderboard suite={suite.name}` (it resumes) before reading its "
            "curves"
        )


def convergence(cfg: DictConfig) -> pd.DataFrame:
    suite, out_dir, report_dir = cfg.suite, Path(cfg.out_dir), Path(cfg.report_dir)
    lb.check_suite(suite)
    check_finished(suite, out_dir)
    table = lb.collect(suite, out_dir)
    curves = lb.curve_table(lb.curves(suite, out_dir), suite.seeds)
    points = by_point(curves)
    refs = references(table, suite.eval.noise_seed)
    seconds = (
        table.dropna(subset="seed")
        .drop_duplicates(["method", "seed"])
        .groupby("method", sort=False)["train_seconds"]
        .mean()
    )
    first = lb.training_cell(out_dir, next(iter(suite.methods)), suite.seeds[0])
    unit = unit_of_config(lb.cell_config(first).teacher).name
    report_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in (("curves.csv", curves), ("convergence.csv", points)):
        with atomic_writer(report_dir / name) as tmp:
            frame.to_csv(tmp, index=False)
    atomic_write_text(report_dir / "convergence.md", markdown(suite, points, refs, seconds, unit))
    title = f"{suite.name}: {suite.budget_tfe:.3g} {unit} per method"
    plot(points, refs, report_dir / "convergence.png", title)
    print((report_dir / "convergence.md").read_text())
    print(f"convergence: {report_dir}/convergence.md, convergence.csv, curves.csv, convergence.png")
    return points


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="convergence")
@task
def main(cfg: DictConfig) -> None:
    convergence(cfg)


if __name__ == "__main__":
    main()
