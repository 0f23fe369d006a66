"""Multi-process training: DDP per trainable network, Lightning's ``ddp`` launches inside Hydra sweeps, and
a clean process between sweep jobs (docs/scale-out.md; Lightning #11300, Hydra #2070).

- :class:`NetworkDDPStrategy` wraps each trainable network a method names in ``ddp_networks`` in its own
  ``DistributedDataParallel`` instead of one DDP around the whole LightningModule. A score method updates
  the fake score ψ and then the generator θ within one step, and direct distillation trains one of its two
  networks per stage: one DDP around everything sees parameters without gradients and fails ("unused
  parameters"), or needs ``find_unused_parameters`` and its extra graph traversal. Per network, each
  backward reduces exactly the network it trains. The frozen teacher is outside the module tree.
- Lightning's ``popen`` launcher restarts ranks 1.. with the parent's command line, so under ``-m`` every
  child would start a sweep of its own (Lightning #11300, Hydra #2070). :func:`hydra_job_command` gives a
  child the job's own overrides, ``hydra.mode=RUN`` and the job's folder instead.
- :func:`distributed_state_reset` destroys the process group and restores the rank variables after a job,
  so the next job of a sweep (perhaps on another device count) starts as a fresh process would.
- :func:`slurm_plugins`: under SLURM, Lightning saves an HPC checkpoint and requeues the job on the signal
  that the launcher asked SLURM to send before the time limit; the requeued job runs in the same folder
  and Lightning resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script
from torch.nn.parallel import DistributedDataParallel

from distillbench.methods.base import DistillationMethod

#: what Lightning and launchers set for a distributed job; restored after every job
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK",
                   "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "OMP_NUM_THREADS")  # fmt: skip


def is_rank_zero() -> bool:
    """True in the process that writes a run's files (rank 0, or the only process)."""
    return getattr(rank_zero_only, "rank", 0) == 0


class NetworkDDP(DistributedDataParallel):
    """DDP around one network; the network's own attributes (``sigma_data``, ...) stay reachable."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def trainable(module: torch.nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


class NetworkDDPStrategy(DDPStrategy):
    """Lightning's DDP strategy with one DDP per trainable network of the method (``ddp_networks``).

    A module without ``ddp_networks`` gets Lightning's usual single DDP. With ``start_method="popen"`` (the
    default) under Hydra, children run their own sweep job (see :func:`hydra_job_command`).
    """

    def configure_ddp(self) -> None:
        module = self.model
        names = module.ddp_networks if isinstance(module, DistillationMethod) else None
        if not names:
            return super().configure_ddp()
        device_ids = self.determine_ddp_device_ids()
        wrapped = {name: NetworkDDP(getattr(module, name), device_ids=device_ids, **self._ddp_kwargs)
                   for name in names if trainable(getattr(module, name))}  # fmt: skip
        module.attach_ddp(wrapped)

    def teardown(self) -> None:
        module = self.lightning_module
        if isinstance(module, DistillationMethod):
            module.attach_ddp({})
        super().teardown()

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method == "popen":
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


class HydraJobLauncher(subprocess_script._SubprocessScriptLauncher):
    """Lightning's script launcher, whose children run the parent's Hydra job, never a sweep."""

    def _call_children_scripts(self) -> None:
        lightning_command = subprocess_script._hydra_subprocess_cmd
        subprocess_script._hydra_subprocess_cmd = hydra_job_command
        try:
            super()._call_children_scripts()
        finally:
            subprocess_script._hydra_subprocess_cmd = lightning_command


def hydra_job_command(local_rank: int) -> tuple[list[str], str]:
    """The command of rank ``local_rank``: this job's overrides (a sweep's chosen values, no ``-m``), run in
    the job's folder without writing ``.hydra`` again."""
    from hydra.core.hydra_config import HydraConfig

    import __main__

    hydra = HydraConfig.get()
    spec = getattr(__main__, "__spec__", None)
    command = [sys.executable, "-m", spec.name] if spec is not None else [sys.executable, sys.argv[0]]
    command += [*hydra.overrides.task, "hydra.mode=RUN", f'hydra.run.dir="{hydra.runtime.output_dir}"',
                f"hydra.job.name={hydra.job.name}_rank{local_rank}", "hydra.output_subdir=null"]  # fmt: skip
    return command, hydra.runtime.cwd


@contextlib.contextmanager
def distributed_state_reset():
    """Run a job, then leave no process group and the rank variables as they were before it."""
    before = {key: os.environ.get(key) for key in DISTRIBUTED_ENV}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def requeue_signal() -> signal.Signals:
    """The signal SLURM sends before the time limit: submitit's (``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default)
    in a job that submitit started, else USR1 (``sbatch --signal=USR1@120``, Lightning's default)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
    return signal.SIGUSR1


def slurm_plugins() -> list:
    """Lightning's SLURM environment listening to :func:`requeue_signal`, when running under SLURM."""
    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=True, requeue_signal=requeue_signal())]
