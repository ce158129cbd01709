"""The Gabor texture branch: filter constraints and learning, statistics, regions and the gate,
and the branch inside the model with ViT and CNN backbones."""

import math

import pytest
import torch

from fgvr.engine.optim import param_groups
from fgvr.models import texture
from fgvr.models.backbone import Tokens
from fgvr.models.crop import crop
from fgvr.models.selectors import box_iou
from fgvr.models.texture import (
    GaborBank,
    GaborTexture,
    RegionGate,
    SoftCounts,
    SoftHistogram,
    TextureEncoder,
    proposal_boxes,
    w_max,
)
from fgvr.runtime.errors import ConfigError


def grating(theta: float, freq: float, size: int = 48) -> torch.Tensor:
    """(1, 1, size, size) sinusoidal grating whose intensity varies along angle theta."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return (0.5 + 0.5 * torch.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta))))[None, None]


def assert_in_bounds(bank: GaborBank) -> None:
    p, K = bank.params(), bank.kernel_size
    eps = 1e-5
    assert all(torch.isfinite(v).all() for v in p.values())
    assert ((p["theta"] >= 0) & (p["theta"] <= math.pi)).all()
    assert ((p["sigma_y"] >= 5 / (2 * math.pi) - eps) & (p["sigma_y"] <= K / 5 + eps)).all()
    assert ((p["sigma_x"] >= 5 / (2 * math.pi * (1 - 2 * p["freq"])) - eps) & (p["sigma_x"] <= K / 5 + eps)).all()
    n = bank.num_filters // 2
    low, high = p["freq"][:n], p["freq"][n:]
    assert ((low >= 0) & (low <= bank.w_max / 2 + eps)).all() and ((high >= bank.w_max / 2 - eps)
                                                                    & (high <= bank.w_max + eps)).all()


def test_w_max_matches_the_paper():
    assert [round(w_max(k), 3) for k in (7, 11, 15)] == [0.216, 0.319, 0.367]


def test_constraints_hold_after_many_steps_with_a_huge_learning_rate():
    torch.manual_seed(0)
    bank = GaborBank(8, kernel_size=7)
    opt = torch.optim.SGD(bank.parameters(), lr=1e4)
    x = torch.rand(2, 1, 16, 16)
    for i in range(200):
        loss = (bank(x).mean() * (1 if i % 2 else -1)) + bank.params()["sigma_x"].sum() * (i % 3 - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert_in_bounds(bank)
    assert bank.theta.abs().max() > 5  # the raw parameters did go far: the map kept them inside


def test_kernels_are_zero_mean_and_unit_norm():
    bank = GaborBank(16, kernel_size=11)
    with torch.no_grad():
        bank.theta.uniform_(-3, 3), bank.freq.uniform_(-3, 3), bank.sigma_x.uniform_(-3, 3)
    k = bank.kernels().squeeze(1).unflatten(0, (2, 16))  # (re/im, N, K, K)
    assert k.mean((-2, -1)).abs().max() < 1e-6
    assert torch.allclose(k.square().sum((0, -2, -1)), torch.ones(16), atol=1e-5)


@pytest.mark.parametrize("index", [1, 5, 10, 14])
def test_a_grating_drives_the_filter_of_its_orientation_hardest(index):
    bank = GaborBank(16, kernel_size=15, learnable=False)  # 8 orientations per band
    p = bank.params()
    band = slice(0, 8) if index < 8 else slice(8, 16)
    with torch.no_grad():
        response = bank(grating(float(p["theta"][index]), float(p["freq"][index]))).mean((-2, -1))[0]
    assert int(response[band].argmax()) + band.start == index


def test_every_gabor_parameter_gets_a_gradient_and_moves_in_training():
    torch.manual_seed(0)
    bank = GaborBank(4, kernel_size=7)
    before = {n: p.detach().clone() for n, p in bank.named_parameters()}
    opt = torch.optim.Adam(bank.parameters(), lr=0.05)
    x, target = torch.rand(4, 1, 24, 24), torch.rand(4, 4)
    for _ in range(5):
        loss = (bank(x).mean((-2, -1)) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        for name in ("theta", "sigma_x", "sigma_y", "freq"):
            grad = getattr(bank, name).grad
            assert grad is not None and grad.abs().sum() > 0, name
        opt.step()
    for name, p in bank.named_parameters():
        assert not torch.equal(p, before[name]), name


def test_fixed_filters_are_buffers_and_kernels_are_cached_without_gradient():
    bank = GaborBank(4, learnable=False)
    assert list(bank.parameters()) == [] and not bank.kernels().requires_grad
    learn = GaborBank(4).eval()
    with torch.no_grad():
        first = learn.kernels()
        assert learn.kernels() is first  # cached
        learn.theta.add_(0.1)
        assert not torch.equal(learn.kernels(), first)  # the parameters changed: regenerated
    assert learn.kernels().requires_grad  # with gradient: generated afresh


def test_histogram_counts_sum_to_one_and_split_linearly():
    hist = SoftHistogram(1, levels=3, learnable=False)  # levels at 0, 0.5, 1 of the range
    maps = torch.tensor([0.0, 0.25, 1.0, 1.0]).view(1, 1, 2, 2)
    levels, counts = hist(maps)
    assert torch.allclose(levels, torch.tensor([[[0.0, 0.5, 1.0]]]))
    assert torch.allclose(counts, torch.tensor([[[0.375, 0.125, 0.5]]]))  # 0.25 halves between 0 and 0.5
    torch.manual_seed(0)
    hist = SoftHistogram(5, levels=8)
    with torch.no_grad():
        hist.gaps.normal_()
    maps = torch.randn(3, 5, 9, 9).exp().requires_grad_()
    levels, counts = hist(maps)
    assert torch.allclose(counts.sum(-1), torch.ones(3, 5), atol=1e-5)
    (counts * torch.arange(8.0)).sum().backward()  # the histogram's mean level
    assert maps.grad.abs().sum() > 0 and hist.gaps.grad.abs().sum() > 0


def gather_scatter_histogram(maps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft histogram as first written, for reference: each value's interval by comparisons,
    its neighbouring levels gathered, its weights scattered to them (all through autograd)."""
    lo, hi = maps.amin((-2, -1), keepdim=True), maps.amax((-2, -1), keepdim=True)
    u = ((maps - lo) / (hi - lo).clamp(min=1e-6)).flatten(2)
    j = torch.zeros_like(u, dtype=torch.long)
    for inner in t[:, 1:-1].unbind(-1):
        j += u >= inner[:, None]
    t = t.expand(len(u), -1, -1)
    t0, t1 = t.gather(2, j), t.gather(2, j + 1)
    f = ((u - t0) / (t1 - t0)).clamp(0, 1)
    counts = torch.zeros_like(t).scatter_add(2, j, 1 - f).scatter_add(2, j + 1, f) / u.shape[-1]
    return lo.flatten(1)[..., None] + t * (hi - lo).flatten(1)[..., None], counts


def test_histogram_equals_the_gather_scatter_form_and_its_gradients():
    torch.manual_seed(0)
    hist = SoftHistogram(6, levels=8)
    with torch.no_grad():
        hist.gaps.normal_()
    maps = torch.randn(4, 6, 13, 11).exp().requires_grad_()
    weights = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    outs, grads = [], []
    for fn in (hist, lambda m: gather_scatter_histogram(m, hist.knots())):
        levels, counts = fn(maps)
        outs.append((levels, counts))
        grads.append(torch.autograd.grad((levels * weights[0] + counts * weights[1]).sum(), (maps, hist.gaps)))
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
    assert grads[0][1].abs().sum() > 0
    flat = torch.full((1, 6, 5, 5), 0.7, requires_grad=True)  # hi == lo: every value at the lowest level
    outs, grads = [], []
    for fn in (hist, lambda m: gather_scatter_histogram(m, hist.knots())):
        levels, counts = fn(flat)
        outs += [levels, counts]
        grads.append(torch.autograd.grad((levels * weights[0][:1] + counts * weights[1][:1]).sum(), flat)[0])
    assert torch.allclose(outs[0], outs[2]) and torch.allclose(outs[1], outs[3])
    # the map moves with its min: the same gradient in all (amin shares it among the ties, min gives it to one)
    assert torch.allclose(grads[0].sum((-2, -1)), grads[1].sum((-2, -1)), rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum((-2, -1)).allclose(grads[0].sum((-2, -1)).abs())  # no +-1e6 terms left to cancel


def test_soft_counts_backward_is_the_derivative():
    torch.manual_seed(0)
    inner = torch.rand(3, 4, dtype=torch.float64).sort(-1).values.requires_grad_()  # the first level 0, the last 1
    maps = torch.randn(2, 3, 40, dtype=torch.float64).requires_grad_()

    def counts(maps, inner):
        return SoftCounts.apply(maps, torch.cat([torch.zeros(3, 1), inner, torch.ones(3, 1)], -1))

    assert torch.autograd.gradcheck(counts, (maps, inner))


def test_encoder_equals_its_autograd_form_in_features_and_gabor_gradients(monkeypatch):
    """The encoder against the same statistics through autograd (the magnitude as squares and a
    root, the histogram in its gather-scatter form), on regions with flat areas (whose responses
    tie at the minimum): the same features and gradients to theta, sigma, W and the levels."""
    torch.manual_seed(0)
    enc = TextureEncoder(24, num_filters=8, kernel_size=7)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    regions = torch.rand(6, 1, 32, 32)
    regions[:2, :, :16] = 0.5

    def autograd_statistics(regions):
        out = torch.nn.functional.conv2d(regions, enc.bank.kernels(), stride=enc.bank.stride)
        re, im = out.chunk(2, dim=1)
        return gather_scatter_histogram((re.square() + im.square() + 1e-8).sqrt(), enc.hist.knots())

    results = []
    for statistics in (enc.statistics, autograd_statistics):
        monkeypatch.setattr(enc, "statistics", statistics)
        enc.zero_grad()
        out = enc(regions)
        out.square().sum().backward()
        results.append([out] + [p.grad.clone() for p in (*enc.bank.parameters(), enc.hist.gaps)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_encoder_in_blocks_equals_the_whole_batch_at_once(monkeypatch):
    """On the CPU the responses go through in blocks: the features and the Gabor parameters'
    gradients do not depend on the block size."""
    torch.manual_seed(0)
    enc = TextureEncoder(24, num_filters=8, kernel_size=7)
    regions = torch.rand(7, 1, 32, 32)
    results = []
    for block in (1, 2**40):  # one region a block; all at once
        monkeypatch.setattr(texture, "CPU_BLOCK", block)
        enc.zero_grad()
        out = enc(regions)
        out.square().sum().backward()
        results.append([out] + [getattr(enc.bank, n).grad.clone() for n in ("theta", "sigma_x", "sigma_y", "freq")])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_encoder_gives_one_feature_per_region_and_rgb_triples_the_maps():
    regions = torch.rand(6, 3, 32, 32)
    gray = TextureEncoder(40, channels=1, num_filters=8, kernel_size=7)
    rgb = TextureEncoder(40, channels=3, num_filters=8, kernel_size=7)
    assert gray(regions[:, :1]).shape == rgb(regions).shape == (6, 40)
    assert rgb.bank(regions).shape[1] == 24
    no_attention = TextureEncoder(40, num_filters=8, kernel_size=7, attn_layers=0)
    assert no_attention(regions[:, :1]).shape == (6, 40)


def test_proposals_cover_scales_positions_and_ratios():
    boxes = proposal_boxes([0.5, 0.75], [1.0], 0.25)
    assert len(boxes) == 9 + 4
    assert boxes.min() >= 0 and boxes.max() <= 1 + 1e-6
    assert torch.allclose(boxes[-1], torch.tensor([0.25, 0.25, 1.0, 1.0]))
    wide = proposal_boxes([0.5], [2.0], 0.5)
    w, h = wide[0, 2] - wide[0, 0], wide[0, 3] - wide[0, 1]
    assert math.isclose(float(w / h), 2.0, rel_tol=1e-5) and math.isclose(float(w * h), 0.25, rel_tol=1e-5)


def tokens_with(values: torch.Tensor) -> Tokens:
    """4x4 grid of 16 px cells over a 64 px image, one feature channel holding `values`."""
    B = len(values)
    patches = values.view(B, 16, 1).expand(B, 16, 8).clone()
    return Tokens(patches[:, 0], patches[:, 0], patches, (4, 4), (16.0, 16.0))


@pytest.mark.parametrize("gate", ["soft", "ste"])
def test_gate_keeps_distinct_top_regions_and_stays_trainable(gate):
    torch.manual_seed(0)
    g = RegionGate(8, [0.5], [1.0], 0.25, top_k=3, threshold=0.5, nms_iou=0.3, gate=gate)
    values = torch.zeros(2, 4, 4)
    values[0, :2, :2] = 5  # a hot top-left corner
    values[1, 2:, 2:] = 5
    regions = g(tokens_with(values), (64, 64))
    scores = g.proposal_scores(tokens_with(values), (64, 64))
    assert regions.boxes.shape == (2, 3, 4) and regions.weights.shape == (2, 3) and scores.shape == (2, 9)
    for b in range(2):
        chosen = regions.boxes[b]
        ious = [float(box_iou(chosen[i:i + 1], chosen[j:j + 1])) for i in range(3) for j in range(i)]
        assert max(ious) <= 0.3  # NMS: no two chosen regions overlap more than nms_iou
        ranked = scores[b].argsort(descending=True)
        assert torch.allclose(chosen[0], g.proposals[ranked[0]] * 64)  # the best comes first
    below = scores.gather(1, g._nms_topk(scores.detach())) < 0.5
    below[:, 0] = False
    assert (regions.weights[below] == 0).all() and (regions.weights[:, 0] > 0).all()
    regions.weights.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.score[-1].parameters())


def test_gate_pools_the_features_inside_each_proposal():
    g = RegionGate(1, [0.5], [1.0], 0.5, top_k=1, threshold=0.0, nms_iou=0.5, gate="soft")
    values = torch.arange(16.0).view(1, 4, 4)
    weights = g.pool_weights(tokens_with(values), (64, 64))  # 4 proposals of 2x2 cells
    pooled = weights @ values.view(16)
    assert pooled.tolist() == [2.5, 4.5, 10.5, 12.5]


def test_crop_of_several_boxes_per_image_matches_one_box_at_a_time():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 50)
    boxes = torch.tensor([[[0, 0, 20, 20], [10, 5, 50, 40]], [[3, 7, 30, 31], [0, 0, 50, 40]]], dtype=torch.float32)
    many = crop(images, boxes, 16)
    assert many.shape == (2, 2, 3, 16, 16)
    for k in range(2):
        assert torch.allclose(many[:, k], crop(images, boxes[:, k], 16), atol=1e-6)


def test_branch_sums_weighted_region_features_and_checks_its_options():
    torch.manual_seed(0)
    branch = GaborTexture(24, region_size=16, num_filters=4, kernel_size=7, top_k=2).eval()
    pixels, boxes = torch.rand(2, 3, 32, 32), torch.tensor([[[0, 0, 16, 16], [8, 8, 32, 32]]] * 2).float()
    crops = branch.crops(pixels, boxes)
    assert crops.shape == (2, 2, 1, 16, 16)  # channels=gray
    each = branch.encode(crops, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    both = branch.encode(crops, torch.ones(2, 2))
    assert torch.allclose(both, each + branch.encode(crops, torch.tensor([[0.0, 1.0], [1.0, 0.0]])), atol=1e-5)
    glsim = GaborTexture(24, regions="glsim", region_size=16, num_filters=4, kernel_size=7)
    regions = glsim.regions(None, (32, 32), boxes[:, 1])  # the selector's one box per image, weight 1
    assert torch.equal(regions.boxes, boxes[:, 1:]) and torch.equal(regions.weights, torch.ones(2, 1))
    assert {"encoder.bank.theta", "encoder.hist.gaps"} <= branch.no_weight_decay()
    for bad, message in [(dict(channels="hsv"), "texture.channels=hsv"), (dict(regions="all"), "texture.regions"),
                         (dict(num_filters=5), "texture.num_filters=5"), (dict(kernel_size=8), "kernel_size=8"),
                         (dict(region_size=8), "texture.region_size=8"), (dict(top_k=50), "texture.top_k=50"),
                         (dict(gate="hard"), "texture.gate=hard"), (dict(scales=[1.5]), "texture.scales")]:
        with pytest.raises(ConfigError, match=message):
            GaborTexture(24, **bad)


TEXTURE = ["texture=gabor", "texture.region_size=16", "texture.num_filters=8", "texture.kernel_size=7",
           "data.img_size=32", "texture.dim=32"]
CNN = ["backbone=resnet50", "backbone.name=test_resnet", "backbone.pretrained=false"]


@pytest.mark.parametrize("overrides", [
    [],
    ["selector=glsim", "head=aggregator"],
    ["selector=glsim", "head=aggregator", "texture.fusion=token"],
    ["selector=glsim", "texture.regions=glsim", "texture.fusion=token"],
    [*CNN, "texture.channels=rgb", "texture.gate=ste"],
    [*CNN, "selector=glsim", "selector.crop_source=original"],
])
def test_model_with_texture_trains_with_vit_and_cnn(compose, overrides):
    from fgvr.models.model import build_model

    torch.manual_seed(0)
    cfg = compose(*TEXTURE, *overrides)
    model = build_model(cfg, num_classes=3)
    scale = 2 if "selector.crop_source=original" in overrides else 1
    images = torch.randint(0, 256, (2, 3, 32 * scale, 32 * scale), dtype=torch.uint8)
    logits, extras = model(images)
    assert logits.shape == (2, 3)
    assert extras["regions"].shape[:2] == extras["region_weights"].shape
    logits.sum().backward()
    assert model.texture.encoder.bank.theta.grad.abs().sum() > 0
    decay, no_decay = param_groups(model, 0.05)
    assert not any(p is model.texture.encoder.bank.theta or p is model.texture.encoder.hist.gaps
                   for p in decay["params"])


def test_glsim_regions_need_a_selector(compose):
    from fgvr.models.model import build_model

    with pytest.raises(ConfigError, match="texture.regions=glsim"):
        build_model(compose(*TEXTURE, "texture.regions=glsim"), num_classes=3)


def test_texture_regions_come_from_the_resolution_its_crop_source_names(compose):
    """texture.crop_source=original cuts the regions from the loaders' larger copy; input from the
    view the first pass sees (also when a selector made the loaders deliver the larger copy)."""
    from fgvr.models.model import build_model, source_scale

    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    boxes = torch.tensor([[[0, 0, 16, 16]], [[8, 8, 24, 24]]]).float()  # input (32 px) coordinates
    pixels = images.float() / 255
    luma = lambda x: (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # noqa: E731
    original = compose(*TEXTURE, "texture.crop_source=original")
    assert source_scale(original) == 2.0
    model = build_model(original, num_classes=3)
    assert model.texture_antialias == 4  # a region may be the whole 64 px copy, zoomed to 16 px
    assert torch.allclose(model.texture_crops(images, boxes), crop(luma(pixels), boxes * 2, 16, 4), atol=1e-5)
    with_selector = compose(*TEXTURE, "selector=glsim", "selector.crop_source=original")
    model = build_model(with_selector, num_classes=3)
    assert source_scale(with_selector) == 2.0 and model.texture_scale == 1.0 and model.texture_antialias == 2
    assert torch.allclose(model.texture_crops(images, boxes), crop(luma(model.to_input(pixels)), boxes, 16, 2),
                          atol=1e-5)
    with pytest.raises(ConfigError, match="selector.source_scale=2.0 and texture.source_scale=4.0"):
        build_model(compose(*TEXTURE, "selector=glsim", "selector.crop_source=original",
                            "texture.crop_source=original", "texture.source_scale=4"), num_classes=3)
