"""Teacher checkpoints: ``model.safetensors`` (EMA weights) beside ``teacher.yaml`` (how to rebuild it)."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from distillbench.errors import ConfigError
from distillbench.teachers.denoiser import Denoiser, freeze
from distillbench.utils.io import atomic_write_text, atomic_writer

WEIGHTS = "model.safetensors"
SPEC = "teacher.yaml"


def save_teacher(denoiser: Denoiser, spec: DictConfig | dict, folder: str | Path, info: dict | None = None):
    """Write the weights and the spec (``denoiser`` config plus ``info``) atomically into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in denoiser.state_dict().items()}
    with atomic_writer(folder / WEIGHTS, binary=True) as tmp_path:
        save_file(state, tmp_path)
    doc = OmegaConf.create({"denoiser": OmegaConf.to_container(OmegaConf.create(spec), resolve=True)})
    doc.info = info or {}
    atomic_write_text(folder / SPEC, OmegaConf.to_yaml(doc))


def load_teacher(path: str | Path, datamodule=None) -> Denoiser:
    """Rebuild a frozen teacher from a checkpoint folder; check it fits ``datamodule`` when given."""
    folder = Path(path)
    if not (folder / SPEC).is_file() or not (folder / WEIGHTS).is_file():
        raise ConfigError(
            f"no teacher checkpoint in {folder}: expected {SPEC} and {WEIGHTS}. "
            "Train one with `python -m distillbench.teacher data=<name>`."
        )
    spec = OmegaConf.load(folder / SPEC)
    denoiser = hydra.utils.instantiate(spec.denoiser)
    denoiser.load_state_dict(load_file(str(folder / WEIGHTS)))
    denoiser.info = OmegaConf.to_container(spec.get("info", {}))
    if datamodule is not None:
        check_teacher_fits(denoiser, datamodule, str(folder))
    return freeze(denoiser)


def check_teacher_fits(denoiser: Denoiser, datamodule, name: str = "teacher") -> None:
    """Raise a :class:`ConfigError` naming both shapes when the teacher does not fit the data."""
    data_shape = tuple(datamodule.sample_shape)
    if tuple(denoiser.sample_shape) != data_shape:
        raise ConfigError(
            f"teacher {name} makes samples of shape {tuple(denoiser.sample_shape)} but data "
            f"'{datamodule.name}' has shape {data_shape}; pick a teacher trained on this data "
            f"(teacher=<name>) or matching data options (for example data.resolution)"
        )
    teacher_classes = getattr(denoiser, "num_classes", 0)
    if teacher_classes and datamodule.num_classes and teacher_classes != datamodule.num_classes:
        raise ConfigError(
            f"teacher {name} has {teacher_classes} classes but data '{datamodule.name}' has "
            f"{datamodule.num_classes}"
        )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
