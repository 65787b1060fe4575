"""The pre-train classifier: backbone plus the reference's two-layer head."""
from __future__ import annotations

import torch
from torch import nn

from mtl.models.backbone import Backbone

HIDDEN_UNITS = 1000


class PretrainClassifier(nn.Module):
    """``encoder`` (a Backbone) followed by Linear(out_dim, 1000) -> ReLU -> Linear(1000, n_classes).

    The head is the reference's ``pre_fc``; only ``encoder`` is kept after pre-training
    (``save_encoder(model.encoder, ...)``), the head is discarded.
    """

    def __init__(self, backbone: Backbone, n_classes: int, *, hidden: int = HIDDEN_UNITS) -> None:
        super().__init__()
        if int(n_classes) < 1:
            raise ValueError(f"PretrainClassifier needs n_classes >= 1, got {n_classes}")
        self.encoder = backbone
        self.head = nn.Sequential(
            nn.Linear(backbone.out_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, int(n_classes)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)`` for images ``(B, 3, H, W)``."""
        return self.head(self.encoder(x))
