"""The scale/shift convolution: one class for the pre-train (plain) and meta-train (SS) forms.

Meta-Transfer Learning freezes every pre-trained conv and learns, per conv, a ``scale`` with one
entry per kernel (shape ``(out, in, 1, 1)``, initialised to 1) and, where the conv has a bias, a
``shift`` (shape ``(out,)``, initialised to 0)::

    W' = W * scale        b' = b + shift

Both forms keep the conv's own ``weight`` / ``bias`` under the same state-dict keys, so a
pre-trained plain state dict loads into the SS form as is (only ``scale`` / ``shift`` are missing),
and with scale 1 / shift 0 the SS output equals the plain output bit for bit (``x * 1.0 == x``).
"""
from __future__ import annotations

import torch
from torch import nn


class SSConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, when built with ``ss=True``, applies a learnable scale/shift.

    Plain form (``ss=False``): exactly ``nn.Conv2d``; ``scale`` and ``shift`` are ``None`` and absent
    from the state dict. SS form (``ss=True``): ``weight`` (and ``bias``) are frozen
    (``requires_grad=False``) and the forward uses ``weight * scale`` and ``bias + shift``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        *,
        ss: bool = False,
        **conv_kwargs,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=bias, **conv_kwargs)
        self.ss = bool(ss)
        if self.ss:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
            self.scale = nn.Parameter(torch.ones(out_channels, in_channels // self.groups, 1, 1))
            shift = nn.Parameter(torch.zeros(out_channels)) if bias else None
            self.register_parameter("shift", shift)
        else:
            self.register_parameter("scale", None)
            self.register_parameter("shift", None)

    def effective_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the convolution actually uses (scaled/shifted in the SS form)."""
        if not self.ss:
            return self.weight, self.bias
        weight = self.weight * self.scale
        bias = None if self.bias is None else self.bias + self.shift
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ss:
            return super().forward(x)
        weight, bias = self.effective_weight_and_bias()
        return self._conv_forward(x, weight, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", ss=True" if self.ss else "")
