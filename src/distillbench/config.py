"""Hydra/OmegaConf plumbing shared by every entry point."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
CONFIG_DIR = str(PACKAGE_DIR.parents[1] / "conf")


def register_resolvers() -> None:
    """``${distillbench.assets:}`` → the shipped assets folder (teachers, metric classifiers)."""
    if not OmegaConf.has_resolver("distillbench.assets"):
        OmegaConf.register_new_resolver("distillbench.assets", lambda: str(ASSETS_DIR))


register_resolvers()
