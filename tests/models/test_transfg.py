"""TransFG: the Part Selection Module against the attention product written out, the contrastive
loss on features with known cosines, gradient flow, and the overlapping patch embedding."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgvr.models.backbone import Backbone
from fgvr.models.methods.transfg import TransFG, contrastive_loss
from fgvr.runtime.errors import ConfigError

TOY = {"depth": 3, "embed_dim": 32, "num_heads": 2, "patch_size": 8}  # 32 px: a 4 x 4 grid, 17 tokens


def toy(peaky: bool = True, **kwargs) -> Backbone:
    """The 3-block toy ViT; `peaky` widens the q/k weights so that attention is far from uniform."""
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", kwargs={**TOY, **kwargs}, img_size=32)
    if peaky:
        for blk in backbone.model.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=0.5)
    return backbone


def unfused_probs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention probabilities from timm's unfused path: the input of attn_drop."""
    probs: list[torch.Tensor] = []
    attns = [blk.attn for blk in model.blocks]
    hooks = [a.attn_drop.register_forward_pre_hook(lambda m, inputs: probs.append(inputs[0].detach())) for a in attns]
    fused = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for a, f, hook in zip(attns, fused, hooks):
            a.fused_attn = f
            hook.remove()
    return probs


def fixed_selection(method: TransFG, model: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The CLS feature with the part tokens given as constants: embedding, blocks 0..L-2, CLS + the
    tokens at `index` (patch indices), last block, final norm."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks[:-1]:
        h = blk(h)
    parts = torch.stack([h[b, 1 + index[b]] for b in range(len(h))])
    return model.norm(model.blocks[-1](torch.cat([h[:, :1], parts], dim=1)))[:, 0]


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


def test_part_selection_is_the_argmax_of_the_full_attention_product():
    backbone = toy()
    method = TransFG(backbone, 5).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = method(backbone, x).extras["tokens"]
    a0, a1, _ = unfused_probs(backbone.model, x)
    cls_row = (a1 @ a0)[:, :, 0, 1:]  # the full product, later block on the left; CLS row over the patches
    top2 = cls_row.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4  # a clear argmax per head
    assert tokens.shape == (3, 2) and torch.equal(tokens, cls_row.argmax(-1))
    # The test tells the orders and head averaging apart on this input.
    assert not torch.equal(tokens, (a0 @ a1)[:, :, 0, 1:].argmax(-1))
    assert not torch.equal(tokens, (a1 @ a0).mean(1, keepdim=True)[:, :, 0, 1:].argmax(-1).expand(-1, 2))


def test_part_selection_with_hand_set_attention():
    # Head h: block 1's CLS attends to token m_h, and block 0's token m_h attends to token j_h, so the
    # product's CLS row peaks at j_h (patch j_h - 1). Block 0's own CLS looks at r_h, a decoy for the
    # wrong order; block 1's row alone would pick m_h.
    m, j, r = (5, 9), (11, 14), (3, 7)
    design = {1: {h: [(0, m[h], 40.0)] for h in range(2)},
              0: {h: [(m[h], j[h], 40.0), (0, r[h], 40.0)] for h in range(2)}}
    backbone = toy()
    hand_set(backbone, design)
    method = TransFG(backbone, 5).eval()
    x = torch.randn(2, 3, 32, 32)
    a0, a1, _ = unfused_probs(backbone.model, x)
    assert a1[:, 0, 0, m[0]].min() > 0.99 and a0[:, 1, m[1], j[1]].min() > 0.99  # the design holds
    assert method(backbone, x).extras["tokens"].tolist() == [[j[0] - 1, j[1] - 1]] * 2


def test_contrastive_loss_on_features_with_known_cosines():
    features = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0], [0.28, 0.96]])  # unit: (1,0) (.6,.8) (0,1)
    labels = torch.tensor([0, 0, 1, 2])
    # Same label: (0, 1), cos .6 -> .4; the diagonal costs 1 - 1 = 0. Different labels, margin .4:
    # (0, 2) cos 0 -> 0, (0, 3) cos .28 -> 0 (under the margin), (1, 2) .8 -> .4, (1, 3) .936 -> .536,
    # (2, 3) .96 -> .56. Each pair twice, over B^2 = 16.
    expected = 2 * (0.4 + 0.4 + 0.536 + 0.56) / 16
    assert contrastive_loss(features, labels) == pytest.approx(expected, abs=1e-6)
    # Without the margin every different-label pair costs its cosine (clamped at 0): it was at work.
    no_margin = 2 * (0.4 + 0.0 + 0.28 + 0.8 + 0.936 + 0.96) / 16
    assert contrastive_loss(features, labels, margin=0.0) == pytest.approx(no_margin, abs=1e-6)
    assert contrastive_loss(features[:1], labels[:1]) == pytest.approx(0.0, abs=1e-6)  # the diagonal alone


def test_losses_are_the_weighted_terms_and_eval_gives_none():
    backbone = toy()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 2])
    full = TransFG(backbone, 3, label_smoothing=0.1).train()
    out = full(backbone, x, y)
    assert set(out.losses) == {"ce", "contrastive"}
    assert torch.allclose(out.losses["ce"], F.cross_entropy(out.logits, y, label_smoothing=0.1))
    feat = fixed_selection(full, backbone.model, x, out.extras["tokens"])
    assert torch.allclose(out.losses["contrastive"], contrastive_loss(feat, y), atol=1e-6)
    half = TransFG(backbone, 3, contrastive_weight=0.5)
    half.load_state_dict(full.state_dict())
    assert torch.allclose(half(backbone, x, y).losses["contrastive"], out.losses["contrastive"] / 2, atol=1e-6)
    assert set(TransFG(backbone, 3, contrastive_weight=0.0)(backbone, x, y).losses) == {"ce"}
    evaluated = full.eval()(backbone, x)
    assert evaluated.losses == {} and evaluated.logits.shape == (4, 3)
    assert torch.allclose(evaluated.logits, out.logits, atol=1e-5)  # no dropout: the same prediction


def test_gradient_reaches_every_block_and_the_head_and_the_selection_carries_none():
    backbone = toy()
    method = TransFG(backbone, 3).train()
    assert not {id(p) for p in method.parameters()} & {id(p) for p in backbone.parameters()}  # not its own
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 2])
    out = method(backbone, x, y)
    sum(out.losses.values()).backward()
    params = list(itertools.chain(backbone.named_parameters(), method.named_parameters()))
    for name, p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    grads = [p.grad.clone() for _, p in params]
    for _, p in params:
        p.grad = None
    # With the same tokens given as constants, the loss and every gradient are the same: the argmax
    # adds no path of its own.
    feat = fixed_selection(method, backbone.model, x, out.extras["tokens"])
    logits = method.head(feat)
    assert torch.allclose(logits, out.logits, atol=1e-5)
    (method.ce(logits, y) + contrastive_loss(feat, y)).backward()
    for (name, p), g in zip(params, grads):
        assert torch.allclose(p.grad, g, atol=1e-5), name


def test_bf16_autocast_forward_and_backward():
    backbone = toy()
    method = TransFG(backbone, 3).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(backbone, x, y)
        loss = sum(out.losses.values())
    loss.backward()
    assert all(v.isfinite() for v in out.losses.values()) and out.logits.dtype == torch.bfloat16
    assert backbone.model.blocks[0].attn.qkv.weight.grad.isfinite().all()


def test_extras_are_the_selected_patches_in_pixels():
    backbone = toy()
    method = TransFG(backbone, 3).eval()
    extras = method(backbone, torch.randn(5, 3, 32, 32)).extras
    tokens, boxes = extras["tokens"], extras["token_boxes"]
    assert tokens.shape == (5, 2) and tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < 16
    rows, cols = tokens // 4, tokens % 4
    assert torch.equal(boxes, torch.stack([cols * 8, rows * 8, cols * 8 + 8, rows * 8 + 8], -1).float())
    enclosing = torch.cat([boxes[..., :2].amin(1), boxes[..., 2:].amax(1)], -1)
    assert extras["boxes"].shape == (5, 4) and torch.equal(extras["boxes"], enclosing)


def test_overlapping_patch_embedding():
    backbone = toy()
    old_pos = backbone.model.pos_embed.detach().clone()
    method = TransFG(backbone, 3, overlap_stride=4).eval()
    model = backbone.model
    assert model.patch_embed.proj.stride == (4, 4) and model.patch_embed.grid_size == (7, 7)  # (32 - 8) / 4 + 1
    assert model.pos_embed.shape == (1, 50, 32) and isinstance(model.pos_embed, nn.Parameter)
    assert torch.equal(model.pos_embed[:, :1], old_pos[:, :1])  # the CLS token's entry is kept
    assert model.patch_embed(torch.randn(1, 3, 32, 32)).shape == (1, 49, 32)
    out = method(backbone, torch.randn(3, 3, 32, 32))
    assert out.logits.shape == (3, 3) and out.logits.isfinite().all()
    tokens, boxes = out.extras["tokens"], out.extras["token_boxes"]
    assert tokens.max() < 49
    rows, cols = tokens // 7, tokens % 7  # 8 px patches every 4 px: the boxes overlap
    assert torch.equal(boxes, torch.stack([cols * 4, rows * 4, cols * 4 + 8, rows * 4 + 8], -1).float())


def test_overlap_stride_equal_to_the_patch_changes_nothing():
    x = torch.randn(2, 3, 32, 32)
    plain_backbone, same_backbone = toy(), toy()
    plain = TransFG(plain_backbone, 3).eval()
    same = TransFG(same_backbone, 3, overlap_stride=8).eval()
    same.load_state_dict(plain.state_dict())
    a, b = plain(plain_backbone, x), same(same_backbone, x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.extras["token_boxes"], b.extras["token_boxes"])


def test_overlap_with_dynamic_image_size_runs_at_other_sizes():
    backbone = toy(dynamic_img_size=True)
    method = TransFG(backbone, 3, overlap_stride=4).eval()
    for side, grid in ((32, 7), (40, 9)):
        out = method(backbone, torch.randn(2, 3, side, side))
        tokens, boxes = out.extras["tokens"], out.extras["token_boxes"]
        assert out.logits.isfinite().all() and tokens.max() < grid * grid
        rows, cols = tokens // grid, tokens % grid
        assert torch.equal(boxes[..., :2], torch.stack([cols * 4, rows * 4], -1).float())


@pytest.mark.parametrize("settings,key", [({"overlap_stride": 9}, "overlap_stride=9"),
                                          ({"overlap_stride": 0}, "overlap_stride=0"),
                                          ({"contrastive_weight": -1.0}, "contrastive_weight=-1.0"),
                                          ({"dropout": 1.0}, "dropout=1.0")])
def test_bad_settings_are_refused_in_one_line(settings, key):
    with pytest.raises(ConfigError, match=f"method.{key}:") as e:
        TransFG(toy(peaky=False), 3, **settings)
    assert "\n" not in str(e.value)


def test_a_cnn_is_refused():
    with pytest.raises(ConfigError, match="method=transfg: needs a timm ViT"):
        TransFG(Backbone("test_resnet"), 3)
