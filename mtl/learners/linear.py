"""The linear head adapted by SGD: from a fresh kaiming draw (``ft``) or from the meta-learned
initialisation (``mtl`` and its arms). The arithmetic is :func:`mtl.base_learner.adapt_linear`'s,
the one meta-training and pre-training validation use."""
from __future__ import annotations

import torch

from mtl.base_learner import adapt_linear, fresh_init, linear_logits
from mtl.learners.base import Classifier, Learner
from mtl.rng import Purpose, torch_stream


class FreshDraws:
    """The fresh learners' initialisations of one run: draw e of ``purpose``'s stream of ``seed`` is
    episode e's, whatever chunk, batch or call asks for it (draws are taken in order and the stream
    is replayed from the start only when an earlier draw is asked for)."""

    def __init__(self, seed: int, purpose: Purpose):
        self.seed, self.purpose = seed, purpose
        self._generator, self._next = None, 0

    def take(self, first: int, episodes: int, n_classes: int, dim: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (E, n_classes, dim), bias (E, n_classes)) of draws ``first`` .. ``first + episodes - 1``."""
        if self._generator is None or first < self._next:
            self._generator, self._next = torch_stream(self.seed, self.purpose), 0
        if first > self._next:  # the draws before: same shape, so the stream lands where it would
            fresh_init(first - self._next, n_classes, dim, generator=self._generator)
        self._next = first + episodes
        return fresh_init(episodes, n_classes, dim, generator=self._generator, device=device)


class LinearLearner(Learner):
    """``steps`` SGD steps at ``lr`` of a linear head ``W x + b`` on the support set's mean
    cross-entropy; from ``init`` (the meta-learned (weight, bias)) or, when None, a fresh draw."""

    def __init__(self, backbone, *, steps: int, lr: float, init=None, seed: int,
                 purpose: Purpose = Purpose.TEST_LEARNERS):
        super().__init__(backbone)
        self.steps, self.lr, self.init = steps, lr, init
        self.draws = FreshDraws(seed, purpose)

    def initial(self, first: int, episodes: int, n_classes: int, dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads the episodes start from."""
        if self.init is None:
            return self.draws.take(first, episodes, n_classes, dim, device)
        weight, bias = (t.float().to(device) for t in self.init)
        if weight.shape[0] != n_classes:
            # Trained for another number of classes: every class starts from the mean row (the
            # class positions of meta-training episodes are arbitrary, so no row belongs to a class).
            weight, bias = weight.mean(dim=0, keepdim=True).expand(n_classes, -1), bias.mean().expand(n_classes)
        return weight.expand(episodes, n_classes, dim), bias.expand(episodes, n_classes)

    def fit(self, support: torch.Tensor, labels, n_classes: int, *, first_episode: int = 0) -> Classifier:
        weight, bias = self.initial(first_episode, support.shape[0], n_classes, support.shape[-1], support.device)
        weight, bias = adapt_linear(support, torch.as_tensor(labels), n_classes, init_weight=weight, init_bias=bias,
                                    steps=self.steps, lr=self.lr)
        return lambda query: linear_logits(query.float(), weight, bias)
