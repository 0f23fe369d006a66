"""``python -m distillbench.make_trajectories teacher=digits``: the training pairs of Direct Distillation.

Li & Zhang §4.2: the teacher samples with DPM-Solver++(2M) over an N-step schedule (N = 20; Karras or the
improved schedule of §3.1); for the chosen step indices k (10, 11, 12) the state x_k after k steps (at σ_k)
is paired with the trajectory's final output x_N. Per trajectory i (noise ``fixed_noise`` of index i) a
shard stores

    states (S, J, C, H, W)   x_k for the J step indices        finals (S, C, H, W)   x_N
    index  (S,)              global trajectory index i         labels (S,)           class or prompt index

as ``<split>-<number>.safetensors`` beside ``manifest.json`` (the plan: teacher, σ grid, indices, shards).
The first n·(1 − test_fraction) trajectories are the train split, the rest the test split. Shards are written
atomically and skipped when present, so an interrupted run resumes where it stopped; a rerun with other
settings into the same folder is refused.

Teachers: this project's EDM denoisers (pixel space; class labels drawn like ``sample``'s) or, with
``prompts.file``, a text-conditioned diffusers pipeline (Stable Diffusion latents, teacher=diffusers):
trajectory i gets prompt i mod P, the label stores that prompt's index and the manifest the prompts.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress
from safetensors.torch import save

from distillbench.config import CONFIG_DIR, relocatable
from distillbench.errors import ConfigError, MissingPackageError
from distillbench.samplers.generate import device_of, fixed_labels, fixed_noise
from distillbench.samplers.partial import trajectory
from distillbench.samplers.solvers import DPMSolverPP2MSampler
from distillbench.teachers.denoiser import Denoiser
from distillbench.utils.command import cli, resolve_device, task, write_config, write_summary
from distillbench.utils.io import atomic_write_json, atomic_writer
from distillbench.utils.tables import print_summary

MANIFEST = "manifest.json"
FORMAT = 1


# ---- text conditioning (Stable Diffusion) ------------------------------------------------------------------
class CLIPPromptEncoder:
    """Stable Diffusion's prompt encoder: the pipeline's CLIP tokenizer and text model (needs transformers).

    ``encoder(prompts)`` gives the encoder_hidden_states (P, 77, D) of a list of prompts.
    """

    def __init__(
        self, path: str, tokenizer_subfolder: str = "tokenizer", encoder_subfolder: str = "text_encoder"
    ):
        try:
            import transformers
        except ModuleNotFoundError as err:
            raise MissingPackageError(
                "prompts.encoder=CLIPPromptEncoder needs the transformers package: pip install transformers"
            ) from err
        self.tokenizer = transformers.CLIPTokenizer.from_pretrained(path, subfolder=tokenizer_subfolder)
        self.model = transformers.CLIPTextModel.from_pretrained(path, subfolder=encoder_subfolder).eval()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        length = self.tokenizer.model_max_length
        tokens = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                return_tensors="pt")  # fmt: skip
        return self.model(tokens.input_ids.to(self.model.device))[0]


class PromptConditioned(Denoiser):
    """A text-conditioned diffusers teacher whose labels index prompts: D(x; σ, i) = D(x; σ, enc(prompt_i)).

    The embeddings of the last label batch are kept, so the N solver calls of a batch encode its prompts once.
    """

    def __init__(self, teacher: Denoiser, encoder, prompts: list[str]):
        super().__init__()
        self.teacher, self.encoder, self.prompts = teacher, encoder, list(prompts)
        self.sample_shape, self.num_classes = tuple(teacher.sample_shape), len(self.prompts)
        self.sigma_min, self.sigma_max = teacher.sigma_min, teacher.sigma_max
        self.sigma_data = teacher.sigma_data
        self._cached: tuple[tuple[int, ...], torch.Tensor] | None = None

    def embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        key = tuple(labels.tolist())
        if self._cached is None or self._cached[0] != key:
            self._cached = key, self.encoder([self.prompts[i] for i in key])
        return self._cached[1]

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("a prompt-conditioned teacher needs labels: the prompt index of every sample")
        cond = self.embeddings(labels).to(x.device)
        return self.teacher(x, sigma, encoder_hidden_states=cond)


def read_prompts(path) -> list[str]:
    """The non-empty lines of a prompts file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"prompts.file={path} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts.file={path} holds no prompt; write one prompt per line")
    return prompts


# ---- the plan ----------------------------------------------------------------------------------------------
def check_settings(
    steps: int, indices, n: int, test_fraction: float, shard_size: int, batch_size: int
) -> None:
    """Every bad number fails here, before the teacher is loaded."""
    if not (isinstance(steps, int) and steps >= 2):
        raise ConfigError(f"steps={steps} must be an integer >= 2: the N-step trajectory needs a middle")
    if not indices:
        raise ConfigError(f"indices={indices} is empty; give the step indices k to store, e.g. [10, 11, 12]")
    for k in indices:
        if not (isinstance(k, int) and 1 <= k <= steps - 1):
            raise ConfigError(
                f"indices={list(indices)} holds {k!r}, outside [1, {steps - 1}] for steps={steps}: "
                "k is the number of solver steps taken, 1 ≤ k ≤ N − 1"
            )
    if len(set(indices)) != len(indices):
        raise ConfigError(f"indices={list(indices)} repeats a step index; list each k once")
    for key, value in (("n", n), ("shard_size", shard_size), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{key}={value} must be a positive integer")
    if not 0 <= test_fraction < 1 or split_sizes(n, test_fraction)[0] < 1:
        raise ConfigError(f"test_fraction={test_fraction} must lie in [0, 1) and leave n={n} a train split")


def split_sizes(n: int, test_fraction: float) -> tuple[int, int]:
    n_test = int(round(test_fraction * n))
    return n - n_test, n_test


def shard_plan(n: int, test_fraction: float, shard_size: int) -> dict[str, list[dict]]:
    """The shards of each split: file name, first trajectory index and count."""
    n_train, _ = split_sizes(n, test_fraction)
    plan = {}
    for split, (begin, end) in {"train": (0, n_train), "test": (n_train, n)}.items():
        plan[split] = [
            {
                "file": f"{split}-{number:05d}.safetensors",
                "start": start,
                "count": min(shard_size, end - start),
            }
            for number, start in enumerate(range(begin, end, shard_size))
        ]
    return plan


def settle_manifest(out_dir: Path, manifest: dict) -> None:
    """Write the manifest, or check that the one in ``out_dir`` describes the same trajectories."""
    path = out_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(key for key in manifest.keys() | old.keys() if old.get(key) != manifest.get(key))
        if changed:
            raise ConfigError(
                f"out_dir={out_dir} holds trajectories made with other settings ({', '.join(changed)} "
                "differ); choose another out_dir, or delete that folder to start over"
            )
        return
    atomic_write_json(path, manifest)


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete the half-written shards of an interrupted run (``atomic_writer``'s ``.<name>.*.tmp`` files)."""
    for tmp in glob.glob(str(out_dir / ".*.safetensors.*.tmp")):
        os.remove(tmp)


# ---- the command -------------------------------------------------------------------------------------------
def build_teacher(cfg: DictConfig) -> tuple[Denoiser, object, list[str] | None]:
    """(teacher, data module or None, prompts or None), checking the teacher fits the settings."""
    if cfg.prompts.file is None:
        datamodule = hydra.utils.instantiate(cfg.data) if cfg.get("data") else None
        teacher = hydra.utils.instantiate(cfg.teacher, **({"datamodule": datamodule} if datamodule else {}))
        if getattr(teacher, "cross_attention", False):
            raise ConfigError("this teacher is text-conditioned: set prompts.file to a file of prompts")
        return teacher, datamodule, None
    prompts = read_prompts(cfg.prompts.file)
    encoder = hydra.utils.instantiate(cfg.prompts.encoder)
    teacher = hydra.utils.instantiate(cfg.teacher, uncond_hidden_states=encoder([""]))
    if not getattr(teacher, "cross_attention", False):
        raise ConfigError(
            f"prompts.file={cfg.prompts.file} needs a text-conditioned teacher (teacher=diffusers with a "
            f"Stable Diffusion pipeline), not {type(teacher).__name__}; or set prompts.file=null"
        )
    return PromptConditioned(teacher, encoder, prompts), None, prompts


def trajectory_labels(teacher: Denoiser, datamodule, n: int, prompts, seed: int) -> torch.Tensor | None:
    """Prompt i mod P, or class labels drawn like ``sample``'s, or None for an unconditional teacher."""
    if prompts is not None:
        return torch.arange(n) % len(prompts)
    if not getattr(teacher, "num_classes", 0):
        return None
    probs = datamodule.label_distribution if datamodule is not None else torch.ones(teacher.num_classes)
    return fixed_labels(n, probs, seed)


def teacher_record(cfg: DictConfig) -> dict:
    """The teacher's config as the manifest records it: a shipped teacher's path relative to the assets."""
    return relocatable(OmegaConf.to_container(cfg.teacher, resolve=True), cfg.paths.assets_dir)


def make_manifest(cfg: DictConfig, teacher: Denoiser, sampler, prompts) -> dict:
    """The plan of the folder: what made the trajectories (a rerun must match it) and the shards."""
    return {
        "format": FORMAT,
        "teacher": teacher_record(cfg),
        "sample_shape": list(teacher.sample_shape),
        "num_classes": int(getattr(teacher, "num_classes", 0)),
        "steps": cfg.steps,
        "indices": list(cfg.indices),
        "sigmas": sampler.sigmas(teacher).tolist(),
        "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
        "noise_seed": cfg.noise_seed,
        "n": cfg.n,
        "test_fraction": cfg.test_fraction,
        "prompts": prompts,
        "splits": shard_plan(cfg.n, cfg.test_fraction, cfg.shard_size),
    }


def write_shard(path: Path, teacher, sampler, shard: dict, cfg: DictConfig, labels, on_batch) -> None:
    """Run the shard's trajectories batch by batch and write its tensors atomically."""
    device = device_of(teacher)
    states, finals = [], []
    for begin in range(shard["start"], shard["start"] + shard["count"], cfg.batch_size):
        size = min(cfg.batch_size, shard["start"] + shard["count"] - begin)
        z = fixed_noise(size, teacher.sample_shape, cfg.noise_seed, offset=begin).to(device)
        batch_labels = None if labels is None else labels[begin : begin + size].to(device)
        batch_states, final = trajectory(teacher, sampler, z, batch_labels, list(cfg.indices))
        states.append(batch_states.cpu())
        finals.append(final.cpu())
        on_batch(size)
    index = torch.arange(shard["start"], shard["start"] + shard["count"])
    tensors = {"states": torch.cat(states), "finals": torch.cat(finals), "index": index}
    if labels is not None:
        tensors["labels"] = labels[index].clone()
    with atomic_writer(path, binary=True) as tmp:
        Path(tmp).write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))


def write_trajectories(cfg: DictConfig) -> dict:
    check_settings(cfg.steps, list(cfg.indices), cfg.n, cfg.test_fraction, cfg.shard_size, cfg.batch_size)
    teacher, datamodule, prompts = build_teacher(cfg)
    teacher.to(resolve_device(cfg.device))
    sampler = DPMSolverPP2MSampler(steps=cfg.steps, schedule=hydra.utils.instantiate(cfg.schedule))
    out_dir = Path(cfg.out_dir)
    manifest = make_manifest(cfg, teacher, sampler, prompts)
    write_config(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    settle_manifest(out_dir, manifest)
    remove_stale_temporaries(out_dir)
    labels = trajectory_labels(teacher, datamodule, cfg.n, prompts, cfg.noise_seed)
    shards = [shard for split in manifest["splits"].values() for shard in split]
    todo = [shard for shard in shards if not (out_dir / shard["file"]).is_file()]
    start = time.time()
    with Progress() as bar:
        progress = bar.add_task("trajectories", total=sum(shard["count"] for shard in todo))
        for shard in todo:
            write_shard(out_dir / shard["file"], teacher, sampler, shard, cfg, labels,
                        lambda size: bar.advance(progress, size))  # fmt: skip
    summary = {"out_dir": str(out_dir), "n": cfg.n, "pairs": cfg.n * len(cfg.indices),
               "shards_written": len(todo), "shards_skipped": len(shards) - len(todo),
               "nfe_per_trajectory": cfg.steps, "seconds": time.time() - start}  # fmt: skip
    write_summary(cfg, summary)
    print_summary(summary, title="trajectories")
    return summary


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="make_trajectories")
@task
def main(cfg: DictConfig) -> None:
    write_trajectories(cfg)


if __name__ == "__main__":
    main()
