"""The backbone: any timm model, created by name, with its pooled feature as output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from fgvr.errors import ConfigError, FgvrError


def create_timm_model(name: str, pretrained: bool = False, checkpoint: str | None = None,
                      img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """timm.create_model without a classifier; `checkpoint` loads local weights through timm's
    own pretrained path (so ViT position embeddings are resampled to img_size)."""
    if not timm.is_model(name):
        raise ConfigError(f"backbone.name={name} is not a timm model; list them with "
                          f"python -c \"import timm; print(timm.list_models('*vit*'))\"")
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ConfigError(f"backbone.checkpoint={checkpoint}: no such file")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as e:
        if "img_size" in str(e):  # models without a fixed input size (CNNs) take none
            kwargs.pop("img_size")
            return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        if "unexpected keyword argument" in str(e):
            raise ConfigError(f"backbone.kwargs: {name} does not take {str(e).rsplit(' ', 1)[-1]}") from None
        raise
    except OSError as e:
        if checkpoint is not None:
            raise ConfigError(f"backbone.checkpoint={checkpoint}: cannot load ({e})") from None
        raise FgvrError(f"cannot download pretrained weights for backbone.name={name} ({type(e).__name__}); "
                        "pass a local file with backbone.checkpoint=/path/to/weights.safetensors, "
                        "or train from scratch with backbone.pretrained=false") from None


class Backbone(nn.Module):
    """A timm model -> pooled feature (B, num_features): the CLS token (or timm's pooling)
    for ViTs, global average pooling for CNNs."""

    def __init__(self, name: str, pretrained: bool = False, checkpoint: str | None = None,
                 img_size: int | None = None, drop_path_rate: float = 0.0, kwargs: dict | None = None):
        super().__init__()
        extra = dict(kwargs or {})
        if drop_path_rate:
            extra["drop_path_rate"] = drop_path_rate
        self.model = create_timm_model(name, pretrained, checkpoint, img_size, **extra)
        self.num_features: int = self.model.num_features
        self.is_transformer = hasattr(self.model, "num_prefix_tokens")
        data_cfg = timm.data.resolve_model_data_config(self.model)
        self.mean, self.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in fn()} if fn else set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
