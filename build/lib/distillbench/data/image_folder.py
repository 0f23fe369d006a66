"""Any folder of images (searched recursively), centre-cropped and resized, optionally labelled by folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distillbench.data.base import ConfigError, TensorDataModule
from distillbench.errors import DataNotFoundError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def find_images(root: Path) -> list[Path]:
    """Image files under ``root``, sorted; a clear error when the folder is missing or holds none."""
    if not root.is_dir():
        raise DataNotFoundError(f"data.root={root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise DataNotFoundError(f"no images ({', '.join(EXTENSIONS)}) found under data.root={root}")
    return files


def load_image(path: Path, resolution: int, mode: str) -> np.ndarray:
    """One image as uint8 H×W×C: converted to ``mode``, centre-cropped to a square, resized."""
    with Image.open(path) as image:
        image = image.convert(mode)
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, -1)


class ImageFolderDataModule(TensorDataModule):
    """Images under ``root`` as ``channels``×``resolution``×``resolution`` tensors in [-1, 1].

    Unlabelled by default; with ``labels_from_subfolders`` an image's class is the index of its top-level
    subfolder among the sorted subfolder names. The folder is one set: every split returns all images.
    """

    name = "image_folder"

    def __init__(
        self,
        root: str,
        resolution: int = 32,
        channels: int = 3,
        labels_from_subfolders: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, seed)
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        self.root = Path(root).expanduser()
        self.resolution = int(resolution)
        self.mode = "RGB" if channels == 3 else "L"
        self.files = find_images(self.root)
        self.classes = self.class_names() if labels_from_subfolders else []
        self.num_classes = len(self.classes)

    def class_names(self) -> list[str]:
        """Sorted names of the top-level subfolders; every image must sit inside one."""
        stray = [p.name for p in self.files if p.parent == self.root]
        if stray:
            raise ConfigError(
                f"data.labels_from_subfolders=true but {len(stray)} images (e.g. {stray[0]}) sit directly in "
                f"{self.root}; move them into class subfolders"
            )
        return sorted({p.relative_to(self.root).parts[0] for p in self.files})

    def load(self, split: str):
        pixels = np.stack([load_image(p, self.resolution, self.mode) for p in self.files])
        x = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0
        if not self.classes:
            return x, None
        index = {name: i for i, name in enumerate(self.classes)}
        return x, torch.tensor([index[p.relative_to(self.root).parts[0]] for p in self.files])
