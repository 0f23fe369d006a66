"""Backbones: plain nn.Modules ``F(x_in, c_noise, labels)`` with no training logic, and the time-embedded
NAFNet ``F(x, t)`` of direct distillation."""

from distillbench.nets.classifier import SmallClassifier
from distillbench.nets.mlp import MLPBackbone
from distillbench.nets.nafnet import NAFNet
from distillbench.nets.songunet import SongUNet
from distillbench.nets.unet import UNetBackbone

__all__ = ["MLPBackbone", "NAFNet", "SmallClassifier", "SongUNet", "UNetBackbone"]
