"""What every backbone class is built from: the ``Backbone`` base class, the width multiplier and
the reference initialisation.

A backbone maps images ``(B, 3, H, W)`` to features ``(B, out_dim)`` (global average pool, so any
``H, W >= 16`` works). ``Backbone.config`` (name, width) is all a checkpoint needs to rebuild the
architecture. The forward is two halves, ``forward_trunk`` (every block but the last) then
``forward_head`` (the last residual block and the pool), so ablation arms can adapt or meta-learn
the last block alone.

The concrete backbones (resnet12, resnet25) import this module, and :mod:`mtl.models.backbone`
imports them to build one by name: the shared base lives here so neither import needs the other.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mtl.errors import ConfigError

MIN_INPUT_SIZE = 16


def scaled_channels(channels: int, width: float) -> int:
    """Channel count under a width multiplier: rounded, never below 1 (width 0.125 for tests)."""
    return max(1, int(round(channels * width)))


def check_width(width: float) -> float:
    """Return ``width`` as a float, or raise ConfigError for a non-positive / non-finite value."""
    try:
        value = float(width)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"backbone width must be a positive number (1.0 = the published network), "
                          f"got {width!r}; set backbone.width in config.yaml")
    return value


class Backbone(nn.Module):
    """Base class of the feature extractors; subclasses set ``name``, ``native_size``, ``out_dim``."""

    name: str = ""
    native_size: int = 0
    #: the attribute holding the last residual block (the paper's Theta_4 for ResNet-12)
    last_stage_name: str = ""

    def __init__(self, *, width: float = 1.0, ss: bool = False) -> None:
        super().__init__()
        self.width = check_width(width)
        self.ss = bool(ss)
        self.out_dim = 0
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_trunk(x))

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the feature map entering the last residual block."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's feature map -> features ``(B, out_dim)``: last residual block, average pool."""
        return torch.flatten(self.avgpool(self.last_stage()(x)), 1)

    def last_stage(self) -> nn.Module:
        return getattr(self, self.last_stage_name)

    @property
    def config(self) -> dict:
        """What a checkpoint stores to rebuild this architecture (``ss`` is chosen at load time)."""
        return {"name": self.name, "width": self.width}

    def check_input(self, x: torch.Tensor) -> None:
        """Fail early, with the shape seen, on input that would break deep in the network."""
        if x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"{self.name} expects float images (B, 3, H, W) with H, W >= "
                             f"{MIN_INPUT_SIZE} (native {self.native_size}), got {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"width={self.width}, ss={self.ss}, out_dim={self.out_dim}"



def init_conv_and_bn(model: nn.Module, *, nonlinearity: str = "relu", a: float = 0.0) -> None:
    """Reference init: conv weights kaiming_normal(fan_out), BN gamma 1 / beta 0 (biases untouched)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, a=a, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(module, _BatchNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

