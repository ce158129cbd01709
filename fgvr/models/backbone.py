"""The backbone: any timm model, created by name, with its pooled feature as output."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from timm.models import checkpoint_seq
from torch import nn

from fgvr.runtime.errors import ConfigError, FgvrError, first_few, first_line
from fgvr.runtime.files import load_weights_only, unsafe_global

# ViT options that other models (CNNs) do not take: passed only to models that accept them.
OPTIONAL_KWARGS = ("img_size", "dynamic_img_size")


def create_timm_model(name: str, pretrained: bool = False, checkpoint: str | None = None,
                      img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """timm.create_model without a classifier; `checkpoint` loads local weights (load_weights_file)."""
    if not timm.is_model(name):
        raise ConfigError(f"backbone.name={name} is not a timm model; list them with "
                          f"python -c \"import timm; print(timm.list_models('*vit*'))\"")
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).expanduser())
        if not Path(checkpoint).is_file():
            raise ConfigError(f"backbone.checkpoint={checkpoint}: no such file")
        pretrained = False  # the file's weights replace the hub's
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
        except OSError as e:
            raise FgvrError(f"cannot download pretrained weights for backbone.name={name} ({type(e).__name__}); "
                            "pass a local file with backbone.checkpoint=/path/to/weights.safetensors, "
                            "or train from scratch with backbone.pretrained=false") from None
    if checkpoint is not None:
        load_weights_file(model, checkpoint, name)
    return model


def load_weights_file(model: nn.Module, path: str, name: str) -> None:
    """A local weights file into a timm model: read as safetensors or weights-only (no code in it
    runs), passed through the model family's own checkpoint filter as timm's pretrained loading does
    (renamed keys, resampled position embeddings), then loaded. Every tensor of the model must be in
    it; a classifier the model does not have is left out. Anything else is one line."""
    import importlib

    def refuse(problem: str) -> ConfigError:
        return ConfigError(f"backbone.checkpoint={path}: {problem}; the file{_exported_from(path)} does not fit "
                           f"backbone.name={name}")

    try:
        state = _read_weights(path)
        filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
        missing = model.load_state_dict(state, strict=False).missing_keys
    except Exception as e:  # torch's, safetensors' and the filters' errors: the file is not what it should be
        raise refuse(_load_error(e)) from None
    if missing:
        raise refuse(f"its tensors do not match the model (missing {first_few(missing)})")


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file; a training checkpoint's model (its
    EMA one first, as timm prefers) and DDP's "module." prefixes unwrapped."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = load_weights_only(path)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_error(e: Exception) -> str:
    """timm's (or torch's) many-line loading error as a short clause: which keys or shapes differ."""
    if unsafe_global(e):
        return "refused: it holds pickled objects other than tensors, which could run code"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    details = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    shown = "; ".join(d[:160] + ("..." if len(d) > 160 else "") for d in details[:3])
    return f"its tensors do not match the model ({shown or first_line(e)})"


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
    """A timm model -> `Tokens` (forward_tokens), whose pooled feature is the CLS token (or timm's
    pooling) for ViTs, global average pooling for CNNs. Made from the backbone config (`_target_`).

    `freeze` (backbone.freeze, a linear probe): the timm model's parameters take no gradient and it
    stays in eval mode when the model trains (batch-norm statistics, dropout, drop path as loaded).
    What the model or a method builds from it as a copy of its own (GLSim's separate crop CLS token,
    IELT's refinement block) trains; what they run of it (TransFG's and FFVT's last block) does not."""

    def __init__(self, name: str, pretrained: bool = False, checkpoint: str | None = None,
                 img_size: int | None = None, drop_path_rate: float = 0.0, kwargs: dict | None = None,
                 grad_checkpointing: bool = False, freeze: bool = False):
        super().__init__()
        self.frozen = freeze
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
        if freeze:
            self.model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Backbone:
        """nn.Module.train; a frozen backbone's model stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in fn()} if fn else set()

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
