"""distillbench: diffusion-distillation methods on equal terms."""

__version__ = "0.1.0"

from distillbench import config as _config  # noqa: F401  (registers OmegaConf resolvers)
