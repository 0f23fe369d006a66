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
