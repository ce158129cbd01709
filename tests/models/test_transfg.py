"""TransFG: the Part Selection Module against the attention product written out, the contrastive
loss on features with known cosines, gradient flow, and the overlapping patch embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgvr.models.backbone import Backbone
from fgvr.models.methods.transfg import TransFG, contrastive_loss
from fgvr.runtime.errors import ConfigError
from tests.models.toy_vit import assert_patch_boxes, every_gradient, hand_set, toy, unfused_attention


def fixed_selection(method: TransFG, model: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The CLS feature with the part tokens given as constants: embedding, blocks 0..L-2, CLS + the
    tokens at `index` (patch indices), last block, final norm."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks[:-1]:
        h = blk(h)
    parts = torch.stack([h[b, 1 + index[b]] for b in range(len(h))])
    return model.norm(model.blocks[-1](torch.cat([h[:, :1], parts], dim=1)))[:, 0]


def test_part_selection_is_the_argmax_of_the_full_attention_product():
    backbone = toy()
    method = TransFG(backbone, 5).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = method(backbone, x).extras["tokens"]
    a0, a1, _ = unfused_attention(backbone.model, x)[0]
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
    a0, a1, _ = unfused_attention(backbone.model, x)[0]
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
    grads = every_gradient(backbone, method)
    # With the same tokens given as constants, the loss and every gradient are the same: the argmax
    # adds no path of its own.
    feat = fixed_selection(method, backbone.model, x, out.extras["tokens"])
    logits = method.head(feat)
    assert torch.allclose(logits, out.logits, atol=1e-5)
    (method.ce(logits, y) + contrastive_loss(feat, y)).backward()
    assert all(torch.allclose(g, again, atol=1e-5) for g, again in zip(grads, every_gradient(backbone, method)))


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
    assert_patch_boxes(method(backbone, torch.randn(5, 3, 32, 32)).extras, 5, 2)


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
