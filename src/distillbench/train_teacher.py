"""``python -m distillbench.train_teacher data=digits``: train an EDM teacher and save it (safetensors and
its spec)."""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from distillbench.config import CONFIG_DIR
from distillbench.distributed import slurm_plugins
from distillbench.teachers.checkpoint import count_parameters, save_denoiser
from distillbench.teachers.denoiser import EDMDenoiser
from distillbench.utils.command import cli, output_dir, task, write_config, write_summary
from distillbench.utils.logging import instantiate_loggers


def denoiser_spec(cfg: DictConfig, datamodule) -> dict:
    """The ``_target_`` config that rebuilds the teacher's denoiser from its checkpoint."""
    return {
        "_target_": "distillbench.teachers.denoiser.EDMDenoiser",
        "net": OmegaConf.to_container(cfg.net, resolve=True),
        "sample_shape": list(datamodule.sample_shape),
        "sigma_data": cfg.sigma_data,
        "num_classes": int(cfg.net.get("num_classes", 0) or 0),
    }


def train_teacher(cfg: DictConfig) -> dict:
    datamodule = hydra.utils.instantiate(cfg.data)
    spec = denoiser_spec(cfg, datamodule)
    denoiser: EDMDenoiser = hydra.utils.instantiate(spec)
    module = hydra.utils.instantiate(cfg.training, denoiser=denoiser)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=instantiate_loggers(cfg.get("logger")),
                                      plugins=slurm_plugins() or None)  # fmt: skip
    write_config(cfg)
    start = time.time()
    trainer.fit(module, datamodule=datamodule)
    folder = output_dir(cfg) / "teacher"
    info = {
        "data": datamodule.name,
        "steps": int(trainer.global_step),
        "kimg": module.nimg / 1000,
        "parameters": count_parameters(denoiser),
        "train_seconds": round(time.time() - start, 1),
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "command": "python -m distillbench.train_teacher " + " ".join(sys.argv[1:]),
    }
    save_denoiser(module.ema, spec, folder, info)
    summary = {**info, "teacher_dir": str(folder)}
    write_summary(cfg, summary)
    return summary


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train_teacher")
@task
def main(cfg: DictConfig) -> None:
    train_teacher(cfg)


if __name__ == "__main__":
    main()
