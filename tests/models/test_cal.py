"""CAL: bilinear attention pooling, counterfactual effect, centre loss and update, attention crop,
drop and map sampling against hand computations; the training losses, gradient flow, bf16 and
the test-time prediction of the whole method on a tiny CNN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fgvr.models.backbone import Backbone
from fgvr.models.crop import crop
from fgvr.models.methods.cal import (
    CAL,
    bilinear_pool,
    centre_loss,
    crop_boxes,
    drop_masks,
    sample_maps,
)
from fgvr.runtime.errors import ConfigError

CLASSES, MAPS, SIZE = 5, 4, 32


@pytest.fixture
def backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone("test_resnet", kwargs={"output_stride": 8})


def make(backbone: Backbone, **kwargs) -> CAL:
    torch.manual_seed(0)
    return CAL(backbone, CLASSES, num_maps=MAPS, **kwargs)


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_bilinear_pool_by_hand():
    features = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]], [[-1.0, 0.0], [2.0, -4.0]]]])  # (1, C=2, 2, 2)
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 0.5]], [[1.0, 1.0], [0.0, 0.0]]]])  # (1, M=2, 2, 2)
    pooled = []
    for m in range(2):
        for c in range(2):
            s = sum(maps[0, m, i, j].item() * features[0, c, i, j].item() for i in range(2) for j in range(2)) / 4
            pooled.append(math.copysign(math.sqrt(abs(s) + 1e-6), s) if s else 0.0)
    norm = math.sqrt(sum(p * p for p in pooled))
    expected = torch.tensor([[p / norm for p in pooled]])
    torch.testing.assert_close(bilinear_pool(features, maps), expected)


def test_counterfactual_effect_uses_uniform_maps(backbone):
    m = make(backbone).train()
    fmap = backbone.model.forward_features(images())
    torch.manual_seed(3)
    maps, feature, logits, effect = m.head(fmap, counterfactual=True)
    torch.manual_seed(3)
    random_maps = torch.rand(maps.shape) * 2  # U(0, 2), the reference's training counterfactual
    expected = logits - m.fc(bilinear_pool(fmap, random_maps) * 100)
    torch.testing.assert_close(effect, expected)
    torch.testing.assert_close(logits, m.fc(feature * 100))
    assert m.head(fmap)[3] is None


def test_centre_loss_and_update_by_hand(backbone):
    m = make(backbone, beta=0.25)
    dim = m.centres.shape[1]
    centres = torch.zeros(CLASSES, dim)
    centres[0, :2] = torch.tensor([3.0, 4.0])  # normalised: (0.6, 0.8)
    centres[2, 0] = 2.0  # normalised: (1, 0)
    centres[4, 1] = 7.0  # absent from the batch
    m.centres.copy_(centres)
    labels = torch.tensor([2, 0, 2])  # class 2 twice: the last image's update is kept
    feature = torch.zeros(3, dim)
    feature[0, 0], feature[1, 1], feature[2, :2] = 1.0, 1.0, torch.tensor([0.6, 0.8])
    batch = F.normalize(m.centres[labels], dim=-1)
    # (1,0)-(1,0) = 0; (0,1)-(0.6,0.8) -> 0.36 + 0.04; (0.6,0.8)-(1,0) -> 0.16 + 0.64; sum 1.2 over B = 3
    torch.testing.assert_close(centre_loss(feature, batch), torch.tensor(1.2 / 3))
    m.update_centres(feature, batch, labels)
    expected = centres.clone()
    expected[0, :2] += 0.25 * torch.tensor([0.0 - 0.6, 1.0 - 0.8])
    expected[2, :2] += 0.25 * torch.tensor([0.6 - 1.0, 0.8 - 0.0])  # the last image of class 2, not the first
    torch.testing.assert_close(m.centres, expected)


def test_forward_centre_loss_reads_centres_before_update(backbone):
    m = make(backbone).train()
    backbone.train()
    x, labels = images(), torch.tensor([1, 3, 1, 0])
    old = torch.randn(CLASSES, m.centres.shape[1])
    m.centres.copy_(old)
    feature = m.head(backbone.model.forward_features(x))[1]
    out = m(backbone, x, labels)
    batch = F.normalize(old[labels], dim=-1)
    torch.testing.assert_close(out.losses["centre"], ((feature - batch) ** 2).sum() / 4)
    expected = old.clone()
    for i in (1, 2, 3):  # image 0's update of class 1 is overwritten by image 2's
        expected[labels[i]] += 0.05 * (feature[i] - batch[i])
    torch.testing.assert_close(m.centres, expected)


def interp_1d(values: list[float], out: int) -> list[float]:
    """Linear interpolation with aligned corners, written out."""
    n, result = len(values), []
    for i in range(out):
        pos = i * (n - 1) / (out - 1)
        lo = min(int(pos), n - 2)
        frac = pos - lo
        result.append(values[lo] * (1 - frac) + values[lo + 1] * frac)
    return result


def block_map() -> torch.Tensor:
    """An 8x8 map, 1 on rows 2-4 and columns 3-5: at 64 px (aligned corners, 1/9 px per cell)
    it is >= 0.5 on rows 14-40 and columns 23-49."""
    a = torch.zeros(1, 1, 8, 8)
    a[0, 0, 2:5, 3:6] = 1.0
    return a


def reference_box(a: torch.Tensor, theta: float, size: int, padding: float) -> list[int]:
    """The reference's per-image crop box: nonzero of the upsampled mask, int(min - pad), int(max + pad)."""
    up = F.interpolate(a[None], size=(size, size), mode="bilinear", align_corners=True)
    on = torch.nonzero(up[0, 0] >= theta * a.max())
    y0 = max(int(on[:, 0].min().item() - padding * size), 0)
    y1 = min(int(on[:, 0].max().item() + padding * size), size)
    x0 = max(int(on[:, 1].min().item() - padding * size), 0)
    x1 = min(int(on[:, 1].max().item() + padding * size), size)
    return [x0, y0, x1, y1]


def test_crop_box_of_a_known_map():
    a, theta = block_map(), torch.tensor([0.5])
    rows = [i for i, v in enumerate(interp_1d([0, 0, 1, 1, 1, 0, 0, 0], 64)) if v >= 0.5 - 1e-9]
    assert (rows[0], rows[-1]) == (14, 40)
    # padding 0.1 x 64 = 6.4: int(14 - 6.4) = 7, int(40 + 6.4) = 46; columns int(23 - 6.4), int(49 + 6.4)
    assert crop_boxes(a, theta, (64, 64), 0.1).tolist() == [[16.0, 7.0, 55.0, 46.0]]
    assert crop_boxes(a, theta, (64, 64), 0.0).tolist() == [[23.0, 14.0, 49.0, 40.0]]
    assert crop_boxes(a, theta, (64, 64), 0.5).tolist() == [[0.0, 0.0, 64.0, 64.0]]  # clipped to the image
    assert crop_boxes(a * 0, theta, (64, 64), 0.1).tolist() == [[0.0, 0.0, 64.0, 64.0]]  # no attention: all on


def test_crop_boxes_match_the_reference_per_image():
    maps = torch.rand(6, 1, 7, 7, generator=torch.Generator().manual_seed(2)) ** 4
    theta = torch.tensor([0.1, 0.3, 0.45, 0.6, 0.8, 0.5])
    for padding in (0.1, 0.05):
        expected = [reference_box(maps[i], theta[i].item(), 48, padding) for i in range(6)]
        assert crop_boxes(maps, theta, (48, 48), padding).tolist() == expected


def test_drop_mask_of_a_known_map():
    a = block_map()
    u = interp_1d([0, 0, 1, 1, 1, 0, 0, 0], 64)  # rows
    v = interp_1d([0, 0, 0, 1, 1, 1, 0, 0], 64)  # columns
    expected = torch.tensor([[float(u[i] * v[j] < 0.3) for j in range(64)] for i in range(64)])
    mask = drop_masks(a, torch.tensor([0.3]), (64, 64))
    assert mask.shape == (1, 1, 64, 64)
    torch.testing.assert_close(mask[0, 0], expected)
    assert mask[0, 0, 27, 36] == 0 and mask[0, 0, 0, 0] == 1  # the attended block is dropped, the rest kept
    assert (drop_masks(a * 0, torch.tensor([0.3]), (64, 64)) == 0).all()  # no attention: 0 < 0 keeps nothing


def test_map_sampling_follows_the_mass():
    torch.manual_seed(0)
    maps = torch.zeros(3, 5, 2, 2)
    maps[0, 4], maps[1, 0], maps[2, 2] = 1e6, 1e6, 1e6  # all of each image's mass in one map
    for _ in range(20):
        assert (sample_maps(maps) == torch.tensor([[4, 4], [0, 0], [2, 2]])).all()
    # mass 1 and 4: sqrt -> weights 1 and 2, so map 3 is drawn 2/3 of the time (4/5 without the sqrt)
    maps = torch.zeros(4000, 5, 2, 2)
    maps[:, 1, 0, 0], maps[:, 3, 0, 0] = 1.0, 4.0
    pick = sample_maps(maps)
    assert pick.shape == (4000, 2) and set(pick.unique().tolist()) <= {0, 1, 2, 3, 4}
    assert abs((pick == 3).float().mean().item() - 2 / 3) < 0.03


def test_loss_weights_on_known_logits(backbone):
    m = make(backbone)
    labels = torch.tensor([0, 2])
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    effect = torch.arange(30.0).reshape(6, 5) % 7 / 3  # raw, crop, drop rows: labels [0, 2, 0, 2, 0, 2]
    aug = torch.arange(20.0).reshape(4, 5) % 5 / 2

    def ce(rows: torch.Tensor, targets: list[int]) -> float:
        return sum(math.log(sum(math.exp(v) for v in r.tolist())) - r[t].item() for r, t in zip(rows, targets)) \
            / len(targets)

    dim = m.centres.shape[1]
    feature, centres = torch.zeros(2, dim), torch.zeros(2, dim)
    feature[0, 0], centres[1, 1] = 1.0, 2.0
    losses = m.losses(logits, effect, aug, feature, centres, labels)
    assert set(losses) == {"raw", "effect", "aug", "centre"}
    torch.testing.assert_close(losses["raw"], torch.tensor(ce(logits, [0, 2]) / 3))
    torch.testing.assert_close(losses["effect"], torch.tensor(ce(effect, [0, 2] * 3)))
    torch.testing.assert_close(losses["aug"], torch.tensor(ce(aug, [0, 2] * 2) * 2 / 3))
    torch.testing.assert_close(losses["centre"], torch.tensor((1.0 + 4.0) / 2))


def test_training_forward_is_its_parts(backbone):
    """Crop from the first sampled map, drop with the second, both through one 2B forward;
    the effect logits of [raw; crop; drop]; the output is the mean of raw and crop logits."""
    m = make(backbone).train()
    backbone.train()
    x, labels = images(), torch.tensor([1, 3, 2, 0])
    torch.manual_seed(5)
    out = m(backbone, x, labels)
    m.centres.zero_()
    torch.manual_seed(5)
    maps, _, logits, effect = m.head(backbone.model.forward_features(x), counterfactual=True)
    pick = sample_maps(maps)
    chosen = maps.detach()[torch.arange(4)[:, None], pick]
    boxes = crop_boxes(chosen[:, :1], torch.rand(4) * 0.2 + 0.4, (SIZE, SIZE), 0.1)
    drops = x * drop_masks(chosen[:, 1:], torch.rand(4) * 0.3 + 0.2, (SIZE, SIZE))
    aug_in = torch.cat([crop(x, boxes, SIZE), drops])
    _, _, aug_logits, aug_effect = m.head(backbone.model.forward_features(aug_in), counterfactual=True)
    torch.testing.assert_close(out.extras["boxes"], boxes)
    torch.testing.assert_close(out.extras["maps"], maps.detach())
    torch.testing.assert_close(out.logits, (logits + aug_logits[:4]) / 2)
    ce = F.cross_entropy
    expected = {"raw": ce(logits, labels) / 3, "effect": ce(torch.cat([effect, aug_effect]), labels.repeat(3)),
                "aug": ce(aug_logits, labels.repeat(2)) * 2 / 3, "centre": torch.tensor(1.0)}  # zero centres
    for name, value in expected.items():
        torch.testing.assert_close(out.losses[name], value, msg=name)


def test_gradient_flow(backbone):
    m = make(backbone).train()
    backbone.train()
    seen = []
    forward_features = backbone.model.forward_features
    backbone.model.forward_features = lambda t: (seen.append(t), forward_features(t))[1]
    try:
        x = images().requires_grad_(True)
        out = m(backbone, x, torch.tensor([0, 1, 2, 3]))
    finally:
        del backbone.model.forward_features
    assert len(seen) == 2 and seen[0].requires_grad and len(seen[1]) == 8
    assert not seen[1].requires_grad  # crop and drop images are made without gradient
    assert torch.autograd.grad(out.losses["aug"], x, retain_graph=True, allow_unused=True)[0] is None
    m.zero_grad(), backbone.zero_grad()
    sum(out.losses.values()).backward()
    for name, p in [("attention.conv", m.attention.conv.weight), ("attention.bn", m.attention.bn.weight),
                    ("fc", m.fc.weight), ("backbone", next(backbone.parameters()))]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not m.centres.requires_grad and m.centres.grad is None
    assert "centres" not in dict(m.named_parameters())


def test_bf16_autocast_forward_backward(backbone):
    m = make(backbone).train()
    backbone.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(backbone, images(), torch.tensor([0, 1, 1, 4]))
        loss = sum(out.losses.values())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert torch.isfinite(m.centres).all() and m.centres.dtype == torch.float32
    m.eval(), backbone.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m(backbone, images()).logits).all()


def eval_logits(m: CAL, backbone: Backbone, x: torch.Tensor, crops: list[tuple[float, float]]):
    """Raw logits plus those of each (theta, padding) crop of the mean map, averaged; and the last box."""
    fmap = backbone.model.forward_features(x)
    maps = m.attention(fmap)
    total = m.fc(bilinear_pool(fmap, maps) * 100)
    mean_map, boxes = maps.mean(1, keepdim=True), None
    for theta, padding in crops:
        boxes = crop_boxes(mean_map, torch.full((len(x),), theta), (SIZE, SIZE), padding)
        crop_map = backbone.model.forward_features(crop(x, boxes, SIZE))
        total = total + m.fc(bilinear_pool(crop_map, m.attention(crop_map)) * 100)
    return total / (len(crops) + 1), maps, boxes


def object_images(m: CAL, backbone: Backbone) -> torch.Tensor:
    """Images with a textured square on a blank background, and the attention's batch-norm
    centred on the median response, so the maps are peaked and the test crops are not the whole image."""
    x = torch.zeros(4, 3, SIZE, SIZE)
    x[:, :, 4:14, 6:16] = 3 * torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    response = m.attention.conv(backbone.model.forward_features(x))
    m.attention.bn.running_mean.copy_(response.transpose(0, 1).flatten(1).median(dim=1).values)
    return x


@torch.no_grad()
def test_eval_is_the_mean_of_raw_and_crop(backbone):
    m = make(backbone).eval()
    backbone.eval()
    x = object_images(m, backbone)
    out = m(backbone, x)
    expected, maps, boxes = eval_logits(m, backbone, x, [(0.1, 0.05)])
    assert out.losses == {}
    torch.testing.assert_close(out.logits, expected)
    assert not torch.allclose(out.logits, eval_logits(m, backbone, x, [])[0])  # the crop counts
    torch.testing.assert_close(out.extras["boxes"], boxes)
    assert (boxes[:, 2:] - boxes[:, :2] < SIZE).all()
    assert out.extras["maps"].shape == (4, MAPS, 4, 4) and out.extras["maps"].dtype == torch.float32
    torch.testing.assert_close(out.extras["maps"], maps)


@torch.no_grad()
def test_eval_tta_averages_three_crops_and_the_flip(backbone):
    m = make(backbone, tta=True).eval()
    backbone.eval()
    x = object_images(m, backbone)
    out = m(backbone, x)
    crops = [(0.3, 0.1), (0.2, 0.1), (0.1, 0.05)]
    plain, _, boxes = eval_logits(m, backbone, x, crops)
    flipped = eval_logits(m, backbone, x.flip(-1), crops)[0]
    torch.testing.assert_close(out.logits, (plain + flipped) / 2)
    torch.testing.assert_close(out.extras["boxes"], boxes)  # the theta 0.1 crop of the image itself


def test_train_mode_without_labels_has_no_losses(backbone):
    m = make(backbone).train()
    out = m(backbone, images())
    assert out.losses == {} and out.logits.shape == (4, CLASSES) and (m.centres == 0).all()


def test_centres_in_state_dict(backbone):
    m = make(backbone)
    assert m.state_dict()["centres"].shape == (CLASSES, MAPS * backbone.num_features)
    m.centres.normal_()
    fresh = make(backbone)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.centres, m.centres)


def test_refuses_a_vit_and_bad_settings(backbone):
    vit = Backbone("vit_tiny_patch16_224", kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
                   img_size=32)
    with pytest.raises(ConfigError, match="method=cal: needs a CNN"):
        CAL(vit, CLASSES)
    with pytest.raises(ConfigError, match="method.num_maps=0"):
        CAL(backbone, CLASSES, num_maps=0)
    with pytest.raises(ConfigError, match="method.beta=2"):
        CAL(backbone, CLASSES, beta=2)
