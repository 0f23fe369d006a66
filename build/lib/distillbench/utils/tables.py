"""Small rich tables for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict, title: str = "summary") -> None:
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


def print_comparison(summary: dict) -> None:
    """Teacher (its sampler's NFE) versus the one-step student: NFE, metrics and samples per second."""
    models = {"student": summary["student"]} | (
        {"teacher": summary["teacher"]} if "teacher" in summary else {}
    )
    keys = ["nfe"] + sorted({k for fig in models.values() for k in fig} - {"nfe", "samples_per_second"})
    table = Table(title=f"{summary['method']} on {summary['data']} after {summary['kimg']:.1f} kimg")
    table.add_column("figure")
    for name in models:
        table.add_column(name, justify="right")
    for key in [*keys, "samples_per_second"]:
        cells = [models[m].get(key) for m in models]
        table.add_row(
            key, *("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells)
        )
    Console().print(table)
