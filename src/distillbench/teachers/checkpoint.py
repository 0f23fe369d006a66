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


def save_denoiser(denoiser: Denoiser, spec: DictConfig | dict, folder: str | Path, info: dict | None = None):
    """Write the weights and the spec (``denoiser`` config plus ``info``) atomically into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in denoiser.state_dict().items()}
    with atomic_writer(folder / WEIGHTS, binary=True) as tmp_path:
        save_file(state, tmp_path)
    doc = OmegaConf.create({"denoiser": OmegaConf.to_container(OmegaConf.create(spec), resolve=True)})
    doc.info = info or {}
    atomic_write_text(folder / SPEC, OmegaConf.to_yaml(doc))


def load_denoiser(path: str | Path, datamodule=None) -> Denoiser:
    """Rebuild a frozen denoiser (a teacher, or a student to start from) from a checkpoint folder; check it
    fits ``datamodule`` when given."""
    folder = Path(path)
    if not (folder / SPEC).is_file() or not (folder / WEIGHTS).is_file():
        raise ConfigError(
            f"no teacher checkpoint in {folder}: expected {SPEC} and {WEIGHTS}. "
            "Train one with `python -m distillbench.train_teacher data=<name>`."
        )
    spec = OmegaConf.load(folder / SPEC)
    denoiser = hydra.utils.instantiate(spec.denoiser)
    denoiser.load_state_dict(load_file(str(folder / WEIGHTS)))
    denoiser.info = OmegaConf.to_container(spec.get("info", {}))
    if datamodule is not None:
        check_teacher_fits(denoiser, datamodule, str(folder))
    return freeze(denoiser)


def check_teacher_fits(denoiser: Denoiser, datamodule, name: str | None = None) -> None:
    """Raise a :class:`ConfigError` naming both sides when the teacher makes samples of another shape than
    the data, or when both have classes and their numbers differ.

    A class-conditional teacher on unlabelled data passes: it samples through its null label. ``name``
    defaults to the teacher's ``name``, the data of its training record, or its class.
    """
    info = getattr(denoiser, "info", None) or {}
    name = name or getattr(denoiser, "name", None) or info.get("data") or type(denoiser).__name__
    fix = f"pick teacher={datamodule.name} or a teacher trained on this data"
    shape, data_shape = tuple(denoiser.sample_shape), tuple(datamodule.sample_shape)
    if shape != data_shape:
        raise ConfigError(
            f"teacher {name!r} makes samples of shape {shape} but data '{datamodule.name}' has shape "
            f"{data_shape}; {fix} (or matching data options, for example data.resolution)"
        )
    classes = int(getattr(denoiser, "num_classes", 0))
    data_classes = int(getattr(datamodule, "num_classes", 0))
    if classes and data_classes and classes != data_classes:
        raise ConfigError(
            f"teacher {name!r} has num_classes={classes} but data '{datamodule.name}' has "
            f"num_classes={data_classes}; {fix}"
        )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
