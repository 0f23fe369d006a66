"""Matplotlib figures of evaluation curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per FID/IS-like metric of ``history`` rows against kimg."""
    keys = [k for k in (history[0] if history else {}) if k.split("_")[0] in ("fid", "is", "kid")]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False)
    kimg = [row["kimg"] for row in history]
    for ax, key in zip(axes[0], keys, strict=False):
        ax.plot(kimg, [row[key] for row in history], marker="o")
        ax.set_xlabel("kimg")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
