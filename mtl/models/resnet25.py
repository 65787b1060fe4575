"""ResNet-25: the backbone of the public PyTorch MTL implementation (docs/reference-implementation.md, section 2).

Fixed by the reference (kept exactly, verified by the parameter-count test at width 1):
- stem: conv3x3 3->80 *with* bias, BN, ReLU (stride 1);
- three stages of four BasicBlocks (conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU) with
  160/320/640 channels; the first block of each stage has stride 2 and a 1x1 conv (no bias) + BN
  downsample; block convs have no bias;
- 80x80 input -> 40/20/10 -> average pool -> 640-d (the reference's AvgPool(10); we use an
  adaptive average pool, identical at 80x80, so any input >= 16 works);
- scale/shift on every conv, stem and downsample included; shift only on the stem (the only bias);
- init: conv kaiming_normal(fan_out, relu); BN gamma 1, beta 0; the stem bias keeps PyTorch's
  default init, as in the reference (which initialises only conv weights).

Ours: the width multiplier (channels * width, rounded, min 1) for fast tests.
State-dict keys follow the reference module names (conv1, bn1, layer1..3, downsample.0/1).
"""
from __future__ import annotations

import torch
from torch import nn

from mtl.models.blocks import Backbone, init_conv_and_bn, scaled_channels
from mtl.models.ss_conv import SSConv2d

STEM_CHANNELS = 80
STAGE_CHANNELS = (160, 320, 640)
BLOCKS_PER_STAGE = 4


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (possibly downsampled) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, ss: bool) -> None:
        super().__init__()
        self.conv1 = SSConv2d(in_channels, out_channels, 3, stride, 1, bias=False, ss=ss)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = SSConv2d(out_channels, out_channels, 3, 1, 1, bias=False, ss=ss)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                SSConv2d(in_channels, out_channels, 1, stride, 0, bias=False, ss=ss),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet25(Backbone):
    """The reference ResNet-25 (80x80 -> 640-d at width 1)."""

    name = "resnet25"
    native_size = 80
    last_stage_name = "layer3"

    def __init__(self, *, width: float = 1.0, ss: bool = False) -> None:
        super().__init__(width=width, ss=ss)
        stem = scaled_channels(STEM_CHANNELS, self.width)
        self.conv1 = SSConv2d(3, stem, 3, 1, 1, bias=True, ss=ss)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        in_channels = stem
        for index, channels in enumerate(STAGE_CHANNELS, start=1):
            out_channels = scaled_channels(channels, self.width)
            self.add_module(f"layer{index}", self._make_stage(in_channels, out_channels, ss))
            in_channels = out_channels
        self.out_dim = in_channels
        init_conv_and_bn(self, nonlinearity="relu")

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, ss: bool) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, 2, ss=ss)]
        blocks += [BasicBlock(out_channels, out_channels, 1, ss=ss) for _ in range(BLOCKS_PER_STAGE - 1)]
        return nn.Sequential(*blocks)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer2(self.layer1(x))
