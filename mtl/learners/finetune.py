"""Test-time fine-tuning of a network part with the base learner (ablation arms ``ft_last``, ``ft_all``).

On each test episode, a fresh linear learner (the ``ft`` initialisation, drawn from the same
generator in the same episode order) and a copy of the encoder part named by ``scope`` (``last``:
the last residual block; ``all``: the whole network) take ``steps`` plain SGD steps together on
the support set's mean cross-entropy (learner at ``lr``, encoder part at ``encoder_lr``); then the
query images are classified by the adapted network. BN stays in eval mode (the pre-trained running
statistics; its affine parameters adapt with the rest of the part): five support images are no
batch to estimate statistics from.

Batched and bounded: the frozen trunk (every block before the adapted part) embeds each image of a
chunk of episodes once; the chunk's episodes are then adapted together, each with its own copy of
the part, through ``torch.func`` (``vmap`` over episodes of ``grad`` of the support loss). Memory
grows with the chunk x support size x the part's activations, not with the number of episodes:
the chunk is sized from one image's activations to stay within :data:`MEMORY_BUDGET_BYTES`. On a
CPU a chunk is one episode (:data:`CPU_MAX_CHUNK`: a batched episode's result would depend on its
chunk, to rounding that the steps amplify). With ``encoder_lr`` 0 this is ``ft`` exactly (a test checks it).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mtl.base_learner import linear_logits
from mtl.learners.base import Classifier, Learner
from mtl.learners.linear import FreshDraws
from mtl.methods import ALL, LAST
from mtl.models.backbone import Backbone, encoder_part
from mtl.rng import Purpose

log = logging.getLogger(__name__)

#: Activation memory one chunk of episodes may hold for its backward pass (estimated, see
#: :func:`episodes_per_chunk`).
MEMORY_BUDGET_BYTES = 4 * 2**30
#: Activations kept for the backward pass plus their gradients, relative to the forward outputs.
_BACKWARD_FACTOR = 3
#: On a CPU each episode is adapted alone. Batched, an episode's convolutions run as one grouped
#: convolution over the chunk, whose rounding differs from a plain one (1e-7 after one step); 100
#: steps of ``ft_all`` grow that to 1e-4 in the weights and 1e-2 in a query's probability, so an
#: episode's result would depend on which episodes share its chunk, and a prediction on the same
#: support set (adapted alone, :mod:`mtl.predict`) would differ from evaluate's (tests/test_predict.py).
#: The cost: chunk 1 is 1.5x slower than the fastest chunk (16) on a CPU (bench/RESULTS.md,
#: bench/finetune.py). The batching is for GPUs (many small kernels per step), where it keeps that
#: rounding: there an episode's result depends on its chunk to rounding amplified by the steps.
CPU_MAX_CHUNK = 1


class Trunk(nn.Module):
    """The frozen part before the adapted one: images -> its input (identity for ``all``)."""

    def __init__(self, backbone: Backbone, scope: str):
        super().__init__()
        self.backbone, self.scope = backbone, scope

    def forward(self, x):
        return x if self.scope == ALL else self.backbone.forward_trunk(x)


class _Head(nn.Module):
    """The adapted part: the trunk's output -> features (the whole backbone for ``all``)."""

    def __init__(self, backbone: Backbone, scope: str):
        super().__init__()
        self.backbone, self.scope = backbone, scope

    def forward(self, x):
        return self.backbone(x) if self.scope == ALL else self.backbone.forward_head(x)


def adapted_parameter_names(backbone: Backbone, scope: str) -> list[str]:
    """Names (in ``backbone.named_parameters()``) of the parameters fine-tuning updates."""
    part = {id(p) for p in encoder_part(backbone, scope).parameters()}
    return [name for name, param in backbone.named_parameters() if id(param) in part]


def adapt_on_support(backbone: Backbone, scope: str, support_x: torch.Tensor, support_y: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor, *, steps: int, lr: float,
                     encoder_lr: float) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Adapt E episodes at once: per-episode copies of the part's parameters and the learners.

    ``support_x`` (E, S, ...) is the trunk's output for each episode's support images (the images
    for ``all``), ``support_y`` (S,) their labels, ``weight``/``bias`` (E, way, D)/(E, way) the
    initial learners. Returns ({name: (E, ...) adapted parameter}, weight, bias), names as in
    :func:`adapted_parameter_names`. ``backbone`` itself is left unchanged.
    """
    head = _Head(backbone, scope).eval()  # functional_call keys carry the "backbone." prefix
    names = adapted_parameter_names(backbone, scope)
    own = dict(backbone.named_parameters())
    episodes = support_x.shape[0]
    params = {name: own[name].detach().unsqueeze(0).expand(episodes, *own[name].shape) for name in names}

    def support_loss(part_params, w, b, x):
        feats = functional_call(head, {f"backbone.{k}": v for k, v in part_params.items()}, (x,))
        return F.cross_entropy(feats @ w.T + b, support_y)

    gradients = vmap(grad(support_loss, argnums=(0, 1, 2)))
    requires_grad = {name: p.requires_grad for name, p in own.items()}
    backbone.requires_grad_(False)  # only the per-episode copies are differentiated
    try:
        with torch.no_grad():  # grad() differentiates inside; nothing outside needs a graph
            for _ in range(steps):
                g_params, g_w, g_b = gradients(params, weight, bias, support_x)
                params = {k: v - encoder_lr * g_params[k] for k, v in params.items()}
                weight, bias = weight - lr * g_w, bias - lr * g_b
    finally:
        for name, param in own.items():
            param.requires_grad_(requires_grad[name])
    return params, weight, bias


def query_features(backbone: Backbone, scope: str, params: dict, query_x: torch.Tensor) -> torch.Tensor:
    """(E, Q, D) features of each episode's queries through its own adapted part."""
    head = _Head(backbone, scope).eval()

    def forward(part_params, x):
        return functional_call(head, {f"backbone.{k}": v for k, v in part_params.items()}, (x,))

    with torch.no_grad():
        return vmap(forward)(params, query_x)


def episodes_per_chunk(backbone: Backbone, scope: str, part_input: torch.Tensor, support_size: int,
                       budget: int = MEMORY_BUDGET_BYTES) -> int:
    """Episodes whose support sets fit ``budget`` when adapted together: the bytes every layer of
    the adapted part outputs for one image (``part_input``, shape (1, ...)), times the backward
    factor and the support size; at least 1."""
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel() * out.element_size()))
             for m in encoder_part(backbone, scope).modules() if not list(m.children())]
    try:
        with torch.no_grad():
            _Head(backbone, scope).eval()(part_input)
    finally:
        for hook in hooks:
            hook.remove()
    per_episode = _BACKWARD_FACTOR * support_size * (sum(outputs) + part_input.numel() * part_input.element_size())
    return max(1, int(budget // per_episode))


class FinetuneLearner(Learner):
    """``ft_last`` / ``ft_all``: a fresh linear head (the ``ft`` draws) and a per-episode copy of the
    encoder part ``scope`` adapted together (:func:`adapt_on_support`); the trunk before the part
    embeds the images (:class:`Trunk`)."""

    frozen_features = False

    def __init__(self, backbone: Backbone, scope: str, *, steps: int, lr: float, encoder_lr: float, seed: int,
                 purpose: Purpose = Purpose.TEST_LEARNERS):
        if scope not in (ALL, LAST):
            raise ValueError(f"scope must be '{ALL}' or '{LAST}', got {scope!r}")
        super().__init__(backbone.eval())
        self.scope, self.steps, self.lr, self.encoder_lr = scope, steps, lr, encoder_lr
        self.draws = FreshDraws(seed, purpose)

    def embedder(self) -> nn.Module:
        return Trunk(self.backbone, self.scope)

    def episodes_per_chunk(self, sample_input: torch.Tensor, support_size: int, query_size: int) -> int:
        backbone = self.backbone.to(sample_input.device)
        chunk = episodes_per_chunk(backbone, self.scope, sample_input, support_size)
        if sample_input.device.type == "cpu":
            chunk = min(chunk, CPU_MAX_CHUNK)
        log.info("fine-tuning %s: %d episodes per chunk (memory budget %.1f GiB)", self.scope, chunk,
                 MEMORY_BUDGET_BYTES / 2**30)
        return chunk

    def fit(self, support: torch.Tensor, labels, n_classes: int, *, first_episode: int = 0) -> Classifier:
        backbone = self.backbone.to(support.device)
        weight, bias = self.draws.take(first_episode, support.shape[0], n_classes, backbone.out_dim, support.device)
        params, weight, bias = adapt_on_support(backbone, self.scope, support, torch.as_tensor(labels).long(), weight,
                                                bias, steps=self.steps, lr=self.lr, encoder_lr=self.encoder_lr)
        return lambda query: linear_logits(query_features(backbone, self.scope, params, query), weight, bias)
