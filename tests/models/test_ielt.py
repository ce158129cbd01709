"""IELT: multi-head voting, smoothing and top-k against hand computations on attention captured
from timm's unfused path; the refinement and the second vote; dynamic selection; the loss terms;
gradient flow; bf16; eval mode and checkpointed buffers."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fgvr.models.backbone import Backbone
from fgvr.models.methods.ielt import (
    IELT,
    head_votes,
    initial_rates,
    layer_counts,
    smooth_votes,
)
from fgvr.runtime.errors import ConfigError

TOY = {"depth": 3, "embed_dim": 32, "num_heads": 2, "patch_size": 8}  # 2 voting blocks, then the last
KERNEL = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]


def toy(img_size=64, depth=3, sharpen=True, **settings):
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", kwargs={**TOY, "depth": depth}, img_size=img_size)
    if sharpen:  # peaked attention: no near-ties between the fused and unfused paths' top-k
        with torch.no_grad():
            for blk in backbone.model.blocks:
                blk.attn.qkv.weight[:64].mul_(15)
    method = IELT(backbone, num_classes=5, **settings)
    return backbone, method


def capture_probs(attn_modules):
    """Switch the modules to timm's unfused attention and keep the probabilities they compute
    (the input of attn_drop), one list per module."""
    store = [[] for _ in attn_modules]
    for attn, keep in zip(attn_modules, store):
        attn.fused_attn = False
        attn.attn_drop.register_forward_pre_hook(lambda m, inputs, keep=keep: keep.append(inputs[0].detach()))
    return store


def hand_votes(row, vote_k):
    """One head's votes: 1 for each of its top vote_k tokens."""
    top = sorted(range(len(row)), key=lambda n: -row[n])[:vote_k]
    return [1 if n in top else 0 for n in range(len(row))]


def hand_smooth(votes, h, w):
    out = [0.0] * (h * w)
    for r in range(h):
        for c in range(w):
            out[r * w + c] = sum(KERNEL[dr + 1][dc + 1] * votes[(r + dr) * w + c + dc]
                                 for dr in (-1, 0, 1) for dc in (-1, 0, 1) if 0 <= r + dr < h and 0 <= c + dc < w)
    return out


def hand_rank(scores):
    return sorted(range(len(scores)), key=lambda n: (-scores[n], n))


def hand_vote(probs_b, vote_k, grid=None):
    """All heads' votes on the CLS row (B index fixed), smoothed on the grid if given, ranked."""
    rows = probs_b[:, 0, 1:].tolist()
    votes = [sum(col) for col in zip(*(hand_votes(row, vote_k) for row in rows))]
    return hand_rank(hand_smooth(votes, *grid) if grid else votes)


def test_votes_smoothing_and_topk_match_a_hand_computation():
    backbone, method = toy(vote_k=5, total_num=9, select_rates=[2, 1])  # blocks keep 6 and 3 patches
    model = backbone.model
    method.eval()
    probs = capture_probs([blk.attn for blk in model.blocks[:-1]] + [method.refine.attn])
    outputs, inputs = [], {}
    for blk in model.blocks[:-1]:
        blk.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
    method.refine.register_forward_pre_hook(lambda m, i: inputs.__setitem__("refine", i[0].detach()))
    method.refine_norm.register_forward_hook(lambda m, i, o: inputs.__setitem__("refined", o.detach()))
    model.blocks[-1].register_forward_pre_hook(lambda m, i: inputs.__setitem__("last", i[0].detach()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = method(backbone, x)

    counts = [6, 3]
    for b in range(2):
        kept = []
        for i, count in enumerate(counts):
            kept += hand_vote(probs[i][0][b], 5, grid=(8, 8))[:count]
        assert out.extras["layer_tokens"][b].tolist() == kept
        # The refinement reads the CLS token entering the last block, then each pick from its own block's output.
        expected = [outputs[-1][b, 0]] + [outputs[0 if j < 6 else 1][b, 1 + n] for j, n in enumerate(kept)]
        torch.testing.assert_close(inputs["refine"][b], torch.stack(expected))
        # Second vote: the refinement block's CLS row, no smoothing, 5 of the 9 refined tokens.
        picks = hand_vote(probs[2][0][b], 5)[:5]
        assert out.extras["tokens"][b].tolist() == [kept[j] for j in picks]
        # The last block reads the same CLS token and the picked tokens of the refinement's normed output.
        expected = [outputs[-1][b, 0]] + [inputs["refined"][b, 1 + j] for j in picks]
        torch.testing.assert_close(inputs["last"][b], torch.stack(expected))
    boxes = out.extras["token_boxes"]
    tokens = out.extras["tokens"]
    assert torch.equal(boxes[..., 0], (tokens % 8).float() * 8)  # 8-pixel patches on an 8x8 grid
    assert torch.equal(boxes[..., 1], (tokens // 8).float() * 8)
    assert torch.equal(out.extras["boxes"], torch.cat([boxes[..., :2].amin(1), boxes[..., 2:].amax(1)], -1))


def test_smoothing_kernel_on_a_hand_made_vote_map():
    votes = torch.tensor([[3, 0, 1, 0, 2, 0, 0, 1, 4, 0, 0, 2]], dtype=torch.float)  # a 3x4 grid
    assert smooth_votes(votes, (3, 4))[0].tolist() == hand_smooth(votes[0].tolist(), 3, 4)
    corner = torch.zeros(1, 9)
    corner[0, 0] = 1
    assert smooth_votes(corner, (3, 3)).view(3, 3).tolist() == [[4, 2, 0], [2, 1, 0], [0, 0, 0]]  # zero padding
    centre = torch.zeros(1, 9)
    centre[0, 4] = 1
    assert smooth_votes(centre, (3, 3)).view(3, 3).tolist() == KERNEL


def test_head_votes_count_each_heads_top_k():
    attn = torch.tensor([[[0.5, 0.1, 0.3, 0.05, 0.05], [0.1, 0.6, 0.2, 0.05, 0.05]]])  # 2 heads, 5 tokens
    assert head_votes(attn, 2).tolist() == [[1, 1, 2, 0, 0]]


def test_layer_counts_sum_to_the_total():
    assert layer_counts(torch.tensor([0.37, 0.33, 0.30]), 10).tolist() == [4, 3, 3]  # largest remainder
    assert layer_counts(torch.tensor([0.9, 0.1, 0.0]), 7).tolist() == [6, 1, 0]
    # The reference's V for 11 blocks at 126 tokens.
    assert layer_counts(initial_rates("v", 11), 126).tolist() == [16, 14, 12, 10, 8, 6, 8, 10, 12, 14, 16]
    assert layer_counts(initial_rates("uniform", 3), 9).tolist() == [3, 3, 3]


def test_rate_update_on_a_hand_made_case():
    _, method = toy(depth=4, update_rate=0.1, update_warm=2)  # 3 voting blocks
    method.select_rate.copy_(torch.tensor([0.5, 0.3, 0.2]))
    counts = torch.tensor([3, 2, 1])  # refined positions 0-2: block 0, 3-4: block 1, 5: block 2
    picks = torch.tensor([[0, 3, 5], [1, 2, 4]])  # blocks 0, 1, 2, 0, 0, 1: shares 3/6, 2/6, 1/6
    method.update(picks, counts)  # forward 1 < update_warm: counted only
    assert method.steps.item() == 1 and method.select_rate.tolist() == pytest.approx([0.5, 0.3, 0.2])
    method.update(picks, counts)
    expected = [0.9 * r + 0.1 * s for r, s in zip([0.5, 0.3, 0.2], [3 / 6, 2 / 6, 1 / 6])]
    expected = [e / sum(expected) for e in expected]
    assert method.steps.item() == 2 and method.select_rate.tolist() == pytest.approx(expected)

    _, fixed = toy(depth=4, dynamic_select=False, update_warm=0)
    before = fixed.select_rate.clone()
    fixed.update(picks, counts)
    assert torch.equal(fixed.select_rate, before)


def test_rates_move_in_training_forwards_only():
    backbone, method = toy(vote_k=5, total_num=12, update_warm=0, update_rate=0.5)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    before = method.select_rate.clone()
    method.eval()
    method(backbone, x)
    assert torch.equal(method.select_rate, before) and method.steps.item() == 0
    method.train()
    method(backbone, x, y)
    assert method.steps.item() == 1 and not torch.equal(method.select_rate, before)
    assert method.select_rate.sum().item() == pytest.approx(1.0)


def test_loss_terms_on_known_logits():
    _, method = toy(loss_alpha=0.4)
    method.head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        method.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
        method.head.bias.copy_(torch.tensor([0.0, 0.5, -0.5]))
    key, refined = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])
    part, complement = method.logits(key, refined)
    c = torch.tensor([[0.0, 2.5, -1.5]])  # W refined + b
    assist = c.softmax(-1) * torch.tensor([1.0, 2.0, 0.0])  # each class's weights summed
    torch.testing.assert_close(complement, c)
    torch.testing.assert_close(part, torch.tensor([[1.0, 4.5, -1.5]]) + assist)
    labels = torch.tensor([2])
    losses = method.losses(part, complement, labels)
    assert set(losses) == {"ce", "complement"}
    torch.testing.assert_close(losses["ce"], 0.6 * -part.log_softmax(-1)[0, 2])
    torch.testing.assert_close(losses["complement"], 0.4 * -c.log_softmax(-1)[0, 2])


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("term", ["all", "complement"])
def test_gradient_flow(term):
    backbone, method = toy(vote_k=5, total_num=12)
    torch.nn.init.normal_(method.head.weight)  # the zero-initialised head would pass no gradient back
    method.train()
    out = method(backbone, torch.randn(2, 3, 64, 64), torch.tensor([0, 4]))
    (sum(out.losses.values()) if term == "all" else out.losses["complement"]).backward()
    model = backbone.model
    last = {n for n, _ in model.named_parameters() if n.startswith(("blocks.2.", "norm."))}
    for name, grad in _grads(model).items():
        if term == "complement" and name in last:  # the complement path stops at the refinement
            assert grad is None or not grad.any(), name
        else:
            assert grad is not None and grad.abs().sum() > 0, name
    for name, grad in _grads(method).items():
        assert grad is not None and grad.abs().sum() > 0, name
    assert "select_rate" not in dict(method.named_parameters())


def test_bf16_autocast_forward_and_backward_are_finite():
    backbone, method = toy(vote_k=5, total_num=12, update_warm=0)
    torch.nn.init.normal_(method.head.weight)
    method.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(backbone, torch.randn(2, 3, 64, 64), torch.tensor([1, 2]))
    loss = sum(out.losses.values())
    loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in backbone.model.parameters())
    assert method.select_rate.dtype == torch.float32 and torch.isfinite(method.select_rate).all()


def test_eval_mode_and_buffers_in_state_dict():
    backbone, method = toy(vote_k=30, total_num=200)  # both larger than the 64 patches: clamped
    assert method.total == 64
    method.eval()
    out = method(backbone, torch.randn(3, 3, 64, 64))
    assert out.losses == {} and out.logits.shape == (3, 5)
    assert out.extras["tokens"].shape == (3, 30) and out.extras["layer_tokens"].shape == (3, 64)
    assert out.extras["token_boxes"].shape == (3, 30, 4) and out.extras["boxes"].shape == (3, 4)
    state = method.state_dict()
    assert {"select_rate", "steps"} <= set(state)
    state["select_rate"] = torch.tensor([0.25, 0.75])
    state["steps"] = torch.tensor(7)
    _, other = toy()
    other.load_state_dict(state)
    assert other.select_rate.tolist() == [0.25, 0.75] and other.steps.item() == 7


def test_bad_settings_and_backbones_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"method.select_rates=\[1, 2, 3\]"):
        toy(select_rates=[1, 2, 3])
    with pytest.raises(ConfigError, match="method.select_rates=w"):
        toy(select_rates="w")
    with pytest.raises(ConfigError, match="method.vote_k=0"):
        toy(vote_k=0)
    with pytest.raises(ConfigError, match="method=ielt"):
        IELT(Backbone("test_resnet", kwargs={"output_stride": 8}), 5)


def test_config_defaults_match_the_class():
    import inspect

    node = OmegaConf.load(Path(__file__).parents[2] / "configs/method/ielt.yaml")
    assert node._target_ == "fgvr.models.methods.ielt.IELT"
    params = inspect.signature(IELT).parameters
    assert {k: node[k] for k in node if k != "_target_"} == {
        k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
