"""``python -m distillbench.gpu_check`` (``make gpu-check``): throughput and memory of the score methods.

For each method (SIM, SiD, DI), precision (``32-true``, ``bf16-mixed``) and ``torch.compile`` setting it
trains ``warmup + steps`` generator updates through the real Lightning path (one ψ-update and one θ-update
each) on EDM's DDPM++ with random weights, and records images per second over the timed updates and the
peak GPU memory. A case that fails is recorded with its error and the check goes on; once ``budget_s`` has
passed the remaining cases are recorded as skipped (uncompiled cases run first). Results, rewritten after
every case: ``out`` (JSON, with the device's name) and the same name with ``.md`` (a table for
docs/performance.md).
"""

from __future__ import annotations

import gc
import platform
import time
from datetime import datetime
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from distillbench.callbacks import BatchTimer
from distillbench.config import CONFIG_DIR
from distillbench.data.noise import NoiseDataModule
from distillbench.errors import ConfigError
from distillbench.methods import SIM, DiffInstruct, SiD
from distillbench.teachers.checkpoint import count_parameters
from distillbench.teachers.denoiser import EDMDenoiser
from distillbench.utils.io import atomic_write_json, atomic_write_text
from distillbench.utils.runs import cli, require_at_least_one, task

METHODS = {"sim": SIM, "sid": SiD, "di": DiffInstruct}
PRECISIONS = ("32-true", "bf16-mixed")
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision; "high" = TF32
COLUMNS = (
    "method",
    "precision",
    "compile",
    "images_per_second",
    "ms_per_update",
    "peak_memory_gib",
    "status",
)


def check_request(cfg: DictConfig) -> None:
    unknown = [m for m in cfg.methods if m not in METHODS] + [
        p for p in cfg.precisions if p not in PRECISIONS
    ]
    if unknown:
        raise ConfigError(f"unknown {unknown}: methods are {list(METHODS)}, precisions {list(PRECISIONS)}")
    if cfg.matmul_precision not in MATMUL_PRECISIONS:
        raise ConfigError(f"matmul_precision={cfg.matmul_precision} must be one of {list(MATMUL_PRECISIONS)}")
    require_at_least_one(cfg, ("batch_size", "warmup", "steps"))


def build_method(cfg: DictConfig, name: str, compiled: bool):
    """The method around a random-weight teacher of ``cfg.net``; compiled backbones when asked."""
    teacher = EDMDenoiser(hydra.utils.instantiate(cfg.net), cfg.sample_shape, num_classes=cfg.net.num_classes)
    method = METHODS[name](teacher, batch_size=cfg.batch_size, seed=cfg.seed)
    if compiled:
        for denoiser in (method.generator, method.fake, method.teacher):
            denoiser.net = torch.compile(denoiser.net)
    return method


def measure(cfg: DictConfig, name: str, precision: str, compiled: bool) -> dict:
    """One case: images per second over the timed updates and the peak GPU memory."""
    cuda = torch.cuda.is_available()
    method = build_method(cfg, name, compiled)
    timer = BatchTimer(int(cfg.warmup), int(cfg.steps))
    trainer = L.Trainer(accelerator="auto", devices=1, precision=precision, max_steps=-1, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    data = NoiseDataModule(sample_shape=cfg.sample_shape, batch_size=cfg.batch_size, seed=cfg.seed)
    trainer.fit(method, datamodule=data)
    rate = cfg.steps * cfg.batch_size / timer.seconds
    return {"images_per_second": rate, "ms_per_update": 1000 * timer.seconds / cfg.steps,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "status": "ok"}  # fmt: skip


def cases(cfg: DictConfig) -> list[tuple[str, str, bool]]:
    """(method, precision, compile), the uncompiled ones first so that ``budget_s`` cuts the slow ones."""
    return [(name, precision, compiled) for compiled in sorted(map(bool, cfg.compile))
            for name in cfg.methods for precision in cfg.precisions]  # fmt: skip


def run_cases(cfg: DictConfig, record) -> list[dict]:
    """Measures every case, handing the rows so far to ``record`` after each one."""
    start, rows = time.perf_counter(), []
    for name, precision, compiled in cases(cfg):
        row = {"method": name, "precision": precision, "compile": compiled}
        if time.perf_counter() - start > cfg.budget_s:
            row["status"] = f"skipped: past budget_s={cfg.budget_s}"
        else:
            try:
                row |= measure(cfg, name, precision, compiled)
            except Exception as err:  # a check reports a failing case and goes on
                row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(row, flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
        record(rows)
    return rows


def device_name() -> str:
    return (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or 'cpu'})"
    )


def markdown(result: dict) -> str:
    def cell(value) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [f"GPU check on {result['device']} ({result['time']}, torch {result['torch']}): "
             f"{result['network']} ({result['parameters']:,} parameters), batch {result['batch_size']}, "
             f"{result['steps']} timed generator updates after {result['warmup']}, "
             f"fp32 matmul precision {result['matmul_precision']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in result["rows"]]
    return "\n".join(lines) + "\n"


def gpu_check(cfg: DictConfig) -> dict:
    check_request(cfg)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    with torch.device("meta"):
        parameters = count_parameters(hydra.utils.instantiate(cfg.net))
    result = {"device": device_name(), "time": datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "network": cfg.net._target_.rsplit(".", 1)[-1],
              "parameters": parameters,
              **{k: cfg[k] for k in ("batch_size", "warmup", "steps", "matmul_precision")},
              "config": OmegaConf.to_container(cfg.net, resolve=True), "rows": []}  # fmt: skip
    out = Path(cfg.out)

    def record(rows: list[dict]) -> None:  # after every case, so a killed check keeps what it measured
        result["rows"] = rows
        atomic_write_json(out, result)
        atomic_write_text(out.with_suffix(".md"), markdown(result))

    run_cases(cfg, record)
    print(markdown(result) + f"\nwrote {out} and {out.with_suffix('.md')}")
    return result


@cli
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="gpu_check")
@task
def main(cfg: DictConfig) -> None:
    gpu_check(cfg)


if __name__ == "__main__":
    main()
