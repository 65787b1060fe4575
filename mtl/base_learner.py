"""The linear base learner, batched over episodes: pre-train validation, meta-train, meta-test.

A base learner is a linear classifier ``logits = x @ W.T + b`` (way x D) trained by ``steps`` plain
SGD steps (lr ``lr``) on the support set's mean cross-entropy, as in the reference. The gradient
is analytic (for softmax cross-entropy, dL/dlogits = (softmax - onehot) / S), so E episodes are
adapted at once with ``torch.bmm`` and no autograd tape; it is exactly the per-episode computation
(tests compare it with a loop of ``F.cross_entropy`` + autograd).

Three modes of ``adapt_linear``:

* ``create_graph=False`` (evaluation, default): runs under ``torch.no_grad``; the result is detached.
* ``create_graph=True, first_order=True`` (reference meta-training): the inner-loop gradients
  are constants. The adapted weights are ``init - lr * sum(detached grads)``, so the query loss
  gives gradient to the init (identity Jacobian) and to the query features only; support features
  get none. The loop itself runs without a tape (cheap).
* ``create_graph=True, first_order=False`` (second order): the loop runs on the tape, so the result
  is a differentiable function of the init and of the support features (MAML-style, costs memory
  proportional to ``steps``).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mtl.data.episodes import relabel
from mtl.device import autocast
from mtl.models import inference_copy

MEMORY_BUDGET_BYTES = 256 * 2**20  # bound on gathered features per evaluation chunk
# Images per forward pass of an inference pass when the caller passes no measured size (the
# workflow always passes one, from mtl.jobs.open_gpu_job): small batches keep activations in a CPU's caches.
DEFAULT_INFERENCE_BATCH_SIZE = 64


# ----------------------------------------------------------------------------- init
def fresh_init(episodes: int, way: int, dim: int, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference fresh learner per episode: kaiming_normal (fan_in, gain sqrt 2) weight, zero bias.

    Drawn on the CPU one episode after another from ``generator``, so episode e gets the same
    weights whatever the batch or chunk size, and on every device.
    """
    weights = torch.empty(episodes, way, dim)
    for e in range(episodes):
        torch.nn.init.kaiming_normal_(weights[e], generator=generator)
    return weights.to(device), torch.zeros(episodes, way, device=device)


def _expand_init(init_weight, init_bias, episodes: int, way: int, dim: int, generator, device):
    """(way, D)/(way,) shared init or per-episode (E, way, D)/(E, way) -> (E, way, D), (E, way)."""
    if init_weight is None:
        return fresh_init(episodes, way, dim, generator=generator, device=device)
    if init_weight.shape[-2:] != (way, dim):
        raise ValueError(f"init_weight has shape {tuple(init_weight.shape)}, expected ({way}, {dim})")
    weight = init_weight.to(device=device, dtype=torch.float32)
    weight = weight.expand(episodes, way, dim) if weight.ndim == 2 else weight
    bias = (torch.zeros(way, device=device) if init_bias is None
            else init_bias.to(device=device, dtype=torch.float32))
    bias = bias.expand(episodes, way) if bias.ndim == 1 else bias
    return weight, bias


# ----------------------------------------------------------------------------- adapt
def linear_logits(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(E, N, D) features, (E, way, D) weights, (E, way) bias -> (E, N, way) logits."""
    return torch.baddbmm(bias.unsqueeze(1), feats, weight.transpose(1, 2))


def cross_entropy_grads(feats, onehot, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of each episode's mean cross-entropy w.r.t. its (weight, bias), analytically."""
    probs = torch.softmax(linear_logits(feats, weight, bias), dim=-1)
    delta = (probs - onehot) / feats.shape[1]  # (E, S, way)
    return torch.bmm(delta.transpose(1, 2), feats), delta.sum(dim=1)


def _sgd(feats, onehot, weight, bias, steps: int, lr: float):
    for _ in range(steps):
        grad_w, grad_b = cross_entropy_grads(feats, onehot, weight, bias)
        weight = weight - lr * grad_w
        bias = bias - lr * grad_b
    return weight, bias


def adapt_linear(support_feats: torch.Tensor, support_targets: torch.Tensor, way: int, *,
                 init_weight: torch.Tensor | None = None, init_bias: torch.Tensor | None = None,
                 steps: int = 100, lr: float = 0.01, generator: torch.Generator | None = None,
                 create_graph: bool = False, first_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt E linear learners at once; returns W (E, way, D), b (E, way) in float32.

    support_feats (E, S, D), support_targets (E, S) in 0..way-1 (or (S,) shared by all episodes).
    init_weight (way, D) or (E, way, D), init_bias (way,) or (E, way); None -> fresh kaiming init
    per episode from ``generator`` (see `fresh_init`). See the module docstring for the modes.
    """
    if support_feats.ndim != 3:
        raise ValueError(f"support_feats must be (E, S, D), got {tuple(support_feats.shape)}")
    episodes, shots, dim = support_feats.shape
    device = support_feats.device
    targets = support_targets.to(device).long()
    targets = targets.expand(episodes, shots) if targets.ndim == 1 else targets
    onehot = F.one_hot(targets, way).float()
    weight, bias = _expand_init(init_weight, init_bias, episodes, way, dim, generator, device)
    feats = support_feats.float()
    if not create_graph:
        with torch.no_grad():
            return _sgd(feats.detach(), onehot, weight.detach(), bias.detach(), steps, lr)
    if not first_order:
        return _sgd(feats, onehot, weight, bias, steps, lr)
    with torch.no_grad():
        final_w, final_b = _sgd(feats.detach(), onehot, weight.detach(), bias.detach(), steps, lr)
        delta_w, delta_b = final_w - weight.detach(), final_b - bias.detach()  # = -lr * sum of grads
    return weight + delta_w, bias + delta_b


def episode_accuracy(query_feats: torch.Tensor, query_targets: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Fraction of correct query predictions per episode, (E,) float."""
    with torch.no_grad():
        logits = linear_logits(query_feats.float(), weight.float(), bias.float())
        targets = query_targets.to(logits.device).long()
        targets = targets.expand(logits.shape[:2]) if targets.ndim == 1 else targets
        return (logits.argmax(dim=-1) == targets).float().mean(dim=1)


# ----------------------------------------------------------------------------- features
def embed(encoder: torch.nn.Module, images, transform: Callable,
          inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
          device: torch.device | str | None = None, *, indices: np.ndarray | None = None,
          amp: bool = True, progress: bool = False) -> torch.Tensor:
    """Features of a set of images, (N, D) float32 on ``device``: eval-mode BN, no autograd.

    ``images``: uint8 (N, H, W, 3) array/tensor, or with ``indices`` anything with
    ``get_images(indices)`` (an HDF5Split) or numpy-style fancy indexing; then the rows are
    ``indices`` in the order given. Runs an :func:`~mtl.models.inference_copy` of ``encoder``
    (scales and BN folded into the convs, channels_last), so ``encoder`` itself, its train/eval
    mode included, is never touched; the features equal ``encoder.eval()``'s to float rounding
    whatever the ``inference_batch_size`` (tests/test_batching.py), images per forward pass; pick it
    per device with :func:`mtl.batching.inference_batch_size`.
    """
    from tqdm import tqdm

    if not callable(transform):
        raise TypeError("embed(encoder, images, transform, inference_batch_size=64, device=None, *, indices=None): "
                        f"transform must be callable, got {type(transform).__name__}; pass indices= by keyword")
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    total = len(images) if indices is None else len(indices)
    model = inference_copy(encoder)
    chunks = []
    starts = range(0, total, inference_batch_size)
    for start in tqdm(starts, desc="embed", leave=False, disable=None if progress else True):
        batch = _read_batch(images, indices, start, start + inference_batch_size)
        chunks.append(embed_batch(model, batch, transform, device, amp=amp))
    if not chunks:
        raise ValueError("embed() got no images")
    return torch.cat(chunks)


def embed_batch(model: torch.nn.Module, images, transform: Callable, device: torch.device, *,
                amp: bool = True) -> torch.Tensor:
    """Features of one batch of uint8 images, (B, D) float32, with a model from `inference_copy`.

    The input goes in as channels_last; the output comes back in the default layout (a model that
    returns feature maps, e.g. a trunk, would otherwise hand channels_last tensors to its caller).
    """
    with torch.no_grad():
        x = transform(images, device=device).contiguous(memory_format=torch.channels_last)
        with autocast(device, enabled=amp):
            return model(x).float().contiguous()


def _read_batch(images, indices, start: int, stop: int):
    if indices is None:
        return images[start:stop]
    rows = np.asarray(indices[start:stop])
    return images.get_images(rows) if hasattr(images, "get_images") else images[rows]


# ----------------------------------------------------------------------------- episodes
def _episode_arrays(episodes):
    """(support (E,S), query (E,Q)) from an EpisodeSet-like object or a tuple of arrays."""
    if hasattr(episodes, "support") and hasattr(episodes, "query"):
        return np.asarray(episodes.support), np.asarray(episodes.query)
    support, query = episodes
    return np.asarray(support), np.asarray(query)


def evaluate_episodes(features_by_index: torch.Tensor, episodes, way: int, shot: int, query: int, *,
                      init: tuple[torch.Tensor, torch.Tensor | None] | None = None, steps: int = 100,
                      lr: float = 0.01, chunk: int | None = None,
                      generator: torch.Generator | None = None) -> np.ndarray:
    """Query accuracy of every episode, (E,) float64, adapting all learners in batched chunks.

    ``features_by_index[i]`` is the feature of image i (the index space of the episodes; see
    `embed_episodes` for a compact one). ``init`` = (weight (way, D), bias (way,) or None) for a
    meta-learned learner; None -> a fresh kaiming learner per episode from ``generator``. Chunking
    bounds memory and does not change results.
    """
    support, query_idx = _episode_arrays(episodes)
    if support.shape[1] != way * shot or query_idx.shape[1] != way * query:
        raise ValueError(f"episodes have {support.shape[1]} support / {query_idx.shape[1]} query images, "
                         f"expected {way}x{shot} / {way}x{query}")
    feats = features_by_index
    device, dim = feats.device, feats.shape[1]
    chunk = chunk or max(1, MEMORY_BUDGET_BYTES // (4 * dim * (support.shape[1] + query_idx.shape[1])))
    support_t = torch.as_tensor(relabel(way, shot), device=device)
    query_t = torch.as_tensor(relabel(way, query), device=device)
    init_w, init_b = init if init is not None else (None, None)
    accs = []
    for start in range(0, len(support), chunk):
        s_idx = torch.as_tensor(support[start:start + chunk], device=device)
        q_idx = torch.as_tensor(query_idx[start:start + chunk], device=device)
        w, b = adapt_linear(feats[s_idx], support_t, way, init_weight=init_w, init_bias=init_b,
                            steps=steps, lr=lr, generator=generator)
        accs.append(episode_accuracy(feats[q_idx], query_t, w, b).cpu())
    return torch.cat(accs).double().numpy()


def embed_episodes(encoder: torch.nn.Module, images, episodes, transform: Callable, *,
                   inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                   device: torch.device | str | None = None, amp: bool = True,
                   progress: bool = False) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Embed every image used by any episode exactly once.

    Returns (features (U, D) of the U distinct images in ascending index order, support and query
    index arrays remapped into 0..U-1) ready for `evaluate_episodes`.
    """
    support, query = _episode_arrays(episodes)
    used, inverse = np.unique(np.concatenate([support.ravel(), query.ravel()]), return_inverse=True)
    feats = embed(encoder, images, transform, inference_batch_size, device, indices=used, amp=amp,
                  progress=progress)
    remapped_support = inverse[:support.size].reshape(support.shape)
    remapped_query = inverse[support.size:].reshape(query.shape)
    return feats, remapped_support, remapped_query


def evaluate_encoder(encoder: torch.nn.Module, images, episodes, transform: Callable, way: int, shot: int,
                     query: int, *, init=None, steps: int = 100, lr: float = 0.01,
                     inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                     device: torch.device | str | None = None, generator: torch.Generator | None = None,
                     amp: bool = True, progress: bool = False) -> np.ndarray:
    """Per-episode query accuracies of a frozen encoder: embed each used image once, adapt all."""
    feats, support, query_idx = embed_episodes(encoder, images, episodes, transform,
                                               inference_batch_size=inference_batch_size, device=device, amp=amp,
                                               progress=progress)
    return evaluate_episodes(feats, (support, query_idx), way, shot, query, init=init, steps=steps, lr=lr,
                             generator=generator)
