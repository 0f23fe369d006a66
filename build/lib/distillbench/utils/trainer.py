"""Lightning's Trainer with the speed settings that the GPU check chose (docs/performance.md): the networks
it fits in channels_last layout and compiled with torch.compile.

Both act on the networks, not the loop, so they are set once, before ``fit``: the module's 4-d weights are
put in NHWC order (convolutions then keep their activations in it), and the backbone ``net`` of every
:class:`~distillbench.teachers.denoiser.EDMDenoiser` in the module, and of a distillation method's teacher
(which stays outside the module tree), is compiled in place, so parameter names and checkpoints do not
change. The EDM preconditioning stays eager and in fp32.
"""

from __future__ import annotations

import lightning as L
import torch

from distillbench.methods.base import DistillationMethod
from distillbench.teachers.denoiser import EDMDenoiser


def denoisers(module: torch.nn.Module) -> list[EDMDenoiser]:
    """Every EDM denoiser a module runs: those in its tree, and a distillation method's frozen teacher."""
    roots = [module, module.teacher] if isinstance(module, DistillationMethod) else [module]
    found = {id(m): m for root in roots for m in root.modules() if isinstance(m, EDMDenoiser)}
    return list(found.values())


def accelerate(module: torch.nn.Module, compiled: bool, channels_last: bool, backend: str = "inductor"):
    """Lay out and compile ``module``'s networks as asked (see the module docstring)."""
    for root in {id(d): d for d in [module, *denoisers(module)]}.values():
        if channels_last:
            root.to(memory_format=torch.channels_last)
    if compiled:
        for denoiser in denoisers(module):
            denoiser.net.compile(backend=backend, dynamic=False)


class Trainer(L.Trainer):
    """``lightning.pytorch.Trainer`` plus ``compile`` and ``channels_last`` (both off by default; on in
    ``trainer=gpu``) and the ``compile_backend`` of torch.compile."""

    def __init__(self, *args, compile: bool = False, channels_last: bool = False,
                 compile_backend: str = "inductor", **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.compile_networks, self.channels_last = compile, channels_last
        self.compile_backend = compile_backend

    def fit(self, model, *args, **kwargs):
        accelerate(model, self.compile_networks, self.channels_last, self.compile_backend)
        return super().fit(model, *args, **kwargs)
