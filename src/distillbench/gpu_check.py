"""``python -m distillbench.gpu_check`` (``make gpu-check``): speed, memory and profiles of the score methods.

It measures the cases listed in ``cases`` (conf/gpu_check.yaml), in order. A case trains ``warmup + steps``
generator updates (one ψ-update and one θ-update each) through the real Lightning path on EDM's DDPM++ with
random weights, at one setting: method, ``precision`` (``32-true`` or ``bf16-mixed``), ``matmul`` (fp32
matmul precision: ``highest``, or ``high`` = TF32), ``compile`` (torch.compile of the three backbones),
``channels_last``, ``batch`` and ``cudnn_benchmark``. It records images per second over the timed updates,
the peak GPU memory and the last losses. ``profile: true`` runs ``profile_steps`` more updates under
torch.profiler and keeps the top ``top_ops`` operators by self device time (CPU time without a GPU), with
the device and host time and the kernel launches per update.

``like: fastest`` takes every setting the case does not name from the fastest SiD case so far. A case with
``experiment`` (e.g. ``paper/cifar10_sid``) trains that train-config experiment's method with its settings
(batch, learning rates, loss scaling, EMA) for ``seconds`` on a random-weight teacher of ``net``.

Cases run while their estimate (``case_s``, ``compile_s`` for the first compilation of a setting,
``recompile_s`` after it) ends before ``budget_s``; the others are recorded as skipped. A case still running
at ``deadline_s`` is stopped and recorded as an error, as is a case that fails, and the check goes on.
Results, rewritten after every case: ``out`` (JSON, with the device's name) and the same name with ``.md``
(the tables for docs/performance.md).
"""

from __future__ import annotations

import contextlib
import gc
import platform
import signal
import time
from datetime import datetime
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from distillbench.callbacks import NonFiniteGuard
from distillbench.config import CONFIG_DIR
from distillbench.data.noise import NoiseDataModule
from distillbench.errors import ConfigError
from distillbench.methods import SIM, DiffInstruct, SiD
from distillbench.teachers.checkpoint import count_parameters
from distillbench.teachers.denoiser import EDMDenoiser
from distillbench.utils.command import cli, require_at_least_one, task
from distillbench.utils.io import atomic_write_json, atomic_write_text
from distillbench.utils.trainer import accelerate

METHODS = {"sim": SIM, "sid": SiD, "di": DiffInstruct}
PRECISIONS = ("32-true", "bf16-mixed")
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision; "high" = TF32
SETTINGS = ("precision", "matmul", "compile", "channels_last", "batch", "cudnn_benchmark")
CASE_KEYS = ("method", *SETTINGS, "profile", "like", "experiment", "seconds")
DEFAULT_SETTINGS = {"precision": "32-true", "matmul": "highest", "compile": False, "channels_last": False,
                    "cudnn_benchmark": True}  # fmt: skip
REFERENCE_METHOD = "sid"  # ``like: fastest`` copies the fastest case of this method
COLUMNS = ("case", "method", "precision", "matmul", "compile", "channels_last", "batch", "images_per_second",
           "ms_per_update", "peak_memory_gib", "loss_fake", "loss_gen", "seconds", "status")  # fmt: skip
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


class PastDeadline(Exception):
    """A case still running at ``deadline_s``."""


def check_request(cfg: DictConfig) -> None:
    for i, case in enumerate(cfg.cases):
        unknown = [k for k in case if k not in CASE_KEYS]
        if unknown:
            raise ConfigError(f"cases[{i}] has unknown keys {unknown}; a case takes {list(CASE_KEYS)}")
        method, experiment = case.get("method"), case.get("experiment")
        if experiment is None and method not in METHODS:
            raise ConfigError(f"cases[{i}]: unknown method {method!r}: methods are {list(METHODS)}")
        if case.get("precision", "32-true") not in PRECISIONS:
            raise ConfigError(f"cases[{i}]: unknown precision {case.precision!r}: one of {list(PRECISIONS)}")
        if case.get("matmul", "highest") not in MATMUL_PRECISIONS:
            raise ConfigError(f"cases[{i}]: matmul={case.matmul} must be one of {list(MATMUL_PRECISIONS)}")
        if case.get("like") not in (None, "fastest"):
            raise ConfigError(f"cases[{i}]: like={case.like!r} must be 'fastest' or absent")
    require_at_least_one(cfg, ("batch_size", "warmup", "steps", "profile_steps", "top_ops"))


def settings_of(case: dict, rows: list[dict], batch_size: int) -> dict:
    """The case's full settings: its own, else (``like: fastest``) the fastest SiD case's, else defaults."""
    base = {**DEFAULT_SETTINGS, "batch": batch_size}
    if case.get("like") == "fastest":
        done = [r for r in rows if r.get("method") == REFERENCE_METHOD and r.get("status") == "ok"]
        if done:
            fastest = max(done, key=lambda r: r["images_per_second"])
            base |= {k: fastest[k] for k in SETTINGS}
    return base | {k: case[k] for k in SETTINGS if case.get(k) is not None}


def teacher_of(cfg: DictConfig) -> EDMDenoiser:
    return EDMDenoiser(hydra.utils.instantiate(cfg.net), cfg.sample_shape, num_classes=cfg.net.num_classes)


def experiment_config(experiment: str) -> DictConfig:
    """The train config of ``experiment=<experiment>`` (composed, not run)."""
    overrides = [f"experiment={experiment}"]
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name="train", overrides=overrides)
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra.compose(config_name="train", overrides=overrides)


def build_method(cfg: DictConfig, case: dict, settings: dict):
    """The case's method around a random-weight teacher of ``cfg.net``, laid out and compiled as asked; and
    the non-finite guard of an experiment's run (None otherwise)."""
    teacher = teacher_of(cfg)
    guard = None
    if case.get("experiment"):
        train_cfg = experiment_config(case["experiment"])
        method = hydra.utils.instantiate(train_cfg.method, teacher=teacher, batch_size=settings["batch"])
        guard = NonFiniteGuard(train_cfg.max_bad_steps)
    else:
        method = METHODS[case["method"]](teacher, batch_size=settings["batch"], seed=cfg.seed)
    accelerate(method, settings["compile"], settings["channels_last"], cfg.compile_backend)
    return method, guard


class CaseTimer(L.Callback):
    """Times the generator updates after ``warmup`` (``steps`` of them, or as many as end within ``seconds``),
    keeps the last losses, then profiles ``profile_steps`` more when given a profiler, and stops the trainer.
    On a GPU the device is synchronised at the ends of both stretches."""

    def __init__(self, warmup: int, steps: int | None, seconds: float | None = None, profiler=None,
                 profile_steps: int = 0):  # fmt: skip
        self.warmup, self.steps, self.seconds_wanted = warmup, steps, seconds
        self.profiler, self.profile_steps = profiler, profile_steps
        self.done, self.start, self.timed, self.seconds = 0, None, 0, None
        self.losses: dict[str, float] = {}
        self.profile_end: int | None = None

    @staticmethod
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timing_over(self) -> bool:
        if self.steps is not None:
            return self.done - self.warmup >= self.steps
        return time.perf_counter() - self.start >= self.seconds_wanted

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.sync()
            self.start = time.perf_counter()
        elif self.start is not None and self.seconds is None and self.timing_over():
            self.sync()
            self.seconds, self.timed = time.perf_counter() - self.start, self.done - self.warmup
            metrics = getattr(pl_module, "_train_metrics", {})  # this update's, before the module logs them
            self.losses = {k.split("/")[1]: float(metrics[k]) for k in ("train/loss_fake", "train/loss_gen")
                           if k in metrics}  # fmt: skip
            if self.profiler is None or not self.profile_steps:
                trainer.should_stop = True
            else:
                self.profiler.__enter__()
                self.profile_end = self.done + self.profile_steps
        elif self.profile_end is not None and self.done == self.profile_end:
            self.sync()
            self.profiler.__exit__(None, None, None)
            trainer.should_stop = True


def device_time(event) -> float:
    """An operator's self time on the GPU in µs (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def summarise_profile(profiler, steps: int, top: int) -> dict:
    """Per generator update: device and host time, kernel launches, and the ``top`` operators by self device
    time (self CPU time where nothing ran on a GPU)."""
    events = list(profiler.key_averages())
    on_device = any(device_time(e) > 0 for e in events)
    key = device_time if on_device else (lambda e: float(e.self_cpu_time_total))
    per = lambda us: us / 1000 / steps  # noqa: E731  µs over the profiled updates -> ms per update
    ops = [{"op": e.key[:90], "calls": e.count / steps, "self_device_ms": per(device_time(e)),
            "self_cpu_ms": per(e.self_cpu_time_total)}
           for e in sorted(events, key=key, reverse=True)[:top]]  # fmt: skip
    return {"steps": steps, "sorted_by": "self_device_ms" if on_device else "self_cpu_ms",
            "device_ms_per_update": per(sum(device_time(e) for e in events)),
            "cpu_ms_per_update": per(sum(e.self_cpu_time_total for e in events)),
            "launches_per_update": sum(e.count for e in events if e.key in LAUNCHES) / steps,
            "top": ops}  # fmt: skip


def new_profiler():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def measure(cfg: DictConfig, case: dict, settings: dict) -> dict:
    """One case: images per second over the timed updates, the peak GPU memory, the last losses, and the
    profile when asked."""
    cuda = torch.cuda.is_available()
    torch._dynamo.reset()  # each case compiles its own backbones (the on-disk kernel cache stays)
    torch.set_float32_matmul_precision(settings["matmul"])
    method, guard = build_method(cfg, case, settings)
    profiler = new_profiler() if case.get("profile") else None
    experiment = bool(case.get("experiment"))
    timer = CaseTimer(int(cfg.warmup), None if experiment else int(cfg.steps),
                      float(case.get("seconds") or 60) if experiment else None, profiler,
                      int(cfg.profile_steps))  # fmt: skip
    callbacks = [timer] if guard is None else [timer, guard]
    benchmark = bool(settings["cudnn_benchmark"]) if cuda else None
    trainer = L.Trainer(accelerator="auto", devices=1, precision=settings["precision"], max_steps=-1,
                        max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, benchmark=benchmark, callbacks=callbacks)  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    data = NoiseDataModule(sample_shape=cfg.sample_shape, batch_size=settings["batch"], seed=cfg.seed)
    trainer.fit(method, datamodule=data)
    if timer.seconds is None:
        raise RuntimeError(f"training ended after {timer.done} updates, before the timed ones")
    row = {"images_per_second": timer.timed * settings["batch"] / timer.seconds,
           "ms_per_update": 1000 * timer.seconds / timer.timed,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           **timer.losses, "status": "ok"}  # fmt: skip
    if experiment:
        row |= {"updates": timer.done, "kimg": method.kimg, "dropped_samples": int(method.dropped_samples),
                "nonfinite_grads": int(method.nonfinite_grads)}  # fmt: skip
    if profiler is not None:
        row["profile"] = summarise_profile(profiler, int(cfg.profile_steps), int(cfg.top_ops))
    return row


def estimate(cfg: DictConfig, case: dict, settings: dict, compiled: set) -> float:
    """Expected seconds of a case: compilation (cheaper once the same setting has compiled), the run."""
    seconds = float(cfg.case_s) + (float(case.get("seconds") or 60) if case.get("experiment") else 0.0)
    if settings["compile"]:
        seconds += float(cfg.recompile_s if compile_key(settings) in compiled else cfg.compile_s)
    return seconds


def compile_key(settings: dict) -> tuple:
    return tuple(settings[k] for k in ("precision", "matmul", "channels_last", "batch"))


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise :class:`PastDeadline` in the block after ``seconds`` (no limit: None, or no SIGALRM)."""
    if seconds is None or not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(signum, frame):
        raise PastDeadline("still running at deadline_s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cases(cfg: DictConfig, record) -> list[dict]:
    """Measures the cases in order, handing the rows so far to ``record`` after each one."""
    start, rows, compiled = time.perf_counter(), [], set()
    for index, case in enumerate(OmegaConf.to_container(cfg.cases, resolve=True)):
        settings = settings_of(case, rows, int(cfg.batch_size))
        if case.get("experiment") and case.get("batch") is None:  # the experiment's own batch
            settings["batch"] = int(experiment_config(case["experiment"]).method.batch_size)
        row = {"case": index, "method": case.get("method") or case.get("experiment"), **settings}
        elapsed = time.perf_counter() - start
        if elapsed + estimate(cfg, case, settings, compiled) > cfg.budget_s:
            row["status"] = f"skipped: would end past budget_s={cfg.budget_s} (at {elapsed:.0f} s)"
        else:
            left = None if cfg.deadline_s is None else cfg.deadline_s - elapsed
            try:
                with deadline(left):
                    row |= measure(cfg, case, settings)
            except Exception as err:  # a check reports a failing case and goes on
                row["status"] = f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
            row["seconds"] = time.perf_counter() - start - elapsed
            if settings["compile"]:
                compiled.add(compile_key(settings))
            print({k: v for k, v in row.items() if k != "profile"}, flush=True)
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


def cell(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def profile_table(row: dict) -> list[str]:
    profile = row["profile"]
    head = (f"Profile of case {row['case']} ({row['method']}, {row['precision']}, matmul {row['matmul']}, "
            f"compile {row['compile']}, channels_last {row['channels_last']}, batch {row['batch']}), per "
            f"update over {profile['steps']}: device {profile['device_ms_per_update']:.4g} ms, host "
            f"{profile['cpu_ms_per_update']:.4g} ms, {profile['launches_per_update']:.0f} kernel launches; "
            f"top operators by {profile['sorted_by']}:")  # fmt: skip
    lines = [head, "", "| op | calls | self_device_ms | self_cpu_ms |", "|---|---|---|---|"]
    lines += [f"| `{op['op']}` | {op['calls']:.4g} | {op['self_device_ms']:.4g} | {op['self_cpu_ms']:.4g} |"
              for op in profile["top"]]  # fmt: skip
    return [*lines, ""]


def markdown(result: dict) -> str:
    lines = [f"GPU check on {result['device']} ({result['time']}, torch {result['torch']}): "
             f"{result['network']} ({result['parameters']:,} parameters), "
             f"{result['steps']} timed generator updates after {result['warmup']} (an experiment: its "
             f"seconds).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in result["rows"]]
    lines.append("")
    for row in result["rows"]:
        if "profile" in row:
            lines += profile_table(row)
    return "\n".join(lines) + "\n"


def gpu_check(cfg: DictConfig) -> dict:
    check_request(cfg)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)  # three backbones × train/eval × grad modes, per case
    with torch.device("meta"):
        parameters = count_parameters(hydra.utils.instantiate(cfg.net))
    result = {"device": device_name(), "time": datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "network": cfg.net._target_.rsplit(".", 1)[-1],
              "parameters": parameters,
              **{k: cfg[k] for k in ("batch_size", "warmup", "steps", "profile_steps", "budget_s",
                                     "deadline_s")},
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
