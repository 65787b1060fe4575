"""Backbones with scale/shift convs, the pre-train head, and the encoder file format.

- :func:`build_backbone` ``("resnet12" | "resnet25", width=, ss=)`` -> :class:`Backbone`
- :class:`SSConv2d`: one conv class for the plain (pre-train) and SS (meta) forms, same keys
- :func:`meta_parameters` / :func:`freeze_for_meta`: scales, shifts and BN affine only
- :func:`fold_scales`: SS backbone -> equivalent plain backbone, for fast meta-test embedding
- :func:`inference_copy`: scales and BN folded, eval mode, channels_last: what `embed` runs
- :class:`PretrainClassifier`: backbone + Linear(out, 1000)-ReLU-Linear(1000, n)
- :func:`save_encoder` / :func:`load_encoder`: ``{"backbone": config, "state_dict": ...}`` files
"""
from __future__ import annotations

from mtl.models.backbone import (
    Backbone,
    backbone_class,
    build_backbone,
    fold_batchnorm,
    fold_scales,
    freeze_for_meta,
    inference_copy,
    meta_parameters,
)
from mtl.models.blocks import scaled_channels
from mtl.models.encoder_io import load_backbone_state, load_encoder, load_encoder_file, save_encoder
from mtl.models.heads import PretrainClassifier
from mtl.models.resnet12 import ResNet12
from mtl.models.resnet25 import ResNet25
from mtl.models.ss_conv import SSConv2d

__all__ = [
    "Backbone",
    "PretrainClassifier",
    "ResNet12",
    "ResNet25",
    "SSConv2d",
    "backbone_class",
    "build_backbone",
    "fold_batchnorm",
    "fold_scales",
    "freeze_for_meta",
    "inference_copy",
    "load_backbone_state",
    "load_encoder",
    "load_encoder_file",
    "meta_parameters",
    "save_encoder",
    "scaled_channels",
]
