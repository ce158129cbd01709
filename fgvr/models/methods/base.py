"""What every method module is: normalised images -> `MethodOutput` (logits, the named loss terms
when labels are given, and what it selected for evaluation and `fgvr viz`).

A method does not own the backbone (the model does; its weights are saved once): the backbone is
an argument of `forward`, and of `__init__` for what the method builds around it (its heads, a
changed patch embedding)."""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fgvr.models.backbone import Backbone
from fgvr.models.crop import clip_boxes


class MethodOutput(NamedTuple):
    logits: torch.Tensor  # (B, classes): the method's declared output, the one evaluation reads
    losses: dict[str, torch.Tensor]  # training (labels given): weighted scalar terms, summed into the loss
    extras: dict[str, torch.Tensor]  # what it selected: "tokens" (B, K) patch indices, "token_boxes" (B, K, 4),
    # "boxes" (B, 4) (its crop, or the box around its tokens), "maps" (B, M, h, w); pixels of the input


class Method(nn.Module):
    """Base of the method modules. `ce` is the cross-entropy with the run's label smoothing;
    `stage(name)` marks a part of the forward whose FLOPs `fgvr`'s cost report lists apart
    (`flop_counter` is set only while it counts).

    The labels of `forward` are class indices (B,), or class probabilities (B, C) in a run that
    mixes images (data.augment.mixup / cutmix): each image's mix of classes, without smoothing."""

    name = "method"
    needs_transformer = False  # reads attention: a timm ViT only
    needs_cnn = False  # reads a CNN's feature map
    refuses_mixing: str | None = None  # why the method cannot learn from mixed images, if it cannot

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.flop_counter = None  # a torch FlopCounterMode, while cost.stage_flops counts
        self.stage_flops: dict[str, float] = {}

    def forward(self, backbone: Backbone, x: torch.Tensor, labels: torch.Tensor | None = None) -> MethodOutput:
        raise NotImplementedError

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on class indices or class probabilities, smoothed once, here."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        counter = self.flop_counter
        if counter is None:
            yield
            return
        before = counter.get_total_flops()
        try:
            yield
        finally:
            self.stage_flops[name] = self.stage_flops.get(name, 0) + counter.get_total_flops() - before


def token_boxes(index: torch.Tensor, grid_hw: tuple[int, int], stride_hw: tuple[float, float],
                patch_hw: tuple[float, float], image_hw: tuple[int, int]) -> torch.Tensor:
    """Flat patch indices (B, K) on a row-major grid -> each patch's box (B, K, 4), x1 y1 x2 y2 in
    input pixels (a patch spans `patch_hw` from row * stride, col * stride: they overlap when the
    stride is smaller), clipped to the image."""
    w = grid_hw[1]
    rows, cols = (index // w).float(), (index % w).float()
    (sy, sx), (py, px) = stride_hw, patch_hw
    return clip_boxes(torch.stack([cols * sx, rows * sy, cols * sx + px, rows * sy + py], dim=-1), image_hw)


def enclosing_box(boxes: torch.Tensor) -> torch.Tensor:
    """(B, K, 4) boxes -> (B, 4), the box around all K of them."""
    return torch.cat([boxes[..., :2].amin(1), boxes[..., 2:].amax(1)], dim=-1)
