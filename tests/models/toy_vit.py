"""A toy ViT for the token-selection methods' tests: its attention captured by timm's unfused path,
independently of fgvr's q/k hooks, and weights set by hand so that the attention is known."""

from __future__ import annotations

import torch
from torch import nn

from fgvr.models.backbone import Backbone

TOY = {"depth": 3, "embed_dim": 32, "num_heads": 2, "patch_size": 8}  # 32 px: a 4 x 4 grid, 17 tokens


def toy(peaky: bool = True, **kwargs) -> Backbone:
    """The 3-block toy ViT; `peaky` widens the q/k weights so that attention is far from uniform."""
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", kwargs={**TOY, **kwargs}, img_size=32)
    if peaky:
        for blk in backbone.model.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=0.5)
    return backbone


def unfused_attention(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each block's attention probabilities from timm's unfused path (the input of attn_drop) and
    its raw scores q k^T / sqrt(d), from the output of its qkv projection."""
    probs: list[torch.Tensor] = []
    qkv: list[torch.Tensor] = []
    attns = [blk.attn for blk in model.blocks]
    hooks = [a.attn_drop.register_forward_pre_hook(lambda m, inputs: probs.append(inputs[0].detach())) for a in attns]
    hooks += [a.qkv.register_forward_hook(lambda m, inputs, out: qkv.append(out.detach())) for a in attns]
    fused = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for a, f in zip(attns, fused):
            a.fused_attn = f
        for hook in hooks:
            hook.remove()
    heads = attns[0].num_heads
    scores = []
    for out in qkv:
        q, k, _ = out.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # (B, H, T, d) each
        scores.append(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5)
    return probs, scores


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def attend(triples: list[tuple[int, int, float]], tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token queries and keys (tokens, head_dim) whose raw score (q.k / sqrt(d)) is the given one
    for each (query, key, score) and 0 for every other pair: each named key on a channel of its own."""
    channel = {s: c for c, s in enumerate(sorted({s for _, s, _ in triples}))}
    q, k = torch.zeros(tokens, head_dim), torch.zeros(tokens, head_dim)
    for s, c in channel.items():
        k[s, c] = 1.0
    for t, s, score in triples:
        q[t, channel[s]] = score * head_dim ** 0.5
    return q, k


def hand_set(backbone: Backbone, design: dict[int, dict[int, list[tuple[int, int, float]]]]) -> None:
    """Blocks 0..L-2 pass their input through unchanged (attention and MLP outputs zeroed); token t
    enters as x_t, a zero-mean +-1 row of a Hadamard matrix (LayerNorm leaves it as it is); block b,
    head h gets the queries and keys of attend(design[b][h]), through W = Q^T X / D (the x_t are
    orthogonal, |x_t|^2 = D), other heads none (uniform attention)."""
    model = backbone.model
    tokens, dim = model.pos_embed.shape[1:]
    heads = model.blocks[0].attn.num_heads
    d = dim // heads
    x = hadamard(dim)[1:tokens + 1]
    with torch.no_grad():
        for t in (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.cls_token):
            t.zero_()
        model.pos_embed.copy_(x[None])
        for b, blk in enumerate(model.blocks[:-1]):
            for t in (blk.attn.proj.weight, blk.attn.proj.bias, blk.mlp.fc2.weight, blk.mlp.fc2.bias,
                      blk.attn.qkv.weight, blk.attn.qkv.bias):
                t.zero_()
            for h, triples in design.get(b, {}).items():
                q, k = attend(triples, tokens, d)
                blk.attn.qkv.weight[h * d:(h + 1) * d] = q.t() @ x / dim
                blk.attn.qkv.weight[dim + h * d:dim + (h + 1) * d] = k.t() @ x / dim



def assert_patch_boxes(extras: dict, batch: int, count: int) -> None:
    """A method's extras on 32 px inputs of the toy ViT (8 px patches, a 4 x 4 grid): `count` selected
    patch indices per image, their pixel boxes, and the box around them."""
    tokens, boxes = extras["tokens"], extras["token_boxes"]
    assert tokens.shape == (batch, count) and tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < 16
    rows, cols = tokens // 4, tokens % 4
    assert torch.equal(boxes, torch.stack([cols * 8, rows * 8, cols * 8 + 8, rows * 8 + 8], -1).float())
    enclosing = torch.cat([boxes[..., :2].amin(1), boxes[..., 2:].amax(1)], -1)
    assert extras["boxes"].shape == (batch, 4) and torch.equal(extras["boxes"], enclosing)



def every_gradient(backbone: Backbone, method: nn.Module) -> list[torch.Tensor]:
    """After a backward: every parameter of the backbone and the method has a non-zero gradient.
    Returns the gradients (in parameter order) and clears them."""
    params = [*backbone.named_parameters(), *method.named_parameters()]
    for name, p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    grads = [p.grad.clone() for _, p in params]
    for _, p in params:
        p.grad = None
    return grads
