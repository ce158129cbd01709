"""The composition model: backbone (+ selector + texture, from their issues) + head."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from fgvr.data.transforms import Normalize
from fgvr.errors import ConfigError
from fgvr.models.backbone import Backbone


class FGVRModel(nn.Module):
    """uint8 images (B,3,S,S) -> (logits, extras). Normalisation runs here, on the device."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.normalize = Normalize(backbone.mean, backbone.std)
        self.backbone = backbone
        self.head = head

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feat = self.backbone(self.normalize(images))
        return self.head(feat), {}


def build_model(cfg: DictConfig, num_classes: int) -> FGVRModel:
    """Build the model a composed train config describes."""
    b = cfg.backbone
    backbone = Backbone(b.name, b.pretrained, b.checkpoint, cfg.data.img_size, b.drop_path_rate, dict(b.kwargs))
    try:
        head = instantiate(cfg.head, in_features=backbone.num_features, num_classes=num_classes)
    except Exception as e:  # a key the head class does not take
        raise ConfigError(f"head: {e.__cause__ or e}".splitlines()[0]) from None
    return FGVRModel(backbone, head)
