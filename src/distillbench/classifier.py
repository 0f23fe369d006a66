"""``python -m distillbench.classifier data=digits``: train the small classifier whose penultimate features
and logits are the FID/IS/KID extractor of an embedded dataset (``metrics=digits``, ``metrics=mnist``).

``ship=true`` writes it into the package's assets, where ``conf/metrics/<data>.yaml`` looks for it.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distillbench.config import CONFIG_DIR
from distillbench.metrics.classifier_training import save_classifier, train_classifier
from distillbench.utils.command import cli, output_dir, task, write_config, write_summary


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="classifier")
@task
def main(cfg: DictConfig) -> None:
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.arrays("train")  # fail on missing data before writing anything
    write_config(cfg)
    start = time.time()
    model, accuracy = train_classifier(datamodule, **cfg.training)
    target = output_dir(cfg) / f"{datamodule.name}.safetensors"
    save_classifier(model, target)
    if cfg.ship:
        save_classifier(model, Path(cfg.paths.assets_dir) / "classifiers" / target.name)
    summary = {"data": datamodule.name, "test_accuracy": accuracy, "seconds": round(time.time() - start, 1)}
    write_summary(cfg, summary)
    print(f"{datamodule.name} classifier: test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
