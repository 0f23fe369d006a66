"""Train and save the small per-dataset classifier whose features and logits serve FID/IS/KID."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distillbench.metrics.extractors import kwargs_path
from distillbench.nets.classifier import SmallClassifier
from distillbench.utils.io import atomic_write_text, atomic_writer


def random_shift(x: torch.Tensor, rng: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with background (−1)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=rng)
    rows = (dy + torch.arange(h))[:, None, :, None]
    cols = (dx + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on (x, labels)."""
    model.eval()
    batches = zip(x.split(batch_size), labels.split(batch_size), strict=True)
    correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in batches)
    return correct / len(x)


def train_classifier(
    datamodule,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    feature_dim: int = 128,
) -> tuple[SmallClassifier, float]:
    """Adam, cosine learning-rate decay, ±1-pixel shifts; returns the frozen model and its test accuracy."""
    x, labels = datamodule.arrays("train")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(x.shape[1], datamodule.num_classes, width, feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(model(random_shift(x[idx], g)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    test_acc = accuracy(model, *datamodule.arrays("test"))
    return model.requires_grad_(False).eval(), test_acc


def save_classifier(model: SmallClassifier, path: str | Path) -> None:
    """Weights to ``path`` (.safetensors) and constructor kwargs to the sibling ``.json``, both atomically."""
    first_conv = model.body[0]
    kwargs = {
        "in_channels": first_conv.in_channels,
        "num_classes": model.head.out_features,
        "width": first_conv.out_channels,
        "feature_dim": model.feature_dim,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_writer(path, binary=True) as tmp:
        save_file(state, tmp)
    atomic_write_text(kwargs_path(path), json.dumps(kwargs, indent=2) + "\n")
