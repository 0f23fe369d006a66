"""``python -m distillbench.fit_gmm data=digits components_per_class=4 rank=16``: fit the analytic teacher's
class-conditional low-rank Gaussian mixture to a labelled data set (docs/gmm.md).

Per class, scikit-learn's k-means (seeded) splits the images into ``components_per_class`` clusters; each
cluster's maximum-likelihood covariance is eigen-decomposed, s² is the mean of its eigenvalues beyond the top
``rank`` (the probabilistic-PCA maximum-likelihood noise, Tipping & Bishop 1999), floored at ``min_variance``,
and λ = top eigenvalues − s². The weight of a cluster is its share of the data, so the class prior is the
data's label frequencies. ``ship=true`` also writes the mixture into the package's assets
(``teacher=gmm_<data>``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import numpy as np
import sklearn
import torch
from omegaconf import DictConfig
from sklearn.cluster import KMeans

from distillbench.config import CONFIG_DIR
from distillbench.errors import ConfigError
from distillbench.teachers.gmm import LowRankGMM
from distillbench.utils.command import cli, output_dir, task, write_config, write_summary


def cluster_gaussian(points: np.ndarray, rank: int, min_variance: float):
    """(μ, U, λ, s²) of one cluster: PPCA of its maximum-likelihood covariance, s² floored."""
    mean = points.mean(0)
    centred = points - mean
    eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / len(points))  # ascending
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    s2 = max(float(eigenvalues[rank:].mean()), min_variance)
    bases = vectors[:, :rank] * np.sign(vectors[np.abs(vectors[:, :rank]).argmax(0), range(rank)])
    return mean, bases, np.clip(eigenvalues[:rank] - s2, 0.0, None), s2


def fit_mixture(x: torch.Tensor, labels: torch.Tensor, num_classes: int, components_per_class: int = 4,
                rank: int = 16, min_variance: float = 1e-3, seed: int = 0) -> LowRankGMM:  # fmt: skip
    """The class-conditional mixture of ``components_per_class`` low-rank Gaussians per class."""
    points = x.reshape(len(x), -1).double().numpy()
    d = points.shape[1]
    if not 0 < rank < d:
        raise ConfigError(f"rank={rank} must be between 1 and the data's dimension {d} − 1")
    if components_per_class < 1:
        raise ConfigError(f"components_per_class={components_per_class} must be >= 1")
    if not min_variance > 0:
        raise ConfigError(f"min_variance={min_variance} must be > 0 (it keeps small clusters non-degenerate)")
    parts, weights, classes = [], [], []
    for c in range(num_classes):
        mine = points[labels.numpy() == c]
        if len(mine) < components_per_class:
            raise ConfigError(
                f"class {c} has {len(mine)} samples, fewer than components_per_class={components_per_class}"
            )
        kmeans = KMeans(components_per_class, n_init=10, random_state=seed).fit(mine)
        for k in range(components_per_class):
            members = mine[kmeans.labels_ == k]
            parts.append(cluster_gaussian(members, rank, min_variance))
            weights.append(len(members) / len(points))
            classes.append(c)
    means, bases, eigenvalues, s2 = (np.stack(p) for p in zip(*parts, strict=True))
    return LowRankGMM(means, bases, eigenvalues, s2, weights, classes, tuple(x.shape[1:]), num_classes)


def mean_log_prob_per_dim(mixture: LowRankGMM, x: torch.Tensor) -> float:
    return float(mixture.log_prob(x).mean()) / mixture.dim


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="fit_gmm")
@task
def main(cfg: DictConfig) -> None:
    datamodule = hydra.utils.instantiate(cfg.data)
    x, labels = datamodule.arrays(cfg.split)
    if labels is None or not datamodule.num_classes:
        raise ConfigError(f"fit_gmm needs labelled data; data '{datamodule.name}' has no labels")
    write_config(cfg)
    start = time.time()
    mixture = fit_mixture(x, labels, datamodule.num_classes, cfg.components_per_class, cfg.rank,
                          cfg.min_variance, cfg.seed)  # fmt: skip
    settings = {key: cfg[key] for key in ("components_per_class", "rank", "min_variance", "seed", "split")}
    info = {
        "data": datamodule.name,
        **settings,
        "fitted_on": len(x),
        "command": "python -m distillbench.fit_gmm " + " ".join(sys.argv[1:]),
        "scikit_learn": sklearn.__version__,
        "noise_variance_floored": int((mixture.noise_variance <= cfg.min_variance).sum()),
        "log_prob_per_dim": {
            split: round(mean_log_prob_per_dim(mixture, datamodule.arrays(split)[0]), 4)
            for split in ("train", "test")
        },  # fmt: skip
    }
    mixture.save(output_dir(cfg) / "mixture", info)
    target = Path(cfg.paths.assets_dir) / "teachers" / f"gmm_{datamodule.name}"
    if cfg.ship:
        mixture.save(target, info)
    seconds = round(time.time() - start, 1)
    write_summary(cfg, {**info, "seconds": seconds, "components": len(mixture.means)})
    print(
        f"gmm_{datamodule.name}: {len(mixture.means)} components of rank {cfg.rank} in {seconds} s; mean "
        f"log p per dim {info['log_prob_per_dim']}{f'; shipped to {target}' if cfg.ship else ''}"
    )


if __name__ == "__main__":
    main()
