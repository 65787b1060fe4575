"""Building a backbone by name, and the meta-phase helpers built on SSConv2d.

What every backbone shares (the ``Backbone`` base class, the width multiplier, the reference
init) lives in :mod:`mtl.models.blocks`, which the concrete backbones import; this module imports
them in turn, so the dependency runs one way. ``Backbone.config`` (name, width) is all a checkpoint
needs to rebuild the architecture: ``build_backbone(**model.config, ss=...)``. Ablation arms adapt
or meta-learn the whole encoder or its last residual block alone (:func:`encoder_part`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mtl.errors import ConfigError
from mtl.methods import ALL, LAST
from mtl.models.blocks import Backbone
from mtl.models.resnet12 import ResNet12
from mtl.models.resnet25 import ResNet25
from mtl.models.ss_conv import SSConv2d


def backbone_classes() -> dict[str, type[Backbone]]:
    """Known backbones by name."""
    return {"resnet12": ResNet12, "resnet25": ResNet25}


def build_backbone(name: str, *, width: float = 1.0, ss: bool = False) -> Backbone:
    """Build ``resnet12`` (the paper's, 84x84 -> 512-d) or ``resnet25`` (PyTorch reference, 80x80 -> 640-d).

    ``ss=False`` gives the pre-train form, ``ss=True`` the meta form with frozen convs and
    scale/shift parameters; both share state-dict keys for conv weights/biases and BN.
    """
    return backbone_class(name)(width=width, ss=ss)


def backbone_class(name: str) -> type[Backbone]:
    """The class of backbone ``name`` (its ``native_size`` without building it), or a ConfigError."""
    classes = backbone_classes()
    if name not in classes:
        raise ConfigError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(classes))} "
                          f"(set backbone.name in config.yaml)")
    return classes[name]


def ss_convs(model: nn.Module) -> list[SSConv2d]:
    """The convs of ``model`` that are in the SS form."""
    return [m for m in model.modules() if isinstance(m, SSConv2d) and m.ss]


def meta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters meta-training updates: every ``scale``, every ``shift`` and every BN gamma/beta.

    The reference trains BN affine together with the scales (docs/reference-implementation.md). Order is the
    module order, each parameter once, so optimiser state lines up across runs.
    """
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, SSConv2d) and module.ss:
            params += [p for p in (module.scale, module.shift) if p is not None]
        elif isinstance(module, _BatchNorm) and module.affine:
            params += [module.weight, module.bias]
    unique = {id(p): p for p in params}
    return list(unique.values())


def encoder_part(model: Backbone, scope: str) -> nn.Module:
    """The part of ``model`` an arm adapts: ``all`` (the model) or ``last`` (its last residual block)."""
    if scope == ALL:
        return model
    if scope == LAST:
        return model.last_stage()
    raise ConfigError(f"Unknown value '{scope}' for argument scope. Valid values are {{{ALL}, {LAST}}}.")


def freeze_for_meta(model: nn.Module, scope: str = ALL) -> list[nn.Parameter]:
    """Make exactly :func:`meta_parameters` of ``encoder_part(model, scope)`` require grad and
    freeze everything else; return them.

    Raises ValueError on a model without SS convs: meta-training it would silently train BN only.
    """
    if not ss_convs(model):
        raise ValueError("freeze_for_meta needs a model built with ss=True (no scale/shift convs "
                         "found); build it with build_backbone(..., ss=True) and load the "
                         "pre-trained state into it")
    model.requires_grad_(False)
    params = meta_parameters(encoder_part(model, scope))
    for param in params:
        param.requires_grad_(True)
    return params


def fold_scales(model: Backbone) -> Backbone:
    """A plain backbone computing the same function: ``W * scale`` and ``b + shift`` folded in.

    Used to embed images fast at meta-test time (no per-forward weight products). BN parameters
    and running statistics are copied (cloned, so later updates of ``model`` do not leak in); the
    result lives on the same device/dtype and has the same train/eval mode as ``model``.
    """
    if not isinstance(model, Backbone) or not model.ss:
        raise ValueError("fold_scales expects a Backbone built with ss=True, "
                         f"got {type(model).__name__} (ss={getattr(model, 'ss', None)})")
    state = {key: value.detach().clone() for key, value in model.state_dict().items()
             if not key.endswith((".scale", ".shift"))}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, SSConv2d) and module.ss:
                weight, bias = module.effective_weight_and_bias()
                state[f"{name}.weight"] = weight.detach().clone()
                if bias is not None:
                    state[f"{name}.bias"] = bias.detach().clone()
    with torch.device("meta"):
        plain = build_backbone(**model.config, ss=False)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.train(model.training)


def fold_batchnorm(model: Backbone) -> Backbone:
    """Fold every eval-mode BatchNorm into the conv before it, in place; returns ``model``.

    ``conv -> bn`` becomes one conv with ``W * g`` and ``(b - mean) * g + beta``, ``g = gamma /
    sqrt(var + eps)``, and the BN an ``nn.Identity``. Pairs are found by registration order (a
    BatchNorm registered right after a conv, in the same parent, normalises that conv's output),
    which holds for every backbone of ``build_backbone`` (tests check each one's output). Only valid
    in eval mode: a train-mode BN normalises with batch statistics.
    """
    if not isinstance(model, Backbone) or model.ss:
        raise ValueError("fold_batchnorm expects a plain Backbone (fold_scales an SS one first), "
                         f"got {type(model).__name__} (ss={getattr(model, 'ss', None)})")
    with torch.no_grad():
        for parent in list(model.modules()):
            children = list(parent.named_children())
            for (_, conv), (bn_name, bn) in zip(children, children[1:]):
                if _foldable(conv, bn):
                    _fold_pair(conv, bn)
                    setattr(parent, bn_name, nn.Identity())
    return model


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and not getattr(conv, "ss", False) and isinstance(bn, nn.BatchNorm2d)
            and bn.track_running_stats and bn.num_features == conv.out_channels)


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    # in float64, so the folded conv adds no rounding of its own beyond the final cast
    gain = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.affine:
        gain = gain * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(gain)
    bias = (bias - bn.running_mean.double()) * gain + (bn.bias.double() if bn.affine else 0.0)
    conv.weight.copy_((conv.weight.double() * gain.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for embedding without gradients; ``model`` itself is not touched.

    Eval mode, no parameter requiring grad, weights in ``channels_last`` (feed it channels_last
    input); for our backbones also scales (SS form) and BatchNorm folded into the convs. It computes
    the same function as ``model.eval()`` to float rounding, and on a CPU about 1.9x faster
    (bench/RESULTS.md, section "Inference on the CPU").
    """
    # deepcopy, not a rebuild on the meta device: that one costs ~1.4 s the first time in a process
    fast = fold_scales(model) if isinstance(model, Backbone) and model.ss else copy.deepcopy(model)
    for param in fast.parameters():
        param.grad = None
    if isinstance(fast, Backbone):
        fold_batchnorm(fast.eval())
    fast.eval().requires_grad_(False)
    return fast.to(memory_format=torch.channels_last)
