"""Heads: global (and, later, region) features -> logits."""

from __future__ import annotations

import torch
from torch import nn


class LinearHead(nn.Module):
    """Dropout + linear classifier on the concatenation of the features it is given."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, global_feat: torch.Tensor, crop_feat: torch.Tensor | None = None,
                texture_feat: torch.Tensor | None = None) -> torch.Tensor:
        feats = [f for f in (global_feat, crop_feat, texture_feat) if f is not None]
        return self.fc(self.drop(torch.cat(feats, dim=-1) if len(feats) > 1 else feats[0]))
