"""Backbones: plain nn.Modules ``F(x_in, c_noise, labels)`` with no training logic."""

from distillbench.nets.classifier import SmallClassifier
from distillbench.nets.mlp import MLPBackbone
from distillbench.nets.unet import UNetBackbone

__all__ = ["MLPBackbone", "SmallClassifier", "UNetBackbone"]
