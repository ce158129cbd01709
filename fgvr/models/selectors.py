"""Selectors: one pass's tokens -> a box per image (the discriminative region) to crop.

All selectors score the patches (or CNN feature-map cells), take the top-k and box them the
same way, so they compare on equal terms; they differ only in the scores:
- `GLSimSelector`: similarity of the CLS token (the pooled vector for CNNs) to each patch.
- `RandomSelector`: random scores (k random patches).
- `CenterSelector`: no scores: a centred square with the area of GLSim's mean box.
- `RolloutSelector`: attention rollout over all layers (needs attention probabilities).
- `OracleSelector`: no scores: the ground-truth part box (an upper bound, for benchmarks).
Selection runs without gradient. Crop settings (size, source, CLS token of the second pass)
live here too, shared by every selector.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fgvr.models.backbone import Backbone, Tokens
from fgvr.models.crop import clip_boxes, scale_boxes, source_scale_of
from fgvr.runtime.errors import ConfigError

BOX_ENDS = ("inclusive", "exclusive")
METRICS = ("cos", "l1", "l2")


class Selection(NamedTuple):
    boxes: torch.Tensor  # (B, 4) x1, y1, x2, y2 in input pixels, float
    scores: torch.Tensor | None  # (B, h, w) patch scores, for visualisation


def topk_boxes(scores: torch.Tensor, grid_hw: tuple[int, int], stride_hw: tuple[float, float],
               image_hw: tuple[int, int], top_k: int, box_end: str = "inclusive") -> torch.Tensor:
    """Box around the top-k patches of `scores` (B, h*w), in input pixels (B, 4).

    `inclusive`: the box ends after the last selected patch, `(max + 1) * stride`.
    `exclusive`: the reference implementation's `max * stride`, which cuts off the last selected
    row and column; a box one patch wide is widened to that patch, as the reference does."""
    h, w = grid_hw
    idx = scores.topk(min(top_k, h * w), dim=-1).indices
    rows, cols = idx // w, idx % w
    r0, r1, c0, c1 = rows.amin(-1), rows.amax(-1), cols.amin(-1), cols.amax(-1)
    if box_end == "inclusive":
        r1, c1 = r1 + 1, c1 + 1
    else:
        r1, c1 = torch.where(r1 == r0, r1 + 1, r1), torch.where(c1 == c0, c1 + 1, c1)
    sy, sx = stride_hw
    return clip_boxes(torch.stack([c0 * sx, r0 * sy, c1 * sx, r1 * sy], dim=-1).float(), image_hw)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two (B, 4) x1 y1 x2 y2 box tensors."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda t: (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-6)


def box_hit(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether each box contains its target box's centre."""
    cx, cy = (targets[:, 0] + targets[:, 2]) / 2, (targets[:, 1] + targets[:, 3]) / 2
    return (boxes[:, 0] <= cx) & (cx <= boxes[:, 2]) & (boxes[:, 1] <= cy) & (cy <= boxes[:, 3])


def localisation(boxes: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(IoU sum, boxes that contain the truth's centre, count) over the rows whose ground-truth
    box is known (finite); summed on the device, for the evaluation loop."""
    known = truth.isfinite().all(-1)
    truth = torch.where(known[:, None], truth, 0)
    return torch.stack([torch.where(known, box_iou(boxes, truth), 0).sum(), (known & box_hit(boxes, truth)).sum(),
                        known.sum()]).float()


def token_localisation(token_boxes: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(selected tokens whose patch centre lies in the ground-truth box, tokens) over the rows whose
    box is known, for a method's (B, K, 4) token boxes; summed on the device."""
    known = truth.isfinite().all(-1)
    truth = torch.where(known[:, None], truth, 0)[:, None]  # (B, 1, 4)
    centre = (token_boxes[..., :2] + token_boxes[..., 2:]) / 2
    inside = ((truth[..., :2] <= centre) & (centre <= truth[..., 2:])).all(-1) & known[:, None]
    return torch.stack([inside.sum(), known.sum() * token_boxes.shape[1]]).float()


class Selector(nn.Module):
    """Base: top-k patches by `scores` -> box, plus the crop settings every selector shares.

    crop_size: side of the crop fed to the second pass (None: the input size, as the reference).
    crop_source: `input` crops the network input; `original` crops a `source_scale` times larger
        copy of the same view, so the crop has real detail instead of upsampled pixels.
    crop_cls: `separate` gives the second pass its own learnable CLS token, initialised from the
        CLS token; `shared` reuses the CLS token (ViTs only; CNNs have none).
    align_corners: sample the crop as GLSim's reference does (`F.upsample_bilinear`, i.e.
        align_corners=True); with box_end=exclusive its crops exactly. Default: half-pixel centres,
        as every resize of the loaders."""

    name = "selector"
    needs_transformer = False
    needs_boxes = False  # reads the ground-truth boxes (the oracle)

    def __init__(self, top_k: int = 8, box_end: str = "inclusive", crop_size: int | None = None,
                 crop_source: str = "input", source_scale: float = 2.0, crop_cls: str = "separate",
                 align_corners: bool = False):
        super().__init__()
        _check("box_end", box_end, BOX_ENDS)
        _check("crop_source", crop_source, ("input", "original"))
        _check("crop_cls", crop_cls, ("separate", "shared"))
        if top_k < 1:
            raise ConfigError(f"selector.top_k={top_k}: must be at least 1")
        if crop_size is not None and crop_size < 8:
            raise ConfigError(f"selector.crop_size={crop_size}: must be at least 8 (or null for the input size)")
        if source_scale < 1:
            raise ConfigError(f"selector.source_scale={source_scale}: must be at least 1")
        self.top_k, self.box_end, self.crop_size = top_k, box_end, crop_size
        self.crop_cls, self.align_corners = crop_cls, align_corners
        self.source_scale = source_scale_of(crop_source, source_scale)

    def scores(self, tokens: Tokens) -> torch.Tensor:
        """(B, h*w) patch scores; higher is more discriminative."""
        raise NotImplementedError

    @contextlib.contextmanager
    def watch(self, backbone: Backbone) -> Iterator[None]:
        """Context around the first pass, for selectors that need more than its output tokens."""
        yield

    @torch.no_grad()
    def forward(self, tokens: Tokens, image_hw: tuple[int, int], truth: torch.Tensor | None = None) -> Selection:
        """Boxes for the images whose first pass gave `tokens`; `truth` (B, 4), the ground-truth
        boxes as fractions of the image, is read by the oracle only."""
        scores = self.scores(tokens)
        boxes = topk_boxes(scores, tokens.grid_hw, tokens.stride_hw, image_hw, self.top_k, self.box_end)
        return Selection(boxes, scores.unflatten(-1, tokens.grid_hw))


class GLSimSelector(Selector):
    """GLSim: similarity between the CLS token and every patch token of the final encoder output
    (cos, or the negative L1 / L2 distance)."""

    name = "glsim"

    def __init__(self, metric: str = "cos", **kwargs):
        super().__init__(**kwargs)
        _check("metric", metric, METRICS)
        self.metric = metric

    def scores(self, tokens: Tokens) -> torch.Tensor:
        g, patches = tokens.cls.float(), tokens.patches.float()
        if self.metric == "cos":
            return torch.einsum("bd,bnd->bn", F.normalize(g, dim=-1), F.normalize(patches, dim=-1))
        return -torch.linalg.vector_norm(patches - g[:, None], ord=1 if self.metric == "l1" else 2, dim=-1)


class RandomSelector(Selector):
    """Baseline: the box around k patches drawn at random."""

    name = "random"

    def scores(self, tokens: Tokens) -> torch.Tensor:
        return torch.rand(tokens.patches.shape[:2], device=tokens.patches.device)


class CenterSelector(GLSimSelector):
    """Baseline: a centred square box with the area of GLSim's mean box over the batch (so it
    crops as much as GLSim would, from a fixed place)."""

    name = "center"

    @torch.no_grad()
    def forward(self, tokens: Tokens, image_hw: tuple[int, int], truth: torch.Tensor | None = None) -> Selection:
        glsim = super().forward(tokens, image_hw).boxes
        side = ((glsim[:, 2] - glsim[:, 0]) * (glsim[:, 3] - glsim[:, 1])).mean().sqrt()
        h, w = image_hw
        half_w, half_h = side.clamp(max=w) / 2, side.clamp(max=h) / 2
        box = torch.stack([w / 2 - half_w, h / 2 - half_h, w / 2 + half_w, h / 2 + half_h])
        return Selection(box.expand(glsim.shape[0], 4), None)  # shape[0], not len(): an export keeps it symbolic


class OracleSelector(Selector):
    """Upper bound: the ground-truth box of each image (the part of data=synth_parts, the
    object of CUB), at training and at evaluation, so a table shows how much a perfect selector
    would gain. An image whose box the augmentation cut away is taken whole. Data without boxes
    is refused before training (`needs_boxes`)."""

    name = "oracle"
    needs_boxes = True

    def __init__(self, crop_size: int | None = None, crop_source: str = "input", source_scale: float = 2.0,
                 crop_cls: str = "separate", align_corners: bool = False):
        super().__init__(crop_size=crop_size, crop_source=crop_source, source_scale=source_scale, crop_cls=crop_cls,
                         align_corners=align_corners)

    @torch.no_grad()
    def forward(self, tokens: Tokens, image_hw: tuple[int, int], truth: torch.Tensor | None = None) -> Selection:
        if truth is None:
            raise ConfigError("selector=oracle crops the ground-truth boxes, and none were given (only labelled "
                              "data with bounding boxes has them)")
        h, w = image_hw
        truth = truth.float()
        known = truth.isfinite().all(-1, keepdim=True)
        fractions = torch.cat([torch.where(known, truth[:, :2], 0), torch.where(known, truth[:, 2:], 1)], dim=-1)
        return Selection(scale_boxes(fractions, w, h), None)


class RolloutSelector(Selector):
    """Baseline: attention rollout (Abnar & Zuidema) over all layers, the CLS row as scores.

    Per layer: head-averaged attention A, with the residual as 0.5 A + 0.5 I; the product over
    layers; the CLS token's row over the patches. It needs attention probabilities, so it
    switches timm's fused attention off in every block while the first pass runs (only then)."""

    name = "rollout"
    needs_transformer = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._maps: list[torch.Tensor] = []
        self._prefix = 1

    @contextlib.contextmanager
    def watch(self, backbone: Backbone) -> Iterator[None]:
        attns = [blk.attn for blk in backbone.model.blocks]
        fused = [a.fused_attn for a in attns]
        self._maps, self._prefix = [], backbone.model.num_prefix_tokens

        def keep(module, inputs):  # the dropout's input: the attention probabilities
            self._maps.append(inputs[0].detach())

        hooks = [a.attn_drop.register_forward_pre_hook(keep) for a in attns]
        for a in attns:
            a.fused_attn = False
        try:
            yield
        finally:
            for a, f, hook in zip(attns, fused, hooks):
                a.fused_attn = f
                hook.remove()

    def scores(self, tokens: Tokens) -> torch.Tensor:
        if not self._maps:
            raise RuntimeError("RolloutSelector: call the first pass inside selector.watch(backbone)")
        rollout = None
        for attn in self._maps:
            a = attn.float().mean(1)
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
            rollout = a if rollout is None else a @ rollout
        self._maps = []
        return rollout[:, 0, self._prefix:]


def _check(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"selector.{key}={value}: choose one of {', '.join(choices)}")
