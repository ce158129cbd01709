"""The backbone: any timm model, created by name, with its pooled feature as output."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from timm.models import checkpoint_seq
from torch import nn

from fgvr.errors import ConfigError, FgvrError

# ViT options that other models (CNNs) do not take: passed only to models that accept them.
OPTIONAL_KWARGS = ("img_size", "dynamic_img_size")


def create_timm_model(name: str, pretrained: bool = False, checkpoint: str | None = None,
                      img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """timm.create_model without a classifier; `checkpoint` loads local weights through timm's
    own pretrained path (so ViT position embeddings are resampled to img_size)."""
    if not timm.is_model(name):
        raise ConfigError(f"backbone.name={name} is not a timm model; list them with "
                          f"python -c \"import timm; print(timm.list_models('*vit*'))\"")
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).expanduser())
        if not Path(checkpoint).is_file():
            raise ConfigError(f"backbone.checkpoint={checkpoint}: no such file")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
    optional = {"img_size": img_size} if img_size is not None else {}
    optional |= {k: kwargs.pop(k) for k in OPTIONAL_KWARGS if k in kwargs}
    while True:
        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs, **optional)
            break
        except TypeError as e:
            dropped = next((k for k in optional if f"'{k}'" in str(e)), None)
            if dropped is None and "unexpected keyword argument" in str(e):
                raise ConfigError(f"backbone.kwargs: {name} does not take {str(e).rsplit(' ', 1)[-1]}") from None
            if dropped is None:
                raise
            optional.pop(dropped)  # e.g. CNNs take no img_size: the option does not apply to them
        except (RuntimeError, ValueError) as e:  # timm reads the file weights-only; shapes must match
            if checkpoint is None:
                raise
            raise ConfigError(f"backbone.checkpoint={checkpoint}: {_load_error(e)}; the file"
                              f"{_exported_from(checkpoint)} does not fit backbone.name={name}") from None
        except OSError as e:
            if checkpoint is not None:
                raise ConfigError(f"backbone.checkpoint={checkpoint}: cannot load ({e})") from None
            raise FgvrError(f"cannot download pretrained weights for backbone.name={name} ({type(e).__name__}); "
                            "pass a local file with backbone.checkpoint=/path/to/weights.safetensors, "
                            "or train from scratch with backbone.pretrained=false") from None
    if checkpoint is not None:
        missing = _not_in_file(model, checkpoint)
        if missing:
            shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
            raise ConfigError(f"backbone.checkpoint={checkpoint}: its tensors do not match the model (missing "
                              f"{shown}); the file{_exported_from(checkpoint)} does not fit backbone.name={name}")
    return model


def _not_in_file(model: nn.Module, path: str) -> list[str]:
    """The model's tensors a weights file does not hold. timm loads a file non-strictly once it has
    dropped the classifier (num_classes=0), so a file of another model would otherwise load nothing
    and say nothing. The file's keys go through the model family's own checkpoint filter first, as
    timm's loading does (renamed keys, resampled position embeddings)."""
    import importlib

    from timm.models import load_state_dict

    state = load_state_dict(path)
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    return [k for k in model.state_dict() if k not in state]


def _load_error(e: Exception) -> str:
    """timm's (or torch's) many-line loading error as a short clause: which keys or shapes differ."""
    text = str(e)
    if "weights_only" in text or "Unsupported global" in text:
        return "refused: it holds pickled objects other than tensors, which could run code"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    details = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    shown = "; ".join(d[:160] + ("..." if len(d) > 160 else "") for d in details[:3])
    return f"its tensors do not match the model ({shown or (lines[0] if lines else type(e).__name__)})"


def _exported_from(path: str) -> str:
    """' (saved from timm model vit_tiny_patch16_224 at img_size 64)' for a file fgvr exported, else ''."""
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return ""
    if "timm_model" not in meta:
        return ""
    return f" (saved from timm model {meta['timm_model']} at img_size {meta.get('img_size')})"


class Tokens(NamedTuple):
    """What one pass of the backbone gives the rest of the model.

    For ViTs `cls` is the CLS token and `patches` the patch tokens after the final norm; for
    CNNs `cls` is the pooled vector and `patches` the locations of the last feature map."""

    pooled: torch.Tensor  # (B, D) the feature the head sees (timm's pre-logits)
    cls: torch.Tensor  # (B, D)
    patches: torch.Tensor  # (B, h*w, D), row-major
    grid_hw: tuple[int, int]  # (h, w)
    stride_hw: tuple[float, float]  # input pixels per patch / feature-map cell


class Backbone(nn.Module):
    """A timm model -> `Tokens` (forward_tokens) or just the pooled feature (forward): the CLS
    token (or timm's pooling) for ViTs, global average pooling for CNNs."""

    def __init__(self, name: str, pretrained: bool = False, checkpoint: str | None = None,
                 img_size: int | None = None, drop_path_rate: float = 0.0, kwargs: dict | None = None,
                 grad_checkpointing: bool = False):
        super().__init__()
        extra = dict(kwargs or {})
        if drop_path_rate:
            extra["drop_path_rate"] = drop_path_rate
        self.model = create_timm_model(name, pretrained, checkpoint, img_size, **extra)
        if grad_checkpointing:  # timm's own: the blocks' activations are recomputed in backward
            try:
                self.model.set_grad_checkpointing(True)
            except (AssertionError, NotImplementedError) as e:
                raise ConfigError(f"trainer.grad_checkpointing=true: {name} does not support it ({e})") from None
        self.num_features: int = self.model.num_features
        self.is_transformer = hasattr(self.model, "num_prefix_tokens")
        self.has_cls_token = getattr(self.model, "cls_token", None) is not None
        data_cfg = timm.data.resolve_model_data_config(self.model)
        self.mean, self.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in fn()} if fn else set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_tokens(self, x: torch.Tensor, cls_token: torch.Tensor | None = None) -> Tokens:
        """One pass; `cls_token` (1,1,D) replaces the model's CLS token in the input sequence
        (GLSim's separate crop token)."""
        m = self.model
        if not self.is_transformer:
            fmap = m.forward_features(x)
            pooled = m.forward_head(fmap, pre_logits=True)
            h, w = fmap.shape[-2:]
            return Tokens(pooled, pooled, fmap.flatten(2).transpose(1, 2), (h, w), (x.shape[-2] / h, x.shape[-1] / w))
        tokens = m.forward_features(x) if cls_token is None else self._features_with_cls(x, cls_token)
        pooled = m.forward_head(tokens, pre_logits=True)
        grid = tuple(m.patch_embed.dynamic_feat_size(x.shape[-2:]))
        return Tokens(pooled, tokens[:, 0] if self.has_cls_token else pooled, tokens[:, m.num_prefix_tokens:], grid,
                      tuple(float(p) for p in m.patch_embed.patch_size))

    def _features_with_cls(self, x: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
        """timm VisionTransformer.forward_features with another CLS token: the token at position
        0 (CLS + its position embedding, if any) is shifted by (cls_token - model CLS)."""
        m = self.model
        x = m._pos_embed(m.patch_embed(x))
        x = torch.cat([x[:, :1] + (cls_token - m.cls_token).to(x.dtype), x[:, 1:]], dim=1)
        x = m.norm_pre(m.patch_drop(x))
        x = checkpoint_seq(m.blocks, x) if m.grad_checkpointing else m.blocks(x)
        return m.norm(x)
