"""``python -m distillbench.nets [preset ...]``: the parameter count of every network preset in ``conf/net``.

The networks are built on the meta device, so even the paper's 57.7M NAFNet costs no memory or time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from distillbench.config import CONFIG_DIR

PRESETS = Path(CONFIG_DIR) / "net"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def load_preset(name: str):
    """``conf/net/<name>.yaml`` with the presets it extends (its ``defaults``) merged under it."""
    cfg = OmegaConf.load(PRESETS / f"{name}.yaml")
    bases = [load_preset(base) for base in cfg.pop("defaults", []) if base != "_self_"]
    return OmegaConf.merge(*bases, cfg)


def parameter_count(preset: str) -> int:
    """Parameters of ``conf/net/<preset>.yaml``, built without allocating its weights."""
    with torch.device("meta"):
        net = hydra.utils.instantiate(load_preset(preset))
    return sum(p.numel() for p in net.parameters())


def main(argv: list[str]) -> int:
    names = argv or preset_names()
    unknown = sorted(set(names) - set(preset_names()))
    if unknown:
        print(f"error: no preset {', '.join(unknown)} in {PRESETS}; choose from {', '.join(preset_names())}",
              file=sys.stderr)  # fmt: skip
        return 2
    table = Table(title="network presets (conf/net)")
    for column in ("preset", "network", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name in names:
        target = load_preset(name)._target_.rsplit(".", 1)[-1]
        table.add_row(name, target, f"{parameter_count(name):,}")
    Console(width=100).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
