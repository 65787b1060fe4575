"""What every test-time learner is, and scoring one over a file of episodes (see :mod:`mtl.learners`)."""
from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mtl.base_learner import DEFAULT_INFERENCE_BATCH_SIZE, embed, embed_episodes
from mtl.data.episodes import relabel

#: A learner adapted to E support sets: query inputs (E, Q, ...) -> logits (E, Q, n_classes) float32.
Classifier = Callable[[torch.Tensor], torch.Tensor]

#: Bound on the inputs one chunk of frozen-feature episodes gathers (support and query features).
MEMORY_BUDGET_BYTES = 256 * 2**20


class Learner(abc.ABC):
    """Adapts to support sets. Subclasses say what embeds the images (:meth:`embedder`), how many
    episodes adapt together (:meth:`episodes_per_chunk`) and how a support set is fitted (:meth:`fit`)."""

    #: True: the learner reads the frozen encoder's features, so every image is embedded once for
    #: a whole episode file; False: it adapts part of the network, and images are embedded per chunk.
    frozen_features = True

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone

    def embedder(self) -> nn.Module:
        """The network whose outputs :meth:`fit` and the classifier take (the whole encoder here)."""
        return self.backbone

    def episodes_per_chunk(self, sample_input: torch.Tensor, support_size: int, query_size: int) -> int:
        """Episodes adapted together; ``sample_input`` is the embedder's output for one image (1, ...)."""
        per_episode = 4 * sample_input[0].numel() * (support_size + query_size)
        return max(1, MEMORY_BUDGET_BYTES // per_episode)

    @abc.abstractmethod
    def fit(self, support: torch.Tensor, labels, n_classes: int, *, first_episode: int = 0) -> Classifier:
        """Adapt to E support sets ``support`` (E, S, ...) with ``labels`` (S,) in 0..n_classes-1
        (shared by the episodes); episode i of the batch is the run's episode ``first_episode + i``."""


def score_episodes(learner: Learner, images, episodes, transform, way: int, shot: int, query: int, *,
                   inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                   device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Logits (E, way*query, way) float32 on the CPU of every episode's queries.

    ``episodes`` = (support (E, way*shot), query (E, way*query)) indices into ``images`` (an HDF5
    split or a uint8 array), class-major: support position p is class p // shot, query position q is
    class q // query. A frozen-feature learner gets each distinct image embedded once; a fine-tuning
    learner gets the images of each chunk of episodes embedded by its trunk. Chunking changes
    nothing: episode e is adapted as if alone (tests/test_learners.py).
    """
    support, query_idx = (np.asarray(a) for a in episodes)
    if support.ndim != 2 or query_idx.ndim != 2 or len(support) != len(query_idx):
        raise ValueError(f"episodes must be (E, way*shot) and (E, way*query) index arrays, got {support.shape} "
                         f"and {query_idx.shape}")
    if support.shape[1] != way * shot or query_idx.shape[1] != way * query:
        raise ValueError(f"episodes have {support.shape[1]} support / {query_idx.shape[1]} query images, "
                         f"expected {way}x{shot} / {way}x{query}")
    labels = torch.as_tensor(relabel(way, shot), device=device)

    def embedded(first: int, stop: int, bar: bool = False):
        return embed_episodes(learner.embedder(), images, (support[first:stop], query_idx[first:stop]), transform,
                              inference_batch_size=inference_batch_size, device=device, progress=bar)

    if learner.frozen_features:
        inputs, s_idx, q_idx = embedded(0, len(support), progress)
        chunk = learner.episodes_per_chunk(inputs[:1], support.shape[1], query_idx.shape[1])
        return torch.cat([_fit_and_score(learner, inputs, s_idx[first:first + chunk], q_idx[first:first + chunk],
                                         labels, way, first)
                          for first in _chunk_starts(len(support), chunk, progress, "adapt")])
    sample = embed(learner.embedder(), images, transform, device=device, indices=support[:1, :1].ravel())
    chunk = learner.episodes_per_chunk(sample, support.shape[1], query_idx.shape[1])
    scored = []
    for first in _chunk_starts(len(support), chunk, progress, "fine-tune"):
        inputs, s_idx, q_idx = embedded(first, first + chunk)
        scored.append(_fit_and_score(learner, inputs, s_idx, q_idx, labels, way, first))
    return torch.cat(scored)


def _fit_and_score(learner: Learner, inputs: torch.Tensor, s_idx: np.ndarray, q_idx: np.ndarray,
                   labels: torch.Tensor, way: int, first: int) -> torch.Tensor:
    """Logits of the queries of the episodes whose inputs ``s_idx``/``q_idx`` index into ``inputs``."""
    rows = lambda idx: inputs[torch.as_tensor(idx, device=inputs.device)]  # noqa: E731
    classifier = learner.fit(rows(s_idx), labels, way, first_episode=first)
    return classifier(rows(q_idx)).float().cpu()


def _chunk_starts(total: int, chunk: int, progress: bool, what: str):
    from tqdm import tqdm

    return tqdm(range(0, total, chunk), desc=what, leave=False, disable=None if progress and total > chunk else True)
