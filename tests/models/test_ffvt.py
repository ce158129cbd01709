"""FFVT: mutual attention weight selection (MAWS) against the scores written out from independently
captured attention, the fused sequence (CLS + each block's own selected tokens), gradient flow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgvr.models.backbone import Backbone
from fgvr.models.methods.ffvt import FFVT
from fgvr.runtime.errors import ConfigError
from tests.models.toy_vit import assert_patch_boxes, every_gradient, hand_set, toy, unfused_attention


def maws_by_hand(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B, N): the CLS row of the head-averaged probabilities times the head-averaged softmax over the
    queries (dim -2) of the raw scores, column 0, both over the patches."""
    a = probs.mean(1)[:, 0, 1:]
    b = scores.softmax(dim=-2).mean(1)[:, 1:, 0]
    return a * b


def fixed_selection(model: nn.Module, x: torch.Tensor, index: list[torch.Tensor]) -> torch.Tensor:
    """The CLS feature with the selection given as constants: CLS entering the last block, then for
    each block i < L-1 the tokens of its own output at index[i] (patch indices), last block, norm."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    parts = []
    for blk, idx in zip(model.blocks[:-1], index):
        h = blk(h)
        parts.append(torch.stack([h[b, 1 + idx[b]] for b in range(len(h))]))
    return model.norm(model.blocks[-1](torch.cat([h[:, :1], *parts], dim=1)))[:, 0]


@pytest.mark.parametrize("num_token", [1, 3])
def test_maws_selection_matches_the_hand_computation(num_token):
    backbone = toy()
    method = FFVT(backbone, 5, num_token=num_token).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = method(backbone, x).extras["tokens"]
    probs, scores = unfused_attention(backbone.model, x)
    assert all(torch.allclose(s.softmax(-1), p, atol=1e-6) for s, p in zip(scores, probs))  # one capture
    assert tokens.shape == (3, 2 * num_token)
    for i in range(2):  # blocks 0 and 1, in that order
        score = maws_by_hand(probs[i], scores[i])
        top = score.topk(num_token + 1, dim=-1).values
        assert ((top[:, -2] - top[:, -1]) / top[:, -2]).min() > 1e-3  # the kept set is clear
        expected = score.topk(num_token, dim=-1).indices
        assert torch.equal(tokens[:, i * num_token:(i + 1) * num_token].sort(-1).values, expected.sort(-1).values)


def test_maws_with_hand_set_attention():
    # Block b, head 0: CLS attends to u (score 3) and v (2); w (3) and v (2) attend to CLS; head 1 is
    # uniform. a alone picks u, b alone picks w; their product picks v (.116^2 > .266 x .041).
    picks = {0: (4, 7, 12), 1: (15, 2, 9)}  # block: (u, v, w), token indices
    design = {b: {0: [(0, u, 3.0), (0, v, 2.0), (w, 0, 3.0), (v, 0, 2.0)]} for b, (u, v, w) in picks.items()}
    backbone = toy()
    hand_set(backbone, design)
    method = FFVT(backbone, 5, num_token=1).eval()
    x = torch.randn(2, 3, 32, 32)
    probs, scores = unfused_attention(backbone.model, x)
    for b, (u, v, w) in picks.items():  # the design holds
        assert (probs[b].mean(1)[:, 0, 1:].argmax(-1) == u - 1).all()
        assert (scores[b].softmax(-2).mean(1)[:, 1:, 0].argmax(-1) == w - 1).all()
    assert method(backbone, x).extras["tokens"].tolist() == [[picks[0][1] - 1, picks[1][1] - 1]] * 2


def test_the_fused_sequence_is_cls_and_each_blocks_own_tokens_and_gradients_flow():
    backbone = toy()
    method = FFVT(backbone, 3, num_token=2).train()
    assert not {id(p) for p in method.parameters()} & {id(p) for p in backbone.parameters()}  # not its own
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 2])
    out = method(backbone, x, y)
    assert set(out.losses) == {"ce"} and torch.allclose(out.losses["ce"], F.cross_entropy(out.logits, y))
    out.losses["ce"].backward()
    grads = every_gradient(backbone, method)
    # With the same tokens given as constants, taken from each block's own output: the same logits
    # and the same gradient everywhere (the top-k adds no path of its own).
    index = list(out.extras["tokens"].split(2, dim=1))
    logits = method.head(fixed_selection(backbone.model, x, index))
    assert torch.allclose(logits, out.logits, atol=1e-5)
    F.cross_entropy(logits, y).backward()
    assert all(torch.allclose(g, again, atol=1e-5) for g, again in zip(grads, every_gradient(backbone, method)))


def test_eval_gives_logits_without_losses_and_label_smoothing_reaches_ce():
    backbone = toy()
    method = FFVT(backbone, 3, label_smoothing=0.2, num_token=2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 2])
    train = method.train()(backbone, x, y)
    assert torch.allclose(train.losses["ce"], F.cross_entropy(train.logits, y, label_smoothing=0.2))
    evaluated = method.eval()(backbone, x)
    assert evaluated.losses == {} and evaluated.logits.shape == (4, 3)
    assert torch.allclose(evaluated.logits, train.logits, atol=1e-5)


def test_bf16_autocast_forward_and_backward():
    backbone = toy()
    method = FFVT(backbone, 3, num_token=2).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(backbone, x, y)
    out.losses["ce"].backward()
    assert out.losses["ce"].isfinite() and out.logits.dtype == torch.bfloat16
    assert backbone.model.blocks[0].attn.qkv.weight.grad.isfinite().all()


def test_extras_are_the_selected_patches_in_pixels():
    backbone = toy()
    method = FFVT(backbone, 3, num_token=3).eval()
    assert_patch_boxes(method(backbone, torch.randn(5, 3, 32, 32)).extras, 5, 6)


@pytest.mark.parametrize("settings,key", [({"num_token": 17}, "num_token=17"), ({"num_token": 0}, "num_token=0"),
                                          ({"dropout": -0.1}, "dropout=-0.1")])
def test_bad_settings_are_refused_in_one_line(settings, key):
    with pytest.raises(ConfigError, match=f"method.{key}:") as e:
        FFVT(toy(peaky=False), 3, **settings)
    assert "\n" not in str(e.value)


def test_too_many_tokens_for_a_smaller_input_is_refused():
    backbone = toy(peaky=False, dynamic_img_size=True)
    method = FFVT(backbone, 3, num_token=16)  # all 16 patches at 32 px; a 24 px input has 9
    assert method(backbone, torch.randn(1, 3, 32, 32)).extras["tokens"].shape == (1, 32)
    with pytest.raises(ConfigError, match="method.num_token=16: a 24x24 input has only 9 patches"):
        method(backbone, torch.randn(1, 3, 24, 24))


def test_a_cnn_is_refused():
    with pytest.raises(ConfigError, match="method=ffvt: needs a timm ViT"):
        FFVT(Backbone("test_resnet"), 3)
