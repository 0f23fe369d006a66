"""Sample grids and scatter plots as PNG (no torchvision needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_image_range(x: torch.Tensor) -> torch.Tensor:
    """Clip images (N×C×H×W) to [-1, 1], as EDM does before saving or measuring; other samples pass."""
    return x.clamp(-1, 1) if x.ndim == 4 else x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images N×C×H×W → uint8 N×H×W×C."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile N images into one picture with ``nrow`` per row (default √N), upscaled by ``scale``."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, nrow)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = img
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    return (
        picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
        if scale > 1
        else picture
    )


def save_samples_figure(x: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """A PNG of samples: an image grid, or a scatter plot for 2-D points."""
    path = Path(path)
    if x.ndim == 4:
        scale = max(1, 256 // (int(math.ceil(math.sqrt(len(x)))) * x.shape[-1]))
        image_grid(x, scale=scale).save(path)
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    pts = x.detach().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
