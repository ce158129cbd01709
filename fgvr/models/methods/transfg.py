"""TransFG (He et al., AAAI 2022): the Part Selection Module picks, per attention head, the patch the
CLS token attends to most through all blocks but the last; only those patches and the CLS token
enter the last block, whose CLS token is classified. A contrastive loss on the batch's CLS features
pulls same-class images together and pushes different-class ones below a cosine margin.

Stages of the cost report: "selection" (the attention product and its argmax), "last_block" (the
last block and the final norm on the short sequence)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed
from torch import nn

from fgvr.models.backbone import Backbone
from fgvr.models.methods.base import Method, MethodOutput, enclosing_box, token_boxes
from fgvr.models.methods.vit import Pass, check_vit, first_blocks, gather, last_block, patch_layout
from fgvr.runtime.errors import ConfigError


def part_select(p: Pass) -> torch.Tensor:
    """(B, H) patch indices: per head, the argmax over the patches of the CLS row of the attention
    product A_{L-2} ... A_1 A_0 (no identity term, no head averaging), as the reference's Part_Attention.

    Only that row is needed, so it is carried as a row vector through the matrices, e0^T A_{L-2} first:
    the same selection for L H N^2 multiply-adds instead of the full product's L H N^3."""
    last = len(p.qk) - 1
    row = p.probs(last)[:, :, :1]  # (B, H, 1, P+N)
    for i in range(last - 1, -1, -1):
        row = row @ p.probs(i)
    return row[:, :, 0, p.prefix:].argmax(-1)


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.4) -> torch.Tensor:
    """TransFG's contrastive term on (B, D) features: over all B x B pairs of L2-normalised features,
    1 - cos for same-label pairs, max(cos - margin, 0) for the others, summed and divided by B^2.

    With class probabilities (B, C) for labels (mixed images), a pair is the same class with the
    probability that labels drawn from the two are (p_i . p_j; an image is always its own class):
    the hard term's expectation over such draws, and the hard term itself for one-hot rows."""
    with torch.autocast(features.device.type, enabled=False):  # float32 even inside the run's bf16 autocast
        z = F.normalize(features.float(), dim=-1)
        cos = z @ z.t()
        if labels.is_floating_point():
            same = (labels.float() @ labels.float().t()).fill_diagonal_(1)
        else:
            same = (labels[:, None] == labels[None, :]).float()
        return (same * (1 - cos) + (1 - same) * (cos - margin).clamp(min=0)).sum() / z.shape[0] ** 2


def overlap_patch_embed(model: nn.Module, stride: int) -> None:
    """Make a timm ViT's patch embedding overlap: its conv slides by `stride` (< the patch) over the
    image, and the position embedding is resampled to the larger grid (the prefix tokens' kept)."""
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d) or pe.img_size is None:
        raise ConfigError(f"method.overlap_stride={stride}: needs a ViT with timm's plain PatchEmbed and a fixed "
                          f"img_size; {type(model).__name__}'s {type(pe).__name__} has none; set method.overlap_stride="
                          "null")
    if not 1 <= stride <= min(pe.patch_size):
        raise ConfigError(f"method.overlap_stride={stride}: the patches would leave gaps (or the stride is not "
                          f"positive); choose 1..{min(pe.patch_size)}, the patch size (12 for 16 px patches in the "
                          "paper), or null")
    old = pe.grid_size
    grid = tuple((size - patch) // stride + 1 for size, patch in zip(pe.img_size, pe.patch_size))
    pe.proj.stride = (stride, stride)
    pe.grid_size, pe.num_patches = grid, grid[0] * grid[1]
    if getattr(model, "pos_embed", None) is not None:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        with torch.no_grad():
            resampled = resample_abs_pos_embed(model.pos_embed.data, new_size=grid, old_size=old,
                                               num_prefix_tokens=prefix)
        model.pos_embed = nn.Parameter(resampled, requires_grad=model.pos_embed.requires_grad)


class TransFG(Method):
    """TransFG on a timm ViT: K = num_heads part tokens (one per head of the Part Selection Module)
    from the tokens entering the last block, after the prefix (CLS) tokens, through the last block
    and the final norm; linear head on the CLS token. Losses: "ce" and "contrastive".

    contrastive_weight: weight of the contrastive term (0 leaves it out).
    margin: cosine below which different-class pairs cost nothing (0.4 in the paper).
    dropout: dropout on the CLS feature before the head (none in the reference).
    overlap_stride: the overlapping patch embedding: the patch conv's stride in pixels (12 for 16 px
        patches in the paper; null: the model's own, non-overlapping); the position embedding is
        resampled to the larger grid when the method is built, after the backbone's weights load."""

    name = "transfg"
    needs_transformer = True

    def __init__(self, backbone: Backbone, num_classes: int, label_smoothing: float = 0.0, *,
                 contrastive_weight: float = 1.0, margin: float = 0.4, dropout: float = 0.0,
                 overlap_stride: int | None = None):
        super().__init__(label_smoothing)
        model = backbone.model
        check_vit(model, self.name)
        if contrastive_weight < 0:
            raise ConfigError(f"method.contrastive_weight={contrastive_weight}: must be >= 0 (0 turns it off)")
        if not 0 <= dropout < 1:
            raise ConfigError(f"method.dropout={dropout}: must be in [0, 1)")
        if overlap_stride is not None:
            overlap_patch_embed(model, overlap_stride)
        self.contrastive_weight, self.margin = contrastive_weight, margin
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, backbone: Backbone, x: torch.Tensor, labels: torch.Tensor | None = None) -> MethodOutput:
        model = backbone.model
        p = first_blocks(model, x)
        with self.stage("selection"), torch.autocast(x.device.type, enabled=False):
            index = part_select(p)  # (B, H)
        tokens = torch.cat([p.hidden[:, :p.prefix], gather(p.hidden, index + p.prefix)], dim=1)
        with self.stage("last_block"):
            feat = last_block(model, tokens)[:, 0]
        logits = self.head(self.drop(feat))
        image_hw = tuple(x.shape[-2:])
        boxes = token_boxes(index, *patch_layout(model, image_hw), image_hw)
        losses = {}
        if labels is not None:
            losses["ce"] = self.ce(logits, labels)
            if self.contrastive_weight:
                losses["contrastive"] = self.contrastive_weight * contrastive_loss(feat, labels, self.margin)
        return MethodOutput(logits, losses, {"tokens": index, "token_boxes": boxes, "boxes": enclosing_box(boxes)})
