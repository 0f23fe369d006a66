"""Shared fixtures: quiet W&B, deterministic CPU torch, Hydra composition of the project's configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# One thread: on a busy 2-core machine torch's thread pool thrashes (tiny ops get ~100× slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
