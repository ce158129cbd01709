"""Selectors, box maths, the batched crop and the two-pass model."""

import math

import pytest
import torch
import torch.nn.functional as F

from fgvr.models.backbone import Backbone, Tokens
from fgvr.models.crop import crop
from fgvr.models.heads import AggregatorHead, LinearHead
from fgvr.models.model import FGVRModel
from fgvr.models.selectors import (
    CenterSelector,
    GLSimSelector,
    OracleSelector,
    RandomSelector,
    RolloutSelector,
    box_hit,
    box_iou,
    localisation,
    topk_boxes,
)
from fgvr.runtime.errors import ConfigError

MICRO = dict(depth=2, embed_dim=48, num_heads=3, patch_size=8)


def one_hot_scores(grid_hw, cells, batch=1):
    """Scores that are 1 at the given (row, col) cells and 0 elsewhere."""
    scores = torch.zeros(batch, grid_hw[0] * grid_hw[1])
    for r, c in cells:
        scores[:, r * grid_hw[1] + c] = 1.0
    return scores


@pytest.mark.parametrize("box_end,expected", [("inclusive", [32, 16, 64, 48]), ("exclusive", [32, 16, 48, 32])])
def test_box_spans_the_top_k_patches(box_end, expected):
    scores = one_hot_scores((4, 4), [(1, 2), (2, 3), (1, 3)])  # rows 1-2, cols 2-3 of a 4x4 grid
    boxes = topk_boxes(scores, (4, 4), (16, 16), (64, 64), top_k=3, box_end=box_end)
    assert boxes.tolist() == [expected]


def test_single_patch_and_edge_boxes():
    corner = one_hot_scores((4, 4), [(3, 3)])
    assert topk_boxes(corner, (4, 4), (16, 16), (64, 64), 1, "inclusive").tolist() == [[48, 48, 64, 64]]
    # The reference's exclusive end would give an empty box: it is widened to the patch.
    assert topk_boxes(corner, (4, 4), (16, 16), (64, 64), 1, "exclusive").tolist() == [[48, 48, 64, 64]]
    line = one_hot_scores((4, 4), [(0, 0), (0, 3)])  # one row, first and last column
    assert topk_boxes(line, (4, 4), (16, 16), (64, 64), 2, "exclusive").tolist() == [[0, 0, 48, 16]]
    # A padded grid (dynamic_img_pad) would reach past the image: the box is clipped to it.
    assert topk_boxes(corner, (4, 4), (16, 16), (60, 60), 1).tolist() == [[48, 48, 60, 60]]


def test_non_square_grid_and_strides():
    # 2 rows x 5 columns, patches 8 px high and 12 px wide; top-2 at (0, 1) and (1, 4).
    scores = one_hot_scores((2, 5), [(0, 1), (1, 4)], batch=2)
    scores[1] = one_hot_scores((2, 5), [(1, 0), (1, 1)])
    boxes = topk_boxes(scores, (2, 5), (8.0, 12.0), (16, 60), 2)
    assert boxes.tolist() == [[12, 0, 60, 16], [0, 8, 24, 16]]


@pytest.mark.parametrize("metric", ["cos", "l1", "l2"])
def test_glsim_picks_the_patches_most_like_the_cls_token(metric):
    torch.manual_seed(0)
    cls = torch.randn(2, 16)
    patches = torch.randn(2, 12, 16)  # 3 x 4 grid
    patches[:, [5, 6]] = cls[:, None] * 1.01  # (1, 1) and (1, 2) are (almost) the CLS token itself
    tokens = Tokens(cls, cls, patches, (3, 4), (8.0, 8.0))
    sel = GLSimSelector(metric=metric, top_k=2)(tokens, (24, 32))
    assert sel.boxes.tolist() == [[8, 8, 24, 16]] * 2
    assert sel.scores.shape == (2, 3, 4) and not sel.scores.requires_grad
    if metric == "cos":
        assert torch.allclose(sel.scores.flatten(1), F.cosine_similarity(cls[:, None], patches, dim=-1), atol=1e-6)


def test_random_and_center_baselines():
    torch.manual_seed(0)
    cls = torch.randn(3, 8)
    patches = torch.randn(3, 16, 8)
    patches[:, 0] = cls  # GLSim's top-1 is the corner patch: boxes of 16 x 16 = 256 px^2
    tokens = Tokens(cls, cls, patches, (4, 4), (16.0, 16.0))
    boxes = CenterSelector(top_k=1)(tokens, (64, 64)).boxes
    assert boxes.tolist() == [[24, 24, 40, 40]] * 3  # centred, same area as GLSim's mean box
    random = RandomSelector(top_k=3)
    a, b = random(tokens, (64, 64)).boxes, random(tokens, (64, 64)).boxes
    assert not torch.equal(a, b) and ((a[:, 2:] - a[:, :2]) >= 16).all()


def test_box_iou_and_hit():
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4]], dtype=torch.float32)
    b = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10], [5, 5, 9, 9]], dtype=torch.float32)
    assert torch.allclose(box_iou(a, b), torch.tensor([1.0, 50 / 150, 0.0]))
    assert box_hit(a, b).tolist() == [True, True, False]
    unknown = torch.cat([b[:2], torch.full((1, 4), float("nan"))])  # the third image has no box
    assert torch.allclose(localisation(a, unknown), torch.tensor([1 + 50 / 150, 2, 2]))


def test_selector_options_are_checked():
    with pytest.raises(ConfigError, match="selector.metric=cosine: choose one of cos, l1, l2"):
        GLSimSelector(metric="cosine")
    with pytest.raises(ConfigError, match="selector.box_end=open: choose one of inclusive, exclusive"):
        GLSimSelector(box_end="open")
    with pytest.raises(ConfigError, match="selector.top_k=0"):
        RandomSelector(top_k=0)


@pytest.mark.parametrize("size,box", [(16, [3, 5, 11, 9]), (8, [0, 0, 24, 20]), ((12, 20), [10, 2, 23, 19])])
def test_batched_crop_equals_cropping_each_image(size, box):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 20, 24)
    boxes = torch.tensor([box, [0, 0, 24, 20], [5, 5, 6, 7]], dtype=torch.float32)
    out = crop(images, boxes, size)
    hw = (size, size) if isinstance(size, int) else size
    for image, (x1, y1, x2, y2), got in zip(images, boxes.int().tolist(), out):
        want = F.interpolate(image[None, :, y1:y2, x1:x2], size=hw, mode="bilinear", align_corners=False)[0]
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("size,box", [(16, [3, 5, 11, 9]), (8, [0, 0, 24, 20]), ((12, 20), [10, 2, 23, 19])])
def test_crop_with_align_corners_equals_the_references_upsample_bilinear(size, box):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 20, 24)
    boxes = torch.tensor([box, [0, 0, 24, 20], [5, 5, 6, 7]], dtype=torch.float32)
    out = crop(images, boxes, size, align_corners=True)
    hw = (size, size) if isinstance(size, int) else size
    for image, (x1, y1, x2, y2), got in zip(images, boxes.int().tolist(), out):
        want = F.interpolate(image[None, :, y1:y2, x1:x2], size=hw, mode="bilinear", align_corners=True)[0]
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(out[0], crop(images, boxes, size)[0], atol=1e-3)  # the option changes the crop


def test_glsim_with_the_references_box_and_sampling_crops_as_the_reference():
    """box_end=exclusive + align_corners=true: the reference's boxes (max index * patch, a one-patch
    box widened) cropped by F.upsample_bilinear from the input, image by image."""
    model = glsim_model(box_end="exclusive", align_corners=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tokens = model.backbone.forward_tokens(x)
        boxes = model.selector(tokens, (32, 32)).boxes
        crops = model.crops(x, boxes)
        scores = torch.einsum("bd,bnd->bn", F.normalize(tokens.cls, dim=-1), F.normalize(tokens.patches, dim=-1))
    for image, score, got in zip(x, scores, crops):
        idx = score.topk(2).indices
        rows, cols = (idx // 4).tolist(), (idx % 4).tolist()
        y1, y2, x1, x2 = min(rows) * 8, max(rows) * 8, min(cols) * 8, max(cols) * 8
        y2, x2 = (y1 + 8 if y2 == y1 else y2), (x1 + 8 if x2 == x1 else x2)
        want = F.interpolate(image[None, :, y1:y2, x1:x2], size=(32, 32), mode="bilinear", align_corners=True)[0]
        assert torch.allclose(got, want, atol=1e-5)


def test_vit_tokens_with_register_tokens_and_non_square_input():
    vit = Backbone("vit_tiny_patch16_224", img_size=(32, 48), kwargs=dict(MICRO, reg_tokens=4))
    tokens = vit.forward_tokens(torch.randn(2, 3, 32, 48))
    assert vit.model.num_prefix_tokens == 5 and tokens.grid_hw == (4, 6) and tokens.stride_hw == (8.0, 8.0)
    assert tokens.patches.shape == (2, 24, 48) and torch.equal(tokens.cls, tokens.pooled)


def test_dynamic_image_size_and_cnn_feature_map():
    vit = Backbone("vit_tiny_patch16_224", img_size=32, kwargs=dict(MICRO, dynamic_img_size=True))
    assert vit.forward_tokens(torch.randn(1, 3, 24, 40)).grid_hw == (3, 5)
    cnn = Backbone("test_resnet", img_size=64)
    tokens = cnn.forward_tokens(torch.randn(2, 3, 64, 64))
    h, w = tokens.grid_hw
    assert tokens.patches.shape == (2, h * w, cnn.num_features) and tokens.stride_hw == (64 / h, 64 / w)
    assert torch.allclose(tokens.cls, tokens.patches.mean(1), atol=1e-5)  # pooled = global average


def glsim_model(**selector):
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", img_size=32, kwargs=MICRO)
    return FGVRModel(backbone, AggregatorHead(48, 5, num_inputs=2), GLSimSelector(top_k=2, **selector), 32)


def test_gradients_reach_backbone_crop_token_and_aggregator_not_the_selection():
    model = glsim_model()
    nn_init = torch.nn.init
    nn_init.normal_(model.head.fc.weight, std=0.02)  # zero-initialised: let gradients flow back through it
    logits, extras = model(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    assert not extras["boxes"].requires_grad and not extras["scores"].requires_grad
    logits.sum().backward()
    for name in ("backbone.model.patch_embed.proj.weight", "backbone.model.blocks.0.attn.qkv.weight",
                 "backbone.model.cls_token", "crop_cls", "head.blocks.0.mlp.fc1.weight", "head.fc.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_aggregator_starts_at_zero_logits_and_attends_over_both_tokens():
    head = AggregatorHead(128, 7, num_inputs=2)
    assert head.blocks[0].attn.num_heads == 2  # D / 64
    assert torch.equal(head(torch.randn(3, 128), torch.randn(3, 128)), torch.zeros(3, 7))
    with pytest.raises(ConfigError, match="head.num_heads=5 does not divide the feature width 128"):
        AggregatorHead(128, 7, num_heads=5)
    assert LinearHead(16, 3, num_inputs=2)(torch.randn(4, 16), torch.randn(4, 16)).shape == (4, 3)


def test_separate_crop_token_changes_only_the_second_pass():
    model = glsim_model().eval()
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    source, x = model.prepare(images)
    tokens = model.first_pass(x)
    boxes = model.selector(tokens, (32, 32)).boxes
    assert torch.equal(model.crop_cls, model.backbone.model.cls_token)  # initialised from the CLS token
    before = model.second_pass(source, boxes).pooled
    with torch.no_grad():
        model.crop_cls.add_(1.0)
        shared = model.backbone.forward_tokens(crop(source, boxes, 32)).pooled
    assert not torch.allclose(model.second_pass(source, boxes).pooled, before)
    assert torch.allclose(shared, before, atol=1e-5) and torch.equal(model.first_pass(x).pooled, tokens.pooled)
    assert glsim_model(crop_cls="shared").crop_cls is None


def test_crop_from_the_original_resolution():
    model = glsim_model(crop_source="original", source_scale=2.0).eval()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)  # 2x the 32 px input
    source, x = model.prepare(images)
    assert source.shape[-1] == 64 and x.shape[-1] == 32
    logits, extras = model(images)
    assert logits.shape == (2, 5) and extras["boxes"].max() <= 32  # boxes in input pixels


def test_rollout_equals_a_hand_computed_rollout():
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", img_size=16, kwargs=MICRO).eval()  # 2 layers, 2x2 patches
    x = torch.randn(1, 3, 16, 16)
    selector = RolloutSelector(top_k=1)
    for blk in backbone.model.blocks:
        blk.attn.fused_attn = True
    with selector.watch(backbone):
        assert not any(blk.attn.fused_attn for blk in backbone.model.blocks)  # only while it runs
        tokens = backbone.forward_tokens(x)
    assert all(blk.attn.fused_attn for blk in backbone.model.blocks)
    scores = selector.scores(tokens)

    m = backbone.model  # by hand: softmax(q k^T / sqrt(d)) per block, from the blocks' own weights
    h = m._pos_embed(m.patch_embed(x))
    rollout = torch.eye(h.shape[1])
    for blk in m.blocks:
        q, k, _ = blk.attn.qkv(blk.norm1(h)).reshape(1, -1, 3, 3, 16).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(16)).softmax(-1).mean(1)[0]
        rollout = (0.5 * attn + 0.5 * torch.eye(len(attn))) @ rollout
        h = blk(h)
    assert torch.allclose(scores[0], rollout[0, 1:], atol=1e-5)


def test_rollout_needs_a_vit(compose):
    from fgvr.models.model import build_model

    cfg = compose("selector=rollout", "backbone=resnet50", "backbone.name=test_resnet", "backbone.pretrained=false")
    with pytest.raises(ConfigError, match="selector=rollout: needs a ViT backbone"):
        build_model(cfg, 3)
    with pytest.raises(ConfigError, match="selector.bogus: no such option; selector takes metric, top_k, box_end, "
                                          "crop_size, crop_source, source_scale, crop_cls, align_corners$"):
        build_model(compose("selector=glsim", "+selector.bogus=1"), 3)


def test_vit_without_a_cls_token_compares_patches_with_the_pooled_vector():
    backbone = Backbone("vit_tiny_patch16_224", img_size=32, kwargs=dict(MICRO, class_token=False, global_pool="avg"))
    tokens = backbone.forward_tokens(torch.randn(2, 3, 32, 32))
    assert not backbone.has_cls_token and torch.equal(tokens.cls, tokens.pooled) and tokens.patches.shape[1] == 16
    model = FGVRModel(backbone, LinearHead(48, 3, num_inputs=2), GLSimSelector(), 32)
    assert model.crop_cls is None and model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))[0].shape == (2, 3)


def test_oracle_crops_the_ground_truth_box_and_an_image_whose_box_is_gone_whole():
    tokens = Tokens(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 16, 4), (4, 4), (8.0, 8.0))
    truth = torch.tensor([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.25], [float("nan")] * 4])
    boxes = OracleSelector()(tokens, (32, 64), truth).boxes
    assert torch.equal(boxes, torch.tensor([[16.0, 16, 48, 32], [0, 0, 32, 8], [0, 0, 64, 32]]))
    with pytest.raises(ConfigError, match="selector=oracle crops the ground-truth boxes, and none were given"):
        OracleSelector()(tokens, (32, 32))


def test_oracle_model_crops_the_truth_from_the_original_resolution():
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", img_size=32, kwargs=MICRO)
    model = FGVRModel(backbone, LinearHead(48, 5, num_inputs=2),
                      OracleSelector(crop_source="original", source_scale=2.0), 32).eval()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    truth = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.25, 0.5, 0.75]])
    _, extras = model(images, truth)
    assert torch.equal(extras["boxes"], truth * 32)
    source, _ = model.prepare(images)
    assert source.shape[-1] == 64 and model.crop_antialias == 2
    crops = model.crops(source, extras["boxes"])
    assert torch.allclose(crops[0], F.avg_pool2d(source[:1], 2)[0], atol=1e-5)  # the whole 64 px copy, shrunk 2x
    assert torch.allclose(crops[1], crop(source[1:], torch.tensor([[0.0, 16, 32, 48]]), 32, 2)[0], atol=1e-6)


def test_oracle_refuses_data_without_boxes(train_run, tmp_path):
    from fgvr.runtime.errors import DataError
    from tests.conftest import write_cub

    root = write_cub(tmp_path / "cub")
    (root / "bounding_boxes.txt").unlink()
    with pytest.raises(DataError, match=r"selector=oracle crops the ground-truth box, but (\d+) of \1 train images "
                                        r"of data=cub have none"):
        train_run("data=cub", f"data.root={root}", "selector=oracle", "data.val_fraction=0.15")


def test_crops_shrunk_from_the_larger_copy_are_antialiased():
    """A grating finer than the crop's pixels fades to its mean instead of aliasing into a coarse
    one; a whole-image crop shrunk exactly 4x is the 4x4 area mean; the reference setting (crop
    from the input at the input size) samples plain bilinear."""
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    images = (0.5 + 0.5 * torch.sin(2 * math.pi * 0.3 * (xx * math.cos(0.5) + yy * math.sin(0.5))))[None, None]
    box = torch.tensor([[0.0, 0.0, 192.0, 192.0]])  # shrunk 3x into 64 px
    assert crop(images, box, 64).std() > 0.25  # plain bilinear sampling: a false coarse grating
    assert crop(images, box, 64, antialias=4).std() < 0.06
    whole = torch.tensor([[0.0, 0.0, 256.0, 256.0]])
    assert torch.allclose(crop(images, whole, 64, antialias=4), F.avg_pool2d(images, 4), atol=1e-6)
    assert glsim_model(crop_source="original", source_scale=4.0).crop_antialias == 4
    assert glsim_model().crop_antialias == 1
