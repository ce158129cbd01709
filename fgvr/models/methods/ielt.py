"""IELT (Xu et al., IEEE TMM 2023): internal ensemble learning transformer. The heads of each
block are weak learners that vote for patches; the blocks' picks are refined together, voted on
again, and the winners classified.

- Multi-head voting (MHV), at each block 0..L-2: every head votes for the `vote_k` patches its
  CLS row attends to most; the votes are counted per patch, smoothed on the patch grid by the
  fixed kernel [1,2,1; 2,4,2; 1,2,1] (zero padding), and the block's `select_num[block]` best
  patches are taken from that block's output.
- Cross-layer refinement (CLR): the CLS token entering the last block and all the picks pass a
  refinement block and its norm; a second vote on that block's attention (no smoothing) picks
  `vote_k` of the refined tokens, which pass the backbone's last block and final norm after the
  same CLS token. One linear head classifies both CLS tokens: the refined one gives the
  "complement" logits, the last block's the "part" logits, to which the assist logits
  softmax(complement) * (the sum of each class's head weights) are added. Part logits are the
  prediction, in training and at test time (the reference's `model(x)`).
- Dynamic selection (DS): after `update_warm` training forwards, the share of each block in the
  second vote's picks moves the per-block selection rates: rate <- normalised((1 - update_rate)
  * rate + update_rate * share).

Stages of the cost report: "selection" (the votes, their smoothing and top-k, all blocks),
"refinement" (the refinement block, its norm, the second vote and the rate update), "last_block"
(the last block and the final norm)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fgvr.models.backbone import Backbone
from fgvr.models.methods.base import Method, MethodOutput, enclosing_box, token_boxes
from fgvr.models.methods.vit import check_vit, first_blocks, gather, keeping_qk, last_block, patch_layout
from fgvr.runtime.errors import ConfigError

RATE_SHAPES = ("v", "uniform")


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, prefix: int) -> torch.Tensor:
    """The CLS row of the attention probabilities, over the tokens after the prefix: (B, H, N),
    float32. Only that row of the scores is computed, O(N) per head."""
    scores = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # (B, H, 1, P+N)
    return scores.softmax(-1)[:, :, 0, prefix:]


def head_votes(attn: torch.Tensor, vote_k: int) -> torch.Tensor:
    """(B, H, N) attention -> (B, N) votes: how many heads have each token among their top `vote_k`."""
    index = attn.topk(vote_k, dim=-1).indices.flatten(1)  # (B, H * vote_k)
    return attn.new_zeros(attn.shape[0], attn.shape[-1]).scatter_add_(1, index, attn.new_ones(index.shape))


def smooth_votes(votes: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h*w) votes convolved on the grid with [1,2,1; 2,4,2; 1,2,1] (zero padding), as the
    separable [1,2,1] along rows then columns: exact integers in float32."""
    v = F.pad(votes.unflatten(1, grid_hw), (1, 1, 1, 1))
    v = v[:, :-2] + 2 * v[:, 1:-1] + v[:, 2:]
    return (v[..., :-2] + 2 * v[..., 1:-1] + v[..., 2:]).flatten(1)


def rank_by_votes(votes: torch.Tensor) -> torch.Tensor:
    """Token indices by votes, most first; ties go to the lower index (a stable sort)."""
    return votes.sort(dim=-1, descending=True, stable=True).indices


def layer_counts(rates: torch.Tensor, total: int) -> torch.Tensor:
    """Per-block selection counts (long) from the rates, summing to exactly `total`: each block gets
    the floor of its share, the blocks with the largest remainders one more (largest remainder), so
    the refined sequence has a fixed length and no count goes to the host."""
    raw = rates.float() * (total / rates.float().sum())
    base = raw.floor()
    order = (raw - base).argsort(descending=True, stable=True).argsort()  # rank of each block's remainder
    return (base + (order < total - base.sum())).long()


def initial_rates(select_rates: str | Sequence[float], layers: int) -> torch.Tensor:
    """The selection rates before any update, summing to 1. `v`: the reference's V over the blocks
    (16, 14, ..., 6, ..., 14, 16 for 11 blocks), 6 + 10 |t| for t evenly spaced in [-1, 1]."""
    if isinstance(select_rates, str):
        if select_rates not in RATE_SHAPES:
            raise ConfigError(f"method.select_rates={select_rates}: choose one of {', '.join(RATE_SHAPES)} or a "
                              f"list of {layers} positive numbers (one per block but the last)")
        rates = 6 + 10 * torch.linspace(-1, 1, layers).abs() if select_rates == "v" else torch.ones(layers)
    else:
        rates = torch.tensor([float(r) for r in select_rates])
        if rates.numel() != layers or not bool((rates > 0).all()):
            raise ConfigError(f"method.select_rates={list(select_rates)}: needs {layers} positive numbers (one per "
                              "block but the last), or v | uniform")
    return rates / rates.sum()


class IELT(Method):
    """IELT on a timm ViT. Loss terms: "ce" = (1 - loss_alpha) CE(part logits) and "complement" =
    loss_alpha CE(complement logits). Extras: "tokens" (B, vote_k), the patches of the refined tokens
    the second vote picked (those the last block reads; a patch picked at two blocks can appear
    twice), their "token_boxes" and the "boxes" around them, and "layer_tokens" (B, total_num), the
    patches every block's vote kept, block by block.

    vote_k: patches each head votes for, in both votes (24), at most the patches (the picks).
    total_num: patches kept over all blocks (126, the sum of the reference's 16..6..16); at most the
        patch count, which is used when it is smaller (e.g. 49 for a 7x7 grid).
    select_rates: the blocks' initial shares of total_num: v (the reference's) | uniform | a list.
    dynamic_select: update the shares from the second vote (the reference's DS module).
    update_rate: weight of a batch's shares in the update (the reference's 1e-3).
    update_warm: training forwards before the shares move (the reference: 10 epochs; 3750 is 10
        epochs of CUB at batch 16).
    loss_alpha: weight of the complement loss (0.4).

    The refinement block and its norm start as copies of the backbone's last block and final norm
    (their pretrained weights), and train with a frozen backbone too (backbone.freeze); the head is
    zero-initialised, as the reference's. Prefix tokens (CLS, and registers where a ViT has them)
    lead both sequences. The rates and the forward count are buffers: DDP broadcasts rank 0's at
    every forward, so its batches drive the update."""

    name = "ielt"
    needs_transformer = True

    def __init__(self, backbone: Backbone, num_classes: int, label_smoothing: float = 0.0, *, vote_k: int = 24,
                 total_num: int = 126, select_rates: str | Sequence[float] = "v", dynamic_select: bool = True,
                 update_rate: float = 1e-3, update_warm: int = 3750, loss_alpha: float = 0.4):
        super().__init__(label_smoothing)
        model = backbone.model
        check_vit(model, self.name)
        layers = len(model.blocks) - 1
        patches = model.patch_embed.num_patches
        if vote_k < 1:
            raise ConfigError(f"method.vote_k={vote_k}: must be at least 1 (24 in the paper)")
        if total_num < 1:
            raise ConfigError(f"method.total_num={total_num}: must be at least 1 (126 in the paper)")
        if not 0 <= update_rate <= 1:
            raise ConfigError(f"method.update_rate={update_rate}: must be in [0, 1] (1e-3 in the reference)")
        if update_warm < 0:
            raise ConfigError(f"method.update_warm={update_warm}: must be at least 0")
        if not 0 <= loss_alpha <= 1:
            raise ConfigError(f"method.loss_alpha={loss_alpha}: must be in [0, 1] (0.4 in the paper)")
        self.total = min(total_num, patches) if patches is not None else total_num
        self.vote_k = vote_k
        self.dynamic_select, self.update_rate, self.update_warm = dynamic_select, update_rate, update_warm
        self.loss_alpha = loss_alpha
        self.refine = copy.deepcopy(model.blocks[-1]).requires_grad_(True)
        self.refine_norm = copy.deepcopy(model.norm).requires_grad_(True)
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # Persistent: checkpoints hold the adapted shares and the forwards counted, so a resume is exact.
        self.register_buffer("select_rate", initial_rates(select_rates, layers))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, backbone: Backbone, x: torch.Tensor, labels: torch.Tensor | None = None) -> MethodOutput:
        model = backbone.model
        p = first_blocks(model, x)
        image_hw = tuple(x.shape[-2:])
        grid, stride, patch = patch_layout(model, image_hw)
        patches = grid[0] * grid[1]
        if self.total > patches:
            raise ConfigError(f"method.total_num={self.total}: a {image_hw[0]}x{image_hw[1]} input has only "
                              f"{patches} patches; lower method.total_num")
        with self.stage("selection"), torch.autocast(x.device.type, enabled=False):
            counts = layer_counts(self.select_rate, self.total)
            layer_index, order = self.block_picks(p.qk, p.scale, p.prefix, grid, counts)
        # Each block's picks from that block's output, in the order `order` lists them.
        parts = torch.cat([gather(out[:, p.prefix:], idx) for out, idx in zip(p.outputs, layer_index.unbind(1))], dim=1)
        parts = parts.index_select(1, order)
        cls = p.hidden[:, :p.prefix]
        with self.stage("refinement"):
            refined, (q, k) = self.refined(torch.cat([cls, parts], dim=1))
            with torch.autocast(x.device.type, enabled=False):
                attn = cls_attention(q, k, self.refine.attn.scale, p.prefix)  # (B, H, total)
                vote_k = min(self.vote_k, self.total)
                picks = rank_by_votes(head_votes(attn, vote_k))[:, :vote_k]  # no smoothing: not a grid
                if self.training and labels is not None:
                    self.update(picks, counts)
        with self.stage("last_block"):
            key = last_block(model, torch.cat([cls, gather(refined[:, p.prefix:], picks)], dim=1))[:, 0]
        part, complement = self.logits(key, refined[:, 0])
        kept = layer_index.flatten(1).index_select(1, order)  # (B, total) patches, block by block
        tokens = kept.gather(1, picks)
        boxes = token_boxes(tokens, grid, stride, patch, image_hw)
        losses = self.losses(part, complement, labels) if labels is not None else {}
        extras = {"tokens": tokens, "token_boxes": boxes, "boxes": enclosing_box(boxes), "layer_tokens": kept}
        return MethodOutput(part, losses, extras)

    @torch.no_grad()
    def block_picks(self, qk: list[tuple[torch.Tensor, torch.Tensor]], scale: float, prefix: int,
                    grid_hw: tuple[int, int], counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-head voting at every block: (B, L-1, total) patch indices, each block's best
        `total` by smoothed votes (no block keeps more), and the positions (total,) in their
        flattened (L-1, total) layout of the first counts[i] of block i, block by block. The
        positions come from the counts on the device, so nothing waits for the host."""
        ranked = []
        for q, k in qk:
            attn = cls_attention(q, k, scale, prefix)
            votes = smooth_votes(head_votes(attn, min(self.vote_k, attn.shape[-1])), grid_hw)
            ranked.append(rank_by_votes(votes)[:, :self.total])
        ends = counts.cumsum(0)
        position = torch.arange(self.total, device=counts.device)
        block = torch.searchsorted(ends, position, right=True)  # the block each position of the sequence is from
        order = block * self.total + position - (ends - counts)[block]
        return torch.stack(ranked, dim=1), order

    def refined(self, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The refinement block and its norm, with the block's q and k (detached) for the vote."""
        with keeping_qk([self.refine]) as taps:
            out = self.refine_norm(self.refine(tokens))
        q, k = taps[0]
        return out, (q, k)

    @torch.no_grad()
    def update(self, picks: torch.Tensor, counts: torch.Tensor) -> None:
        """Dynamic selection: count the training forward; from `update_warm` forwards on, move the
        rates towards each block's share of the second vote's picks (positions in the refined
        sequence, whose blocks end at counts.cumsum()). On the device, no host sync."""
        self.steps += 1
        if not self.dynamic_select:
            return
        block = torch.searchsorted(counts.cumsum(0), picks.flatten(), right=True)
        chosen = torch.zeros_like(self.select_rate).scatter_add_(0, block, torch.ones_like(block, dtype=torch.float))
        rates = self.select_rate * (1 - self.update_rate) + self.update_rate * chosen / chosen.sum()
        self.select_rate.copy_(torch.where(self.steps >= self.update_warm, rates / rates.sum(), self.select_rate))

    def logits(self, key: torch.Tensor, refined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(part, complement) logits, float32, from the last block's and the refinement's CLS tokens:
        part = head(key) + softmax(head(refined)) * (each class's head weights summed)."""
        complement = self.head(refined).float()
        assist = complement.softmax(-1) * self.head.weight.float().sum(-1)
        return self.head(key).float() + assist, complement

    def losses(self, part: torch.Tensor, complement: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.loss_alpha
        return {"ce": (1 - a) * self.ce(part, labels), "complement": a * self.ce(complement, labels)}
