"""``python -m distillbench.convert_edm pkl=<NVlabs EDM .pkl> out=<folder>``: an EDM checkpoint as a teacher.

NVlabs' EDM pickles (for example ``edm-cifar10-32x32-uncond-vp.pkl``; Karras et al. 2022) hold their
network under ``'ema'`` as an ``EDMPrecond`` whose ``.model`` is their DDPM++/NCSN++ ``SongUNet``. They
unpickle only where NVlabs' own code (the ``torch_utils``, ``dnnlib`` and ``training`` packages) is
importable, so run this command with a clone of https://github.com/NVlabs/edm on ``PYTHONPATH``::

    git clone https://github.com/NVlabs/edm
    PYTHONPATH=edm python -m distillbench.convert_edm pkl=edm-cifar10-32x32-uncond-vp.pkl out=teachers/edm

It rebuilds the network as this project's :class:`~distillbench.nets.songunet.SongUNet` from the pickle's
constructor arguments (``init_kwargs``), loads the weights with ``strict=True``, wraps it in an
:class:`~distillbench.teachers.denoiser.EDMDenoiser` (EDM's own preconditioning, c_noise = ln(σ)/4) and saves
``model.safetensors`` + ``teacher.yaml`` into ``out``; ``teacher=checkpoint teacher.path=<out>`` then needs
no NVlabs code. Unless ``check=false``, the saved folder is reloaded and its D(x; σ) compared with the
pickled network's on random inputs at a few σ; a mismatch exits 1. σ_min/σ_max are EDM's sampling range
(0.002, 80) clipped to the pickle's. Only ``EDMPrecond`` is converted (VP/VE/iDDPM preconditioners are
refused by name). Unpickling runs code from the file: convert only pickles you trust.

Options (``key=value``): ``pkl`` and ``out`` (required), ``key`` (the pickle's entry, default ``ema``),
``check`` (true/false, default true). Exit status: 0 written, 1 check failed, 2 unusable input.
"""

from __future__ import annotations

import inspect
import pickle
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distillbench.errors import ConfigError
from distillbench.nets.songunet import SongUNet
from distillbench.teachers.checkpoint import SPEC, WEIGHTS, count_parameters, load_denoiser, save_denoiser
from distillbench.teachers.denoiser import EDMDenoiser
from distillbench.utils.io import atomic_write_text, file_digest

EDM_REPO = "https://github.com/NVlabs/edm"
EDM_PACKAGES = ("torch_utils", "dnnlib", "training")
PRECOND_ARGS = (
    "img_resolution",
    "img_channels",
    "label_dim",
    "use_fp16",
    "sigma_min",
    "sigma_max",
    "sigma_data",
    "model_type",
)
SAMPLING_RANGE = (0.002, 80.0)  # EDM's default σ_min, σ_max when sampling
CHECK_SIGMAS = (0.02, 0.5, 2.0, 40.0)
CHECK_TOLERANCE = 1e-3
OPTIONS = {"pkl": None, "out": None, "key": "ema", "check": "true"}
USAGE = "usage: python -m distillbench.convert_edm pkl=<NVlabs EDM .pkl> out=<folder> [key=ema] [check=true]"


class CheckFailed(RuntimeError):
    """The converted teacher's output differs from the pickled network's."""


def parse_options(argv: list[str]) -> dict[str, str]:
    options = dict(OPTIONS)
    for arg in argv:
        key, sep, value = arg.lstrip("-+").partition("=")
        if not sep or key not in OPTIONS:
            raise ConfigError(f"unknown argument {arg!r}; {USAGE}")
        options[key] = value
    missing = [key for key, value in options.items() if value is None]
    if missing:
        raise ConfigError(f"missing {' and '.join(missing)}; {USAGE}")
    if options["check"].lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"check={options['check']} must be true or false")
    return options


def unpickle_network(path: Path, key: str = "ema"):
    """The object under ``key`` in an NVlabs pickle; a :class:`ConfigError` when NVlabs' code is missing."""
    if not path.is_file():
        raise ConfigError(f"no file {path} (pkl=)")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in EDM_PACKAGES:
            raise
        raise ConfigError(
            f"{path} needs NVlabs' EDM code to unpickle (no module {err.name!r}): clone {EDM_REPO} and put "
            "it on PYTHONPATH, e.g. PYTHONPATH=/path/to/edm python -m distillbench.convert_edm ..."
        ) from err
    except (pickle.UnpicklingError, EOFError, AttributeError) as err:
        raise ConfigError(f"cannot unpickle {path} as an NVlabs EDM network: {err}") from err
    if not isinstance(data, dict) or key not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path} has no entry {key!r} (found {found}); pass key=<entry>")
    return data[key]


def plain(value):
    """YAML-safe copies of constructor arguments (EasyDicts, tuples, numpy scalars)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def songunet_kwargs(precond) -> dict:
    """Our SongUNet's constructor arguments for the network inside an EDMPrecond."""
    name = type(precond).__name__
    if name != "EDMPrecond":
        raise ConfigError(
            f"the pickle holds a {name}; only EDMPrecond (EDM-trained checkpoints such as "
            "edm-cifar10-32x32-cond-vp.pkl) can be converted"
        )
    model_type = type(getattr(precond, "model", None)).__name__
    if model_type != "SongUNet":
        raise ConfigError(
            f"the EDMPrecond's network is a {model_type}; only SongUNet (DDPM++/NCSN++) converts"
        )
    try:
        init_kwargs = plain(dict(precond.init_kwargs))
    except (AttributeError, AssertionError) as err:
        raise ConfigError("the EDMPrecond has no init_kwargs (not an NVlabs persistent object?)") from err
    model_kwargs = {k: v for k, v in init_kwargs.items() if k not in PRECOND_ARGS}
    accepted = set(inspect.signature(SongUNet).parameters)
    unknown = sorted(set(model_kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"SongUNet options {unknown} of the pickle are not supported by distillbench's SongUNet"
        )
    channels = int(precond.img_channels)
    return {
        "img_resolution": int(precond.img_resolution),
        "in_channels": channels,
        "out_channels": channels,
        "num_classes": int(precond.label_dim),
        **model_kwargs,
    }


def convert(precond) -> tuple[EDMDenoiser, dict]:
    """Our EDMDenoiser with the pickled weights, and the spec that rebuilds it."""
    kwargs = songunet_kwargs(precond)
    net = SongUNet(**kwargs)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in precond.model.state_dict().items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[:3]
        raise ConfigError(f"the pickled SongUNet's weights do not fit ours: {' '.join(first)}") from err
    low, high = SAMPLING_RANGE
    spec = {
        "_target_": "distillbench.teachers.denoiser.EDMDenoiser",
        "net": {"_target_": "distillbench.nets.songunet.SongUNet", **kwargs},
        "sample_shape": [kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"]],
        "sigma_data": float(precond.sigma_data),
        "sigma_min": max(low, float(precond.sigma_min)),
        "sigma_max": min(high, float(precond.sigma_max)),
        "num_classes": kwargs["num_classes"],
    }
    denoiser = EDMDenoiser(net, **{k: v for k, v in spec.items() if k not in ("_target_", "net")})
    return denoiser, spec


@torch.no_grad()
def max_difference(precond, teacher, sigmas=CHECK_SIGMAS, seed: int = 0) -> float:
    """max |D_teacher − D_pickle| over one noisy input per σ (labels 0, 1, … for a conditional network)."""
    rng = torch.Generator().manual_seed(seed)
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    shape = (len(sigmas), *teacher.sample_shape)
    noise = torch.randn((2, *shape), generator=rng)
    x = 0.5 * noise[0] + sigma.reshape(-1, 1, 1, 1) * noise[1]
    labels = torch.arange(len(sigmas)) % teacher.num_classes if teacher.num_classes else None
    onehot = torch.nn.functional.one_hot(labels, teacher.num_classes).float() if labels is not None else None
    precond = precond.to("cpu").eval()
    reference = precond(x, sigma, onehot).to(torch.float32)
    return float((teacher(x, sigma, labels) - reference).abs().max())


def run(options: dict[str, str]) -> dict:
    path, out = Path(options["pkl"]), Path(options["out"])
    precond = unpickle_network(path, options["key"])
    denoiser, spec = convert(precond)
    info = {
        "source": path.name,
        "source_sha256": file_digest(path),
        "edm_class": type(precond).__name__,
        "edm_init_kwargs": plain(dict(precond.init_kwargs)),
        "parameters": count_parameters(denoiser),
        "command": "python -m distillbench.convert_edm " + " ".join(f"{k}={v}" for k, v in options.items()),
    }
    save_denoiser(denoiser, spec, out, info)
    if options["check"].lower() in ("true", "1", "yes"):
        difference = max_difference(precond, load_denoiser(out))
        if not difference <= CHECK_TOLERANCE:
            for name in (WEIGHTS, SPEC):
                (out / name).unlink(missing_ok=True)
            raise CheckFailed(
                f"the converted teacher differs from the pickled network by up to {difference:.3g} "
                f"(tolerance {CHECK_TOLERANCE:g}) at σ = {list(CHECK_SIGMAS)}; nothing kept in {out}"
            )
        info["max_abs_difference"] = difference
        doc = OmegaConf.load(out / SPEC)
        doc.info.max_abs_difference = difference
        atomic_write_text(out / SPEC, OmegaConf.to_yaml(doc))
    return info


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    try:
        options = parse_options(argv)
        info = run(options)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    checked = f"; max |D - D_edm| = {info['max_abs_difference']:.2g}" if "max_abs_difference" in info else ""
    print(
        f"wrote {options['out']}: {info['edm_class']} SongUNet, {info['parameters']:,} parameters{checked}. "
        f"Use it with teacher=checkpoint teacher.path={options['out']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
