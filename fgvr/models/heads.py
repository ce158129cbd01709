"""Heads: the global feature (and the crop's, and the texture branch's, when present) -> logits.

Every head takes `in_features` (the width of each feature) and `num_inputs` (how many features
the model passes: 1 for the plain backbone, 2 with a selector's crop, ...)."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from fgvr.runtime.errors import ConfigError


def _features(*feats: torch.Tensor | None) -> list[torch.Tensor]:
    return [f for f in feats if f is not None]


class LinearHead(nn.Module):
    """Dropout + linear classifier on the concatenation of the features."""

    def __init__(self, in_features: int, num_classes: int, num_inputs: int = 1, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features * num_inputs, num_classes)

    def forward(self, global_feat: torch.Tensor, crop_feat: torch.Tensor | None = None,
                texture_feat: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.drop(torch.cat(_features(global_feat, crop_feat, texture_feat), dim=-1)))


class AggregatorHead(nn.Module):
    """GLSim's aggregator: the features as tokens [global, crop, ...] -> pre-norm transformer
    block(s) (heads = D/64, MLP 4D) -> LayerNorm -> linear on token 0, zero-initialised as the
    reference does (`zero_init`). Attention takes any number of tokens, so `num_inputs` needs
    no parameters here."""

    def __init__(self, in_features: int, num_classes: int, num_inputs: int = 1, layers: int = 1,
                 num_heads: int | None = None, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 drop_path: float = 0.0, zero_init: bool = True):
        super().__init__()
        num_heads = num_heads or max(1, in_features // 64)
        if in_features % num_heads:
            raise ConfigError(f"head.num_heads={num_heads} does not divide the feature width {in_features}; "
                              "set head.num_heads to a divisor")
        self.blocks = nn.Sequential(*[
            Block(in_features, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                  drop_path=drop_path) for _ in range(layers)])
        self.norm = nn.LayerNorm(in_features, eps=1e-6)
        self.fc = nn.Linear(in_features, num_classes)
        if zero_init:
            nn.init.zeros_(self.fc.weight)
        else:
            nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, global_feat: torch.Tensor, crop_feat: torch.Tensor | None = None,
                texture_feat: torch.Tensor | None = None) -> torch.Tensor:
        tokens = torch.stack(_features(global_feat, crop_feat, texture_feat), dim=1)  # (B, T, D)
        return self.fc(self.norm(self.blocks(tokens))[:, 0])
