"""ResNet-12: the backbone of the MTL paper and its TensorFlow code (docs/reference-implementation.md, section 2).

Each of the four residual blocks (64/128/256/512 channels)::

    x -> conv3x3(+bias) -> BN -> LeakyReLU(0.1)
      -> conv3x3(+bias) -> BN -> LeakyReLU(0.1)
      -> conv3x3(+bias) -> BN  ---(+)--> LeakyReLU(0.1) -> MaxPool 2x2
    x -> conv1x1 (no bias, no scale/shift) -> BN -----^

84x84 input -> 42/21/10/5 (max-pool, floor) -> global average pool (the TF code's 5x5 average
pool at 84x84) -> 512-d.

Fixed by the paper / TF code: channels 64/128/256/512; three 3x3 convs with bias per block,
leaky ReLU slope 0.1; 1x1 bias-free shortcut conv that never gets scale/shift; sum then 2x2 max
pool (VALID, i.e. floor: 21 -> 10); 5x5 average pool -> 512-d; scale per kernel (out, in, 1, 1)
on the three 3x3 convs; the shift acts on the bias (``b + shift`` with shift 0 equals the TF
"shift initialised from the bias").

Chosen by us (the TF code differs; these follow the common PyTorch ResNet-12):
- the shortcut has a BN after its 1x1 conv (TF: bare 1x1 conv, no BN);
- the third conv's activation comes after the shortcut sum (TF: leaky ReLU on the third conv,
  then the sum, no activation after it);
- BN has a learnable gamma and beta, PyTorch defaults eps 1e-5 / momentum 0.1 (TF contrib
  batch_norm: beta only, eps 1e-3, decay 0.999);
- init kaiming_normal(fan_out, leaky_relu 0.1) for conv weights, zero conv biases (TF: Xavier
  weights, zero biases); BN gamma 1, beta 0;
- no dropout (TF pre-train has an optional dropout after each block, keep-prob 1 at meta time);
- adaptive average pool (any input >= 16) and a width multiplier for fast tests.
"""
from __future__ import annotations

import torch
from torch import nn

from mtl.models.blocks import Backbone, init_conv_and_bn, scaled_channels
from mtl.models.ss_conv import SSConv2d

BLOCK_CHANNELS = (64, 128, 256, 512)
LEAKY_SLOPE = 0.1


class ResBlock12(nn.Module):
    """Three conv3x3-BN(-LeakyReLU) layers plus a 1x1-conv/BN shortcut, then a 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, *, ss: bool) -> None:
        super().__init__()
        self.conv1 = SSConv2d(in_channels, out_channels, 3, 1, 1, bias=True, ss=ss)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = SSConv2d(out_channels, out_channels, 3, 1, 1, bias=True, ss=ss)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = SSConv2d(out_channels, out_channels, 3, 1, 1, bias=True, ss=ss)
        self.bn3 = nn.BatchNorm2d(out_channels)
        # The paper never scales the shortcut: a plain conv, frozen by freeze_for_meta.
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=False)
        if ss:
            self.shortcut[0].weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        return self.pool(out)


class ResNet12(Backbone):
    """The paper's ResNet-12 (84x84 -> 512-d at width 1)."""

    name = "resnet12"
    native_size = 84
    last_stage_name = "layer4"

    def __init__(self, *, width: float = 1.0, ss: bool = False) -> None:
        super().__init__(width=width, ss=ss)
        in_channels = 3
        for index, channels in enumerate(BLOCK_CHANNELS, start=1):
            out_channels = scaled_channels(channels, self.width)
            self.add_module(f"layer{index}", ResBlock12(in_channels, out_channels, ss=ss))
            in_channels = out_channels
        self.out_dim = in_channels
        init_conv_and_bn(self, nonlinearity="leaky_relu", a=LEAKY_SLOPE)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.layer3(self.layer2(self.layer1(x)))
