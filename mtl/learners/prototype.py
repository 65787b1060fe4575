"""Nearest class mean (``proto``): each class is the mean of its support features, and a query's
score for a class is minus its squared Euclidean distance to that mean (so the softmax of the
scores is the prototypical networks' class probability)."""
from __future__ import annotations

import torch

from mtl.learners.base import Classifier, Learner


class PrototypeLearner(Learner):
    """No steps, no random draw: the class means of the support features."""

    def fit(self, support: torch.Tensor, labels, n_classes: int, *, first_episode: int = 0) -> Classifier:
        labels = torch.as_tensor(labels, device=support.device).long()
        counts = torch.bincount(labels, minlength=n_classes)
        if int(counts.min()) == 0:
            raise ValueError(f"every class needs a support example; classes {torch.nonzero(counts == 0).ravel().tolist()} "
                             "have none")
        sums = torch.zeros(support.shape[0], n_classes, support.shape[-1], device=support.device)
        prototypes = sums.index_add_(1, labels, support.float()) / counts.unsqueeze(1)
        return lambda query: -torch.cdist(query.float(), prototypes).square()
