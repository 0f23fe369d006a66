"""``make bench`` (``python -m benchmarks.run``): what the framework costs, measured side by side.

On the embedded digits setup (the shipped teacher, batch 64, the CPU trainer without progress bar) it
measures, each as median and spread (min, max) over ``--repeats`` repeats:

1. overhead: a distillbench training step (SIM, SiD, DI, DMD2, SiDA, progressive, direct, CD, ECT; through
   Lightning with the train command's callbacks and CSV logging) against :mod:`benchmarks.bare`, the same
   network passes on copies of the same networks and batch, interleaved step by step in one process, after
   checking both compute the same loss on the same inputs; goal ≤ 1.05. A method that misses it is profiled
   (torch.profiler over the timed steps, top operators of both loops);
2. sampling: the one-step student against the teacher's Heun (35 NFE) and DPM-Solver++(2M) at 8 and 20
   steps, samples per second at batch 256; goal: the student ≥ 30× the 35-NFE teacher;
3. direct distillation 7 + 1 against the teacher's 20 DPM-Solver++ steps, wall time; goal ≤ 0.5×;
4. memory of each method's training step, in a fresh process each: peak RSS above the process's RSS before
   the step, and the activations held for backward (saved-tensor bytes at each backward), as multiples of
   one teacher network's EDM-loss activations (docs/algorithms.md §8: SiD/SIM about 3, DI 1);
5. throughput of teacher training (images/s) and of evaluation (samples/s per feature extractor).

Writes ``<out>/results.json`` and ``<out>/RESULTS.md`` (after every section, so an interrupted run keeps
what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import default_collate

from benchmarks.bare import (
    BareCD,
    BareDirect,
    BareDMD2,
    BareECT,
    BareProgressive,
    BareScore,
    BareSiDA,
    edm_fake_loss,
)
from distillbench.callbacks import BatchTimer
from distillbench.teachers.training import edm_loss
from distillbench.utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["method.batch_size=64", "eval.n=64", "eval.every_kimg=1e9", "eval.teacher=false", "logger=csv",
          "checkpoint.every_kimg=1e9", "method.duration_kimg=1e9",
          "+trainer.enable_progress_bar=false"]  # fmt: skip
METHODS = {
    "sim": ["method=sim"],
    "sid": ["method=sid"],
    "di": ["method=di"],
    "dmd2": ["method=dmd2", "method.gan=true"],  # 5 ψ-steps per θ-step, the GAN on real digits
    "sida": ["method=sida", "method.gan_start_kimg=0"],  # its GAN term on from the first step
    "progressive": ["method=progressive", "method.n_start=4", "method.stage_kimg=null",
                    "method.stage_iterations=1000000"],
    "direct": ["method=direct", "data=trajectories", "+data@data.like=digits", "teacher=digits",
               "metrics=digits", "method.steps=20", "method.k=10", "method.iterations=1000000",
               "method.refiner=null", "method.refine_iterations=0"],
    "cd": ["method=cd"],
    "ect": ["method=ect"],
}  # fmt: skip
GOALS = {"overhead": 1.05, "sampling": 30.0, "direct": 0.5}


# ---- building ----------------------------------------------------------------------------------------------
def make_trajectories(folder: Path, n: int = 512) -> Path:
    """``n`` digits teacher trajectories (N = 20, pairs at k = 10) for direct distillation."""
    out = folder / "pairs"
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "distillbench.make_trajectories",
                        "teacher=digits", "steps=20", "indices=[10]", f"n={n}", "threads=2",
                        f"out_dir={out}", f"hydra.run.dir={folder / 'make_pairs'}"],
                       check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    return out


def build_run(method: str, folder: Path, pairs: Path | None):
    """The train command's objects (method, data, trainer with its callbacks) for ``method``."""
    from hydra import compose, initialize_config_dir

    from distillbench.config import CONFIG_DIR
    from distillbench.train import build

    extra = [f"data.root={pairs}"] if method == "direct" else []
    overrides = [*COMMON, *METHODS[method], *extra, f"paths.output_dir={folder / method}"]
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name="train", overrides=overrides)
    return build(cfg)


def framework_seconds(run, warmup: int, steps: int, context=None) -> float:
    timer = BatchTimer(warmup, steps, context)
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.method, datamodule=run.train_data)
    return timer.seconds / steps


class Interleaved(L.Callback):
    """Alternates step by step: after each framework step (timed from the end of the previous bare step to
    the end of the batch, so Lightning's loop counts) one bare step runs, timed alone. Machine speed drifts
    within seconds here, so adjacent pairs compare far better than separate blocks. ``warmup`` pairs are
    dropped, then ``steps`` pairs are kept and the trainer stopped."""

    def __init__(self, bare_step, warmup: int, steps: int):
        self.bare_step, self.warmup, self.steps = bare_step, warmup, steps
        self.framework: list[float] = []
        self.bare: list[float] = []
        self.mark = None

    def on_train_batch_end(self, trainer, *args) -> None:
        framework_end = time.perf_counter()
        if self.mark is not None:
            self.framework.append(framework_end - self.mark)
        self.bare_step()
        self.mark = time.perf_counter()
        self.bare.append(self.mark - framework_end)
        if len(self.framework) == self.warmup + self.steps:
            trainer.should_stop = True

    def seconds(self) -> tuple[float, float]:
        """Mean seconds per step of the framework and of the bare loop over the kept pairs."""
        kept = slice(self.warmup, self.warmup + self.steps)
        fw, bare = self.framework[kept], self.bare[kept.start + 1 : kept.stop + 1]
        return sum(fw) / len(fw), sum(bare) / len(bare)


def interleaved_seconds(run, step, warmup: int, steps: int) -> tuple[float, float]:
    timer = Interleaved(step, warmup, steps)
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.method, datamodule=run.train_data)
    return timer.seconds()


def bare_seconds(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bare_loop(name: str, run):
    """The bare counterpart of ``run``'s method and a function doing one of its steps on a fresh batch."""
    method, data = run.method, run.datamodule
    if name in ("sim", "sid", "di"):
        bare, probs = BareScore(method), data.label_distribution
        batch = method.hparams.batch_size
        return bare, lambda: bare.step(torch.multinomial(probs, batch, replacement=True))
    if name in ("dmd2", "sida"):
        bare, (x, labels) = (BareDMD2 if name == "dmd2" else BareSiDA)(method), data.arrays("train")
        batch = method.batch_size

        def step():
            rows = torch.randperm(len(x))[:batch]
            bare.step(x[rows], labels[rows])

        return bare, step
    if name in ("progressive", "cd", "ect"):
        bare = {"progressive": BareProgressive, "cd": BareCD, "ect": BareECT}[name](method)
        x, labels = data.arrays("train")
        batch = data.batch_size

        def step():
            rows = torch.randperm(len(x))[:batch]
            bare.step(x[rows], labels[rows])

        return bare, step
    bare, pairs = BareDirect(method), data.pairs("train")
    batch = data.batch_size

    def step():
        x_k, sigma, _, x_final, labels = default_collate(
            [pairs[int(i)] for i in torch.randperm(len(pairs))[:batch]]
        )
        bare.step(x_k, sigma, x_final, labels)

    return bare, step


# ---- like for like -----------------------------------------------------------------------------------------
@torch.no_grad()
def perturb_fake_score(method, bare, scale: float = 0.05) -> None:
    """Move both fake scores away from the teacher they start as (else SiD's and SIM's losses are 0)."""
    g = torch.Generator().manual_seed(0)
    for p, q in zip(method.fake.parameters(), bare.fake.parameters(), strict=True):
        p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
        q.copy_(p)


def same_losses(name: str, run, bare) -> dict[str, float]:
    """The framework's and the bare loop's losses on the same inputs and random draws (before training)."""
    method, seed = run.method, 1234
    if name in ("sim", "sid", "di"):
        perturb_fake_score(method, bare)
        z = torch.randn(8, *method.sample_shape, generator=torch.Generator().manual_seed(seed))
        labels = torch.arange(8) % method.num_classes if method.num_classes else None
        with torch.no_grad():
            x_g = method.generate(z, labels)
            method.rng = torch.Generator().manual_seed(seed)
            framework = method.generator_loss(x_g, labels).mean()
            ours = bare.generator_loss(x_g, labels, torch.Generator().manual_seed(seed))
            method.rng = torch.Generator().manual_seed(seed)
            fake_framework = edm_loss(
                method.fake, x_g, labels, normal=lambda shape: method.randn(*shape)
            ).mean()
            fake_ours = edm_fake_loss(bare.fake, x_g, labels, torch.Generator().manual_seed(seed))
        return {"framework": float(framework), "bare": float(ours), "fake_framework": float(fake_framework),
                "fake_bare": float(fake_ours)}  # fmt: skip
    if name in ("dmd2", "sida"):
        perturb_fake_score(method, bare)
        x, labels = (t[:8] for t in run.datamodule.arrays("train"))
        z = torch.randn(8, *method.sample_shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            x_g = method.generate(z, labels)
            method.rng = torch.Generator().manual_seed(seed)
            framework = method.generator_loss(x_g, labels).mean()
            ours = bare.generator_loss(x_g, labels, torch.Generator().manual_seed(seed))
            x, labels = (
                t[: method.batch_per_device] for t in run.datamodule.arrays("train")
            )  # a whole batch
            fake_framework = method.fake_loss(x, labels, 0).mean()  # ψ-step 0's stream, keyed by the step
            fake_ours = bare.fake_loss(x, labels, method.stream_for("fake", 0))
        return {"framework": float(framework), "bare": float(ours), "fake_framework": float(fake_framework),
                "fake_bare": float(fake_ours)}  # fmt: skip
    if name == "progressive":
        x, labels = (t[:16] for t in run.datamodule.arrays("train"))
        with torch.no_grad():
            framework = method.distillation_loss(x, labels, torch.Generator().manual_seed(seed)).mean()
            ours = bare.loss(x, labels, torch.Generator().manual_seed(seed))
        return {"framework": float(framework), "bare": float(ours)}
    if name in ("cd", "ect"):  # the bare loop draws from the stream the method draws its step from
        x, labels = (t[:16] for t in run.datamodule.arrays("train"))
        with torch.no_grad():
            framework = method.consistency_loss(x, labels).mean()
            ours = bare.loss(x, labels, method.seeded_stream(0))
        return {"framework": float(framework), "bare": float(ours)}
    x_k, sigma, _, x_final, labels = default_collate([run.datamodule.pairs("train")[i] for i in range(16)])
    with torch.no_grad():
        return {"framework": float(method.stage_loss(x_k, sigma, x_final, labels).mean()),
                "bare": float(bare.loss(x_k, sigma, x_final, labels))}  # fmt: skip


def agree(losses: dict[str, float], rtol: float = 1e-5) -> bool:
    pairs = [("framework", "bare"), ("fake_framework", "fake_bare")]
    return all(abs(losses[a] - losses[b]) <= rtol * max(1.0, abs(losses[a])) for a, b in pairs if a in losses)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def top_operators(prof, steps: int, rows: int = 10) -> list[dict]:
    """The operators taking the most self CPU time per step, with their calls per step."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000 / steps, "calls": e.count / steps}
            for e in events]  # fmt: skip


def profiles(name: str, folder: Path, pairs: Path, steps: int = 5) -> dict:
    """Where the time of ``steps`` timed steps goes, framework (warm, timed window only) and bare."""
    from torch.profiler import ProfilerActivity, profile

    run = build_run(name, folder, pairs)
    _, step = bare_loop(name, run)
    framework = profile(activities=[ProfilerActivity.CPU])
    framework_seconds(run, 2, steps, framework)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as bare:
        for _ in range(steps):
            step()
    return {"framework": top_operators(framework, steps), "bare": top_operators(bare, steps)}


def block_steps(step, args) -> int:
    """Timed steps per block: at least ``--steps``, enough for ``--block-seconds`` (short steps are noisy)."""
    step()
    seconds = bare_seconds(step, 0, 1)
    return max(args.steps, math.ceil(args.block_seconds / seconds))


def overhead(args, folder: Path, pairs: Path) -> dict:
    results = {}
    for name in args.methods:
        ratios, fw_times, bare_times, losses, steps = [], [], [], None, None
        for _ in range(args.repeats):
            run = build_run(name, folder, pairs)
            bare, step = bare_loop(name, run)
            losses = losses or same_losses(name, run, bare)
            steps = steps or block_steps(step, args)
            framework, bare_time = interleaved_seconds(run, step, args.warmup, steps)
            fw_times.append(framework)
            bare_times.append(bare_time)
            ratios.append(framework / bare_time)
        row = {"ratio": spread(ratios), "framework_s": spread(fw_times), "bare_s": spread(bare_times),
               "steps_per_block": steps, "losses": losses, "same_loss": agree(losses)}  # fmt: skip
        row["met"] = row["ratio"]["median"] <= GOALS["overhead"]
        if not row["met"]:
            row["profile"] = profiles(name, folder, pairs)
        results[name] = row
        print(f"overhead {name}: {row['ratio']['median']:.3f}", flush=True)
    return results


# ---- sampling ----------------------------------------------------------------------------------------------
def samples_per_second(sample, z, labels, repeats: int) -> list[float]:
    sample(z[:8], None if labels is None else labels[:8])  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample(z, labels)
        rates.append(len(z) / (time.perf_counter() - start))
    return rates


def sampling(args, folder: Path, pairs: Path) -> dict:
    from distillbench.samplers import DPMSolverPP2MSampler, HeunSampler

    run = build_run("sim", folder, pairs)
    teacher, method = run.teacher, run.method
    z = torch.randn(args.sample_batch, *method.sample_shape)
    labels = torch.arange(args.sample_batch) % method.num_classes if method.num_classes else None
    cases = {"student_1": lambda z, y: method.sample(z, y),
             "heun_35": lambda z, y: HeunSampler(steps=18).sample(teacher, z, y),
             "dpmpp2m_8": lambda z, y: DPMSolverPP2MSampler(steps=8).sample(teacher, z, y),
             "dpmpp2m_20": lambda z, y: DPMSolverPP2MSampler(steps=20).sample(teacher, z, y)}  # fmt: skip
    rates = {name: [] for name in cases}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved: one measurement of each case per round
            for name, fn in cases.items():
                rates[name] += samples_per_second(fn, z, labels, 1)
    heun = statistics.median(rates["heun_35"])
    rows = {name: {"samples_per_second": spread(r), "ratio_to_heun_35": statistics.median(r) / heun}
            for name, r in rates.items()}  # fmt: skip
    rows["student_1"]["met"] = rows["student_1"]["ratio_to_heun_35"] >= GOALS["sampling"]
    return {"batch": args.sample_batch, "rows": rows}


def direct(args, folder: Path, pairs: Path) -> dict:
    from distillbench.samplers import DPMSolverPP2MSampler

    run = build_run("direct", folder, pairs)
    method, teacher = run.method, run.teacher
    z = torch.randn(args.sample_batch, *method.sample_shape)
    labels = torch.arange(args.sample_batch) % method.num_classes if method.num_classes else None
    seven, twenty = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            seven += samples_per_second(lambda z, y: method.generate(z, y, steps=8), z, labels, 1)
            twenty += samples_per_second(lambda z, y: DPMSolverPP2MSampler(steps=20).sample(teacher, z, y), z,
                                         labels, 1)  # fmt: skip
    ratios = [b / a for a, b in zip(seven, twenty, strict=True)]  # wall time 7+1 / wall time 20
    return {"seven_plus_one_per_s": spread(seven), "teacher_20_per_s": spread(twenty),
            "time_ratio": spread(ratios), "met": statistics.median(ratios) <= GOALS["direct"]}  # fmt: skip


# ---- memory ------------------------------------------------------------------------------------------------
def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class SavedBytes:
    """Bytes of the tensors autograd saves for backward, per backward (the activations held at its start)."""

    def __init__(self):
        self.current, self.peaks, self.seen = 0, [], set()

    def pack(self, tensor):
        if tensor.grad_fn is None:  # weights and inputs, not activations
            return tensor
        key = tensor.untyped_storage().data_ptr()
        if key not in self.seen:
            self.seen.add(key)
            self.current += tensor.untyped_storage().nbytes()
        return tensor

    def backward_starts(self) -> None:
        self.peaks.append(self.current)
        self.current, self.seen = 0, set()


def one_network_bytes(teacher, batch: int, labels) -> int:
    """Activations of one teacher network's EDM-loss forward at the batch (the unit of the anatomy)."""
    net = copy.deepcopy(teacher).requires_grad_(True)
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = edm_loss(net, torch.randn(batch, *teacher.sample_shape), labels).mean()
    counter.backward_starts()
    loss.backward()
    return counter.peaks[0]


def probe_memory(name: str, folder: Path, pairs: Path) -> dict:
    """In this (fresh) process: one warm-up step, then two measured ones."""
    run = build_run(name, folder, pairs)
    method, counter = run.method, SavedBytes()
    original = method.step_optimizer

    def step_optimizer(*a, **k):
        counter.backward_starts()
        return original(*a, **k)

    method.step_optimizer = step_optimizer
    state = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, *a):
            if trainer.fit_loop.epoch_loop.batch_progress.total.completed == 1:
                state["rss"] = status_kib("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
                counter.peaks.clear()

    hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)
    run.trainer.callbacks.append(Probe())
    with hooks:
        framework_seconds(run, 1, 2)
    labels = torch.arange(64) % method.num_classes if method.num_classes else None
    unit = one_network_bytes(method.teacher, 64, labels)
    return {"peak_rss_above_start_mib": (status_kib("VmHWM") - state["rss"]) / 1024,
            "held_activations_mib": max(counter.peaks) / 2**20, "one_network_mib": unit / 2**20,
            "networks": max(counter.peaks) / unit}  # fmt: skip


def memory(args, folder: Path) -> dict:
    rows = {}
    for name in args.methods:
        command = [sys.executable, "-m", "benchmarks.run", "--probe-memory", name, "--folder", str(folder)]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            rows[name] = {"error": proc.stderr.strip().splitlines()[-1][:300]}
            continue
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return rows


# ---- throughput --------------------------------------------------------------------------------------------
def teacher_training(args, folder: Path) -> dict:
    """Images per second of ``python -m distillbench.train_teacher data=digits`` (EDM loss, Adam, EMA)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from distillbench.config import CONFIG_DIR
    from distillbench.train_teacher import denoiser_spec

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(
            config_name="train_teacher", overrides=["data=digits", f"paths.output_dir={folder / 'teacher'}"]
        )
    data = instantiate(cfg.data)
    module = instantiate(cfg.training, denoiser=instantiate(denoiser_spec(cfg, data)))
    rates = []
    for _ in range(args.repeats):
        timer = BatchTimer(args.warmup, args.steps)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[timer])  # fmt: skip
        trainer.fit(module, datamodule=data)
        rates.append(args.steps * data.batch_size / timer.seconds)
    return {"batch": data.batch_size, "images_per_second": spread(rates)}


def measure_evaluation(metrics, data, fake, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        metrics.evaluate(fake, data)
        rates.append(len(fake) / (time.perf_counter() - start))
    return rates


def evaluation(args, folder: Path) -> dict:
    """Samples per second of the metric suites (feature extraction and the metrics), real side cached; the
    FID Inception (``make install-inception``, which ``make bench`` runs) on 32 samples, 3 times at most."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from distillbench.config import CONFIG_DIR
    from distillbench.utils.command import config_error_in

    rows = {}
    for suite, n, repeats in (("digits", 2000, args.repeats), ("inception", 32, min(args.repeats, 3))):
        with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
            cfg = compose(config_name="train", overrides=[f"metrics={suite}", f"paths.output_dir={folder}",
                                                          f"paths.cache_dir={folder / 'cache'}"])  # fmt: skip
        data = instantiate(cfg.data)
        try:
            metrics = instantiate(cfg.metrics, n=n, dataset="digits")
            fake = data.real_samples(n, seed=1)[0]
            metrics.evaluate(fake, data)  # real statistics computed and cached here
            rates = measure_evaluation(metrics, data, fake, repeats)
            rows[suite] = {"n": n, "samples_per_second": spread(rates)}
        except Exception as err:  # an optional extractor that is not installed
            cause = config_error_in(err) or err
            rows[suite] = {"n": n, "skipped": f"skipped: {str(cause).splitlines()[0][:200]}"}
    return rows


# ---- report ------------------------------------------------------------------------------------------------
def machine() -> dict:
    import lightning

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__}  # fmt: skip


def fmt(s: dict, digits: int = 3) -> str:
    """median (min–max)"""
    return f"{s['median']:.{digits}g} ({s['min']:.{digits}g}–{s['max']:.{digits}g})"


def table(header: list[str], rows: list[list]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header)] + [
        f"| {' | '.join(str(c) for c in row)} |" for row in rows
    ]


def goal(met: bool) -> str:
    return "met" if met else "MISSED"


def overhead_md(rows: dict) -> list[str]:
    out = ["## 1. Framework overhead (goal ≤ 1.05)", ""]
    header = ["method", "framework s/step", "bare s/step", "ratio", "steps per block", "same loss", "goal"]
    out += table(header, [
        [name, fmt(r["framework_s"]), fmt(r["bare_s"]), fmt(r["ratio"]), r["steps_per_block"],
         "yes" if r["same_loss"] else "NO", goal(r["met"])]
        for name, r in rows.items()
    ])  # fmt: skip
    for name, r in rows.items():
        for side in ("framework", "bare") if "profile" in r else ():
            ops = ", ".join(
                f"{p['op']} {p['self_ms']:.1f} ms ×{p['calls']:.0f}" for p in r["profile"][side][:6]
            )
            out += ["", f"Profile of {name}, {side} (self CPU time per step, profiled): {ops}"]
    return out + [""]


def sampling_md(r: dict) -> list[str]:
    out = [f"## 2. Sampling at batch {r['batch']} (goal: the one-step student ≥ 30× Heun at 35 NFE)", ""]
    rows = [
        [name, fmt(row["samples_per_second"]), f"{row['ratio_to_heun_35']:.3g}"]
        for name, row in r["rows"].items()
    ]
    out += table(["sampler", "samples/s", "× Heun 35 NFE"], rows)
    return out + ["", f"One-step student: {goal(r['rows']['student_1']['met'])}.", ""]


def direct_md(d: dict) -> list[str]:
    return [
        "## 3. Direct distillation 7 + 1 against the teacher's 20 steps (goal ≤ 0.5× the wall time)",
        "",
        f"7 + 1: {fmt(d['seven_plus_one_per_s'])} samples/s; teacher, 20 DPM-Solver++ steps: "
        f"{fmt(d['teacher_20_per_s'])} samples/s; wall-time ratio {fmt(d['time_ratio'])}: {goal(d['met'])}.",
        "",
    ]


def memory_md(rows: dict) -> list[str]:
    out = ["## 4. Memory of one training step (a fresh process per method, batch 64)", ""]
    header = ["method", "peak RSS above the step's start (MiB)", "activations held at a backward (MiB)",
              "in teacher networks"]  # fmt: skip
    body = [memory_row(name, r) for name, r in rows.items()]
    unit = next((r["one_network_mib"] for r in rows.values() if "one_network_mib" in r), float("nan"))
    note = (f"One teacher network's EDM-loss activations at batch 64: {unit:.1f} MiB. docs/algorithms.md §8: "
            "SiD and SIM hold about three networks' activations, DI one.")  # fmt: skip
    return out + table(header, body) + ["", note, ""]


def memory_row(name: str, r: dict) -> list:
    if "error" in r:
        return [name, f"error: {r['error']}", "", ""]
    held = f"{r['held_activations_mib']:.1f}"
    return [name, f"{r['peak_rss_above_start_mib']:.0f}", held, f"{r['networks']:.2f}"]


def throughput_md(t: dict) -> list[str]:
    out = ["## 5. Throughput", ""]
    out.append(f"- teacher training (digits, batch {t['teacher']['batch']}): "
               f"{fmt(t['teacher']['images_per_second'])} images/s")  # fmt: skip
    for suite, row in t["evaluation"].items():
        value = (
            f"{fmt(row['samples_per_second'])} samples/s" if "samples_per_second" in row else row["skipped"]
        )
        out.append(f"- evaluation, {suite} features (n = {row['n']}): {value}")
    return out + [""]


SECTIONS_MD = {"overhead": overhead_md, "sampling": sampling_md, "direct": direct_md, "memory": memory_md,
               "throughput": throughput_md}  # fmt: skip


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [
        f"# Benchmarks ({r['started']}, {r.get('seconds', 0):.0f} s)",
        "",
        f"{m['processor']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Lightning {m['lightning']}, Python {m['python']}. Median (min–max) over "
        f"{r['settings']['repeats']} interleaved repeats; regenerate with `make bench`.",
        "",
    ]
    for name, section in SECTIONS_MD.items():
        if name in r:
            out += section(r[name])
    return "\n".join(out)


def write(results: dict, out: Path) -> None:
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "RESULTS.md", markdown(results))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed block")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per block, at least")
    p.add_argument("--block-seconds", type=float, default=4.0, help="seconds per timed block, about")
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--sections", nargs="+", default=["overhead", "sampling", "direct", "memory", "throughput"]
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    p.add_argument("--folder", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import warnings

    from distillbench.utils.command import quiet_known_warnings

    quiet_known_warnings()
    warnings.filterwarnings("ignore")
    with contextlib.ExitStack() as stack:
        folder = args.folder or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        pairs = make_trajectories(folder)
        if args.probe_memory:
            print(json.dumps(probe_memory(args.probe_memory, folder, pairs)))
            return {}
        start = time.perf_counter()
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        results = {
            "started": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": machine(),
            "settings": settings,
        }
        sections = {
            "overhead": lambda: overhead(args, folder, pairs),
            "sampling": lambda: sampling(args, folder, pairs),
            "direct": lambda: direct(args, folder, pairs),
            "memory": lambda: memory(args, folder),
            "throughput": lambda: {
                "teacher": teacher_training(args, folder),
                "evaluation": evaluation(args, folder),
            },
        }
        for name in args.sections:
            results[name] = sections[name]()
            results["seconds"] = time.perf_counter() - start
            write(results, args.out)
        print((args.out / "RESULTS.md").read_text())
        return results


if __name__ == "__main__":
    main()
