"""FFVT (Wang et al., BMVC 2021): feature fusion. At each block but the last, mutual attention
weight selection (MAWS) keeps the `num_token` patches whose attention with the CLS token is
strongest both ways, taken from that block's output; the CLS token entering the last block and all
the kept tokens pass the last block, whose CLS token is classified.

Stages of the cost report: "selection" (the MAWS scores and their top-k, all blocks), "last_block"
(the last block and the final norm on the fused sequence)."""

from __future__ import annotations

import torch
from torch import nn

from fgvr.models.backbone import Backbone
from fgvr.models.methods.base import Method, MethodOutput, enclosing_box, token_boxes
from fgvr.models.methods.vit import Pass, check_vit, first_blocks, gather, last_block, patch_layout
from fgvr.runtime.errors import ConfigError


@torch.no_grad()
def maws_scores(p: Pass, i: int) -> torch.Tensor:
    """Block i's MAWS score of each patch (B, N): a * b, with a the CLS row of the head-averaged
    attention probabilities (how much CLS attends to the patch) and b the head-averaged softmax of
    the raw scores over the queries, column 0 (how much the patch attends to CLS, relative to the
    other tokens). Both need one row and one column of the scores only: O(N) per head, not O(N^2)."""
    q, k = (t.float() for t in p.qk[i])
    q = q * p.scale
    a = (q[:, :, :1] @ k.transpose(-2, -1)).softmax(-1)[:, :, 0].mean(1)  # (B, P+N) CLS -> every token
    b = (q @ k[:, :, :1].transpose(-2, -1))[..., 0].softmax(-1).mean(1)  # (B, P+N) every token -> CLS
    return (a * b)[:, p.prefix:]


class FFVT(Method):
    """FFVT on a timm ViT: the top `num_token` patches of each of blocks 0..L-2 by MAWS, from that
    block's output, after the prefix (CLS) tokens entering the last block, through the last block and
    the final norm; linear head on the CLS token. Loss: "ce".

    num_token: patches kept per block (12 in the paper; 24 in its Stanford Dogs setting); at most the
        number of patches.
    dropout: dropout on the CLS feature before the head (none in the reference)."""

    name = "ffvt"
    needs_transformer = True

    def __init__(self, backbone: Backbone, num_classes: int, label_smoothing: float = 0.0, *,
                 num_token: int = 12, dropout: float = 0.0):
        super().__init__(label_smoothing)
        model = backbone.model
        check_vit(model, self.name)
        patches = model.patch_embed.num_patches
        if num_token < 1 or (patches is not None and num_token > patches):
            raise ConfigError(f"method.num_token={num_token}: choose 1..{patches or 'the patch count'} (the patches "
                              "of one block at the input size); 12 in the paper")
        if not 0 <= dropout < 1:
            raise ConfigError(f"method.dropout={dropout}: must be in [0, 1)")
        self.num_token = num_token
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, backbone: Backbone, x: torch.Tensor, labels: torch.Tensor | None = None) -> MethodOutput:
        model = backbone.model
        p = first_blocks(model, x)
        patches = p.hidden.shape[1] - p.prefix
        if self.num_token > patches:
            raise ConfigError(f"method.num_token={self.num_token}: a {x.shape[-2]}x{x.shape[-1]} input has only "
                              f"{patches} patches; lower method.num_token")
        with self.stage("selection"), torch.autocast(x.device.type, enabled=False):
            index = [maws_scores(p, i).topk(self.num_token, dim=-1).indices for i in range(len(p.outputs))]
        parts = [gather(out, idx + p.prefix) for out, idx in zip(p.outputs, index)]
        with self.stage("last_block"):
            feat = last_block(model, torch.cat([p.hidden[:, :p.prefix], *parts], dim=1))[:, 0]
        logits = self.head(self.drop(feat))
        index = torch.cat(index, dim=1)  # (B, (L-1) num_token), block by block
        image_hw = tuple(x.shape[-2:])
        boxes = token_boxes(index, *patch_layout(model, image_hw), image_hw)
        losses = {"ce": self.ce(logits, labels)} if labels is not None else {}
        return MethodOutput(logits, losses, {"tokens": index, "token_boxes": boxes, "boxes": enclosing_box(boxes)})
