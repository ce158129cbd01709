"""The composition model: backbone -> selector -> crop -> the same backbone again, and the
texture branch beside them -> head; or the backbone and a method with a forward of its own
(`method=transfg|ffvt|ielt|cal`, fgvr/models/methods/).

With `selector=none` and `texture=none` it is the plain backbone and head. With a selector
(GLSim and its baselines) the first pass's tokens give a box per image, the boxes are cropped
in one batched op, the crops go through the same backbone (with their own CLS token unless
shared), and the head sees both pooled features. With `texture=gabor` the first pass's tokens
(or the GLSim box) choose the regions whose Gabor texture features are added to the global
feature (or given to the head as one more feature). With a method, the method maps the
normalised images to logits (and, in training, its named loss terms) through the backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hydra.utils import get_object
from omegaconf import DictConfig
from torch import nn

from fgvr.models.backbone import Backbone, Tokens
from fgvr.models.crop import crop, crop_antialias, loader_scale, source_scale_of
from fgvr.models.methods.base import Method
from fgvr.models.selectors import Selection, Selector
from fgvr.models.texture import GaborTexture, Regions
from fgvr.runtime.config import instantiate, target_arguments
from fgvr.runtime.errors import ConfigError


class Normalize(nn.Module):
    """uint8 (B,3,H,W) on the device -> float, mean/std normalised (the backbone's statistics)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32, copy=True).sub_(self.mean).div_(self.std)  # one new batch-sized tensor, not three


class FGVRModel(nn.Module):
    """uint8 images -> (logits, extras). Normalisation runs here, on the device. Given `labels`
    (training), extras["losses"] holds the named loss terms whose sum is the training loss: the
    cross-entropy ("ce", with `label_smoothing`), or the method's terms. Labels are class indices
    (B,), or class probabilities (B, C) for mixed images (data.augment.mixup / cutmix, which give the
    images as 0-255 floats): the cross-entropy smooths either once.

    Images arrive at `input_size` (S), or `source_scale` times larger when the selector or the
    texture branch cuts its regions from the original resolution (`crop_source=original`); the
    first pass then sees them resized to S, and a branch that reads the input crops the resized
    view. `extras` holds the selector's `boxes` (B, 4, in S-pixel coordinates) and patch
    `scores` (B, h, w), and the texture branch's `regions` (B, K, 4) and `region_weights` (B, K).
    `truth`, the ground-truth boxes (B, 4) as fractions of the image, is read by
    selector=oracle only. A method's extras are its own (`MethodOutput.extras`)."""

    def __init__(self, backbone: Backbone, head: nn.Module | None, selector: Selector | None = None,
                 input_size: int = 224, texture: GaborTexture | None = None, method: Method | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.normalize = Normalize(backbone.mean, backbone.std)
        self.backbone = backbone
        self.selector = selector
        self.texture = texture
        self.head = head
        self.method = method
        self.label_smoothing = label_smoothing
        self.input_size = input_size
        self.crop_scale = selector.source_scale if selector is not None else 1.0
        self.texture_scale = texture.source_scale if texture is not None else 1.0
        self.source_scale = loader_scale(self.crop_scale, self.texture_scale)  # what the loaders deliver
        self.crop_size = (selector.crop_size if selector is not None else None) or input_size
        self.crop_align_corners = selector is not None and selector.align_corners
        # Crops shrunk from the larger copy (or to a crop size under the input's) are antialiased.
        self.crop_antialias = crop_antialias(self.crop_scale * input_size, self.crop_size)
        self.texture_antialias = crop_antialias(self.texture_scale * input_size, texture.region_size) \
            if texture is not None else 1
        separate = selector is not None and selector.crop_cls == "separate" and backbone.has_cls_token
        # The model's own copy: it trains with a frozen backbone too (backbone.freeze), through the crop pass.
        self.crop_cls = nn.Parameter(backbone.model.cls_token.detach().clone()) if separate else None

    def no_weight_decay(self) -> set[str]:
        extra = {"crop_cls"} if self.crop_cls is not None else set()
        if self.texture is not None:
            extra |= {f"texture.{n}" for n in self.texture.no_weight_decay()}
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | extra

    def prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the selector's crop source, network input): normalised, the input resized to S if it
        came larger; the crop source is the larger copy when the selector asks for it, else the input."""
        full = self.normalize(images)
        x = self.to_input(full)
        return self.selector_source(full, x), x

    def selector_source(self, full: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the selector's crops are cut from: the images as loaded, or their input-size view."""
        return full if self.crop_scale > 1 else x

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images at the loaders' size -> the network input size S (a no-op unless a branch reads
        the original resolution), shrunk by averaging pixel areas as the loaders' own resize does,
        so the first pass sees the view a run without the larger copy sees."""
        if self.source_scale == 1:
            return images
        return F.interpolate(images, size=(self.input_size, self.input_size), mode="area")

    def crops(self, source: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The boxes (S-pixel coordinates) cut from the crop source and resized to the crop size."""
        return crop(source, boxes * self.crop_scale, self.crop_size, self.crop_antialias, self.crop_align_corners)

    def first_pass(self, x: torch.Tensor) -> Tokens:
        if self.selector is None:
            return self.backbone.forward_tokens(x)
        with self.selector.watch(self.backbone):
            return self.backbone.forward_tokens(x)

    def second_pass(self, source: torch.Tensor, boxes: torch.Tensor) -> Tokens:
        """The boxes (S-pixel coordinates) cropped from the source and passed through the backbone."""
        return self.backbone.forward_tokens(self.crops(source, boxes), self.crop_cls)

    def texture_crops(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B, K, 4) boxes (S-pixel coordinates) cut from the images (uint8 or 0-255 floats, at the
        loaders' size, or from their input-size view when texture.crop_source=input) for the
        texture branch -> (B, K, C, region_size, region_size)."""
        pixels = images.float() / 255
        if self.texture_scale == 1:
            pixels = self.to_input(pixels)
        return self.texture.crops(pixels, boxes * self.texture_scale, self.texture_antialias)

    def texture_pass(self, images: torch.Tensor, tokens: Tokens, image_hw: tuple[int, int],
                     boxes: torch.Tensor | None) -> tuple[torch.Tensor, Regions]:
        """The texture branch: its regions (from the first pass's tokens, or the selector's
        boxes) cut from the images and encoded -> (B, D)."""
        regions = self.texture.regions(tokens, image_hw, boxes)
        return self.texture.encode(self.texture_crops(images, regions.boxes), regions.weights), regions

    def forward(self, images: torch.Tensor, truth: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict]:
        source, x = self.prepare(images)
        if self.method is not None:
            logits, losses, extras = self.method(self.backbone, x, labels)
            return logits, extras | ({"losses": losses} if labels is not None else {})
        tokens = self.first_pass(x)
        global_feat, crop_feat, texture_feat, extras = tokens.pooled, None, None, {}
        if self.selector is not None:
            selection: Selection = self.selector(tokens, x.shape[-2:], truth)
            crop_feat = self.second_pass(source, selection.boxes).pooled
            extras["boxes"] = selection.boxes
            if selection.scores is not None:
                extras["scores"] = selection.scores
        if self.texture is not None:
            texture_feat, regions = self.texture_pass(images, tokens, x.shape[-2:], extras.get("boxes"))
            extras |= {"regions": regions.boxes, "region_weights": regions.weights}
        logits = self.classify(global_feat, crop_feat, texture_feat)
        if labels is not None:
            extras["losses"] = {"ce": F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)}
        return logits, extras

    def classify(self, global_feat: torch.Tensor, crop_feat: torch.Tensor | None,
                 texture_feat: torch.Tensor | None) -> torch.Tensor:
        """The head on the features; the texture feature added to the global one (H = M + sum_r
        s_r T_r) unless texture.fusion=token makes it an input of its own."""
        if texture_feat is not None and self.texture.fusion == "add":
            global_feat, texture_feat = global_feat + texture_feat.to(global_feat.dtype), None
        return self.head(global_feat, crop_feat, texture_feat)


def mixes(augment: DictConfig) -> bool:
    """Whether data.augment mixes the images of a training batch (mixup or cutmix, with a chance)."""
    return (augment.mixup > 0 or augment.cutmix > 0) and augment.mix_prob > 0


def build_selector(cfg: DictConfig) -> Selector | None:
    return instantiate("selector", cfg.selector) if cfg.selector.get("_target_") else None


def source_scale(cfg: DictConfig) -> float:
    """How much larger than data.img_size the loaders must deliver images: the larger of what the
    selector and the texture branch ask for (their crop_source and source_scale)."""
    crop_scale, texture_scale = (source_scale_of(*settings(node, "crop_source", "source_scale"))
                                 if node.get("_target_") else 1.0 for node in (cfg.selector, cfg.texture))
    return loader_scale(crop_scale, texture_scale)


def settings(node: DictConfig, *keys: str) -> tuple:
    """A selector's or texture branch's settings: its node's values, else its class's defaults."""
    defaults = target_arguments(get_object(node._target_))
    return tuple(node[k] if k in node else defaults[k] for k in keys)


def build_method(cfg: DictConfig, backbone: Backbone, num_classes: int) -> Method | None:
    """The method a config names (None for method=none), checked against the rest of the model: it
    brings its own selection and classifier, so no selector, texture branch or head other than linear."""
    node = cfg.get("method") or {}  # runs made before methods existed have no method key
    if not node.get("_target_"):
        return None
    make = instantiate("method", node, _partial_=True, supplied=("backbone", "num_classes", "label_smoothing"))
    kind: type[Method] = make.func
    name = kind.name
    for group, what in (("selector", "selector"), ("texture", "texture branch")):
        if cfg[group].get("_target_"):
            raise ConfigError(f"method={name} selects its own regions; it takes no {what}: drop {group}= "
                              f"(or set {group}=none)")
    if cfg.head.get("_target_") != "fgvr.models.heads.LinearHead":
        raise ConfigError(f"method={name} brings its own classifier; head={cfg.head.get('_target_')} would not be "
                          "used: set head=linear")
    if cfg.trainer.grad_checkpointing:
        raise ConfigError(f"method={name} runs the backbone's blocks itself; trainer.grad_checkpointing=true is "
                          "not supported with it")
    if kind.needs_transformer and not backbone.is_transformer:
        raise ConfigError(f"method={name}: needs a ViT backbone (attention maps); {cfg.backbone.name} is a CNN")
    if kind.needs_cnn and backbone.is_transformer:
        raise ConfigError(f"method={name}: needs a CNN backbone (a feature map); {cfg.backbone.name} is a ViT")
    if kind.refuses_mixing and mixes(cfg.data.augment):
        raise ConfigError(f"method={name} cannot train on mixed images: {kind.refuses_mixing}; set "
                          "data.augment.mixup=0 data.augment.cutmix=0")
    return make(backbone=backbone, num_classes=num_classes, label_smoothing=cfg.trainer.label_smoothing)


def build_model(cfg: DictConfig, num_classes: int) -> FGVRModel:
    """Build the model a composed train config describes."""
    selector = build_selector(cfg)
    extra = {}
    if selector is not None and selector.crop_size not in (None, cfg.data.img_size) \
            and "dynamic_img_size" not in cfg.backbone.kwargs:  # ViTs: the crop pass runs at another size
        extra["kwargs"] = {**cfg.backbone.kwargs, "dynamic_img_size": True}
    backbone: Backbone = instantiate("backbone", cfg.backbone, img_size=cfg.data.img_size,
                                     grad_checkpointing=cfg.trainer.grad_checkpointing, **extra)
    if selector is not None and selector.needs_transformer and not backbone.is_transformer:
        raise ConfigError(f"selector={selector.name}: needs a ViT backbone (attention maps); "
                          f"{cfg.backbone.name} is a CNN")
    texture = None
    if cfg.texture.get("_target_"):
        texture = instantiate("texture", cfg.texture, in_features=backbone.num_features)
        if texture.regions_from == "glsim" and selector is None:
            raise ConfigError("texture.regions=glsim takes the selector's box, but selector=none; "
                              "add selector=glsim or use texture.regions=proposals")
    method = build_method(cfg, backbone, num_classes)
    head = None
    if method is None:
        num_inputs = 1 + (selector is not None) + (texture is not None and texture.fusion == "token")
        head = instantiate("head", cfg.head, in_features=backbone.num_features, num_classes=num_classes,
                           num_inputs=num_inputs)
    return FGVRModel(backbone, head, selector, cfg.data.img_size, texture, method, cfg.trainer.label_smoothing)
