"""Loggers from config (CSV always; W&B offline when no API key is set)."""

from __future__ import annotations

import netrc
import os

import hydra
from omegaconf import DictConfig


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def instantiate_loggers(logger_cfg: DictConfig | None) -> list:
    """Build every ``_target_`` logger in the group; W&B goes offline (and says how to sync) without a key."""
    loggers = []
    for name, conf in (logger_cfg or {}).items():
        if conf is None or "_target_" not in conf:
            continue
        kwargs = {}
        if name == "wandb":
            mode = os.environ.get("WANDB_MODE", "")
            if mode == "disabled":
                continue
            if mode != "online" and not wandb_has_credentials():
                kwargs["offline"] = True
                print(
                    f"W&B: no API key, logging offline under {conf.save_dir}/wandb; "
                    "upload later with `wandb sync <that folder>/offline-run-*`"
                )
        loggers.append(hydra.utils.instantiate(conf, **kwargs))
    return loggers
