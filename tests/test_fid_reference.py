"""The FID Inception's input and features against an independent statement of the reference detector's
(EDM's ``fid.py`` with ``inception-2015-12-05``, ``tests/inception_reference.py``): the resized input always,
the features when the weights are installed (``make install-inception``; skipped otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillbench.metrics import InceptionFeatures
from distillbench.metrics.extractors import INCEPTION_PREPROCESSING, to_inception_input
from tests.inception_reference import inception_input, tf1_resize_bilinear, to_levels

FIXTURE = Path(__file__).parent / "fixtures" / "inception_reference.npz"
SETS = ("digits", "mnist", "noise")


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """The fixture's arrays (tests/fixtures/make_inception_reference.py made them)."""
    with np.load(FIXTURE) as z:
        return {key: z[key] for key in z.files}


def as_samples(levels: np.ndarray) -> torch.Tensor:
    """uint8 levels as a model's samples in [-1, 1]."""
    return torch.from_numpy(levels.astype(np.float32)) / 127.5 - 1


def test_the_reference_resize_follows_tf1_resize_bilinear():
    """Hand-worked cases of source = i·in/out: up 2 → 4 (the last output clamps to the last pixel), down
    3 → 2, and rows and columns alike."""
    row = np.array([0.0, 10.0]).reshape(1, 1, 1, 2)
    np.testing.assert_array_equal(tf1_resize_bilinear(row, 4)[0, 0], np.tile([0.0, 5.0, 10.0, 10.0], (4, 1)))
    np.testing.assert_array_equal(tf1_resize_bilinear(np.array([0.0, 3.0, 6.0]).reshape(1, 1, 1, 3), 2)[0, 0],
                                  [[0.0, 4.5], [0.0, 4.5]])  # fmt: skip
    square = np.arange(9.0).reshape(1, 1, 3, 3)
    np.testing.assert_array_equal(tf1_resize_bilinear(square, 2)[0, 0], [[0.0, 1.5], [4.5, 6.0]])


def test_inception_input_equals_the_reference_detector_s_on_fixed_images(reference):
    for name in SETS:
        levels = reference[f"images_{name}"]
        x = as_samples(levels)
        assert np.array_equal(to_levels(x.numpy()), levels), "the samples quantise back to the same levels"
        ours = to_inception_input(x).numpy()
        assert ours.shape == (len(levels), 3, 299, 299)
        np.testing.assert_allclose(ours, inception_input(levels), rtol=0, atol=1e-4, err_msg=name)
        # torch's half-pixel bilinear (what the resize must not be) misses by far more than the tolerance
        grey = torch.from_numpy(levels.astype(np.float32)).expand(-1, 3, -1, -1)
        half_pixel = (F.interpolate(grey, size=(299, 299), mode="bilinear", align_corners=False) - 128) / 128
        assert np.abs(half_pixel.numpy() - inception_input(levels)).max() > 0.1, name


@pytest.mark.parametrize(("channels", "side"), [(3, 28), (1, 64), (3, 299), (3, 512)])
def test_inception_input_of_other_sizes_and_the_identity_at_299(channels, side):
    levels = np.random.default_rng(side).integers(0, 256, size=(2, channels, side, side), dtype=np.uint8)
    ours = to_inception_input(as_samples(levels)).numpy()
    np.testing.assert_allclose(ours, inception_input(levels), rtol=0, atol=1e-4)
    if side == 299:
        np.testing.assert_allclose(ours, (levels.astype(np.float32) - 128) / 128, rtol=0, atol=1e-4)


def test_inception_input_refuses_other_channel_counts():
    with pytest.raises(ValueError, match="1- or 3-channel images, not 2 channels"):
        to_inception_input(torch.zeros(1, 2, 8, 8))


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    try:
        return InceptionFeatures()
    except (ModuleNotFoundError, FileNotFoundError) as missing:
        pytest.skip(f"the FID Inception weights are not installed ({missing})")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).norm(dim=1) / b.double().norm(dim=1)


@torch.no_grad()
def test_features_equal_the_reference_path_on_fixed_images(inception, reference):
    for name in SETS:
        levels = reference[f"images_{name}"]
        ours = inception(as_samples(levels))
        theirs = inception.net(torch.from_numpy(inception_input(levels)))
        assert relative_error(ours, theirs).max() < 1e-4, name


@torch.no_grad()
def test_features_equal_the_stored_reference_features(inception, reference):
    digest = str(reference["weights_sha256"])
    assert inception.weights_digest() == f"sha256:{digest[:16]}", (
        f"the fixture was made with default_1.pt of sha256 {digest}; another file is installed"
    )
    assert inception.preprocessing == INCEPTION_PREPROCESSING == "uint8,rgb,tf1-bilinear-299,(x-128)/128"
    for name in SETS:
        ours = inception(as_samples(reference[f"images_{name}"]))
        stored = torch.from_numpy(reference[f"features_{name}"])
        assert ours.shape == stored.shape == (2, 2048)
        assert relative_error(ours, stored).max() < 1e-4, name
