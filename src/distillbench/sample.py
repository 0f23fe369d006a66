"""``python -m distillbench.sample teacher=digits sampler=heun sampler.steps=18 n=64``.

Draws ``n`` samples from a teacher with a deterministic sampler on fixed noise and writes the output
contract: ``config.yaml``, ``samples.npz`` (``x`` N×C×H×W in [-1, 1], ``labels`` when conditional),
``samples.png`` and ``summary.json`` (NFE, samples per second, the metrics of the samples and their protocol
record).
"""

from __future__ import annotations

import time

import hydra
import numpy as np
from omegaconf import DictConfig

from distillbench import run_folder
from distillbench.config import CONFIG_DIR
from distillbench.metrics.suite import PROTOCOL
from distillbench.samplers.generate import generate
from distillbench.utils.command import cli, output_dir, task, write_config, write_summary
from distillbench.utils.images import save_samples_figure
from distillbench.utils.tables import print_summary
from distillbench.validation import validate_sample_config


def build(cfg: DictConfig):
    """Instantiate data, teacher and sampler; every bad-input check happens here, before any work."""
    validate_sample_config(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.arrays("train")  # missing data or packages fail here, first
    teacher = hydra.utils.instantiate(cfg.teacher, datamodule=datamodule)
    sampler = hydra.utils.instantiate(cfg.sampler)
    metrics = hydra.utils.instantiate(cfg.metrics, n=cfg.n) if cfg.get("metrics") and cfg.evaluate else None
    return datamodule, teacher, sampler, metrics


def sample(cfg: DictConfig) -> dict:
    datamodule, teacher, sampler, metrics = build(cfg)
    write_config(cfg)
    label_probs = datamodule.label_distribution if getattr(teacher, "num_classes", 0) else None
    start = time.time()
    x, labels, nfe = generate(
        sampler,
        teacher,
        cfg.n,
        batch_size=cfg.batch_size,
        seed=cfg.noise_seed,
        label_probs=label_probs,
        progress=True,
    )
    seconds = time.time() - start
    out = output_dir(cfg)
    arrays = {"x": x.numpy()} | ({"labels": labels.numpy()} if labels is not None else {})
    np.savez(out / run_folder.SAMPLES, **arrays)
    save_samples_figure(x[: cfg.grid_size], out / "samples.png", title=f"{type(sampler).__name__}, {nfe} NFE")
    summary = {"nfe": nfe, "n": cfg.n, "samples_per_second": cfg.n / seconds}
    if metrics is not None:
        summary |= metrics.evaluate(x, datamodule) | {PROTOCOL: metrics.protocol(datamodule)}
    write_summary(cfg, summary)
    print_summary(summary, title=f"sample: {type(sampler).__name__}")
    return summary


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@task
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
