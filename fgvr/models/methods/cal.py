"""CAL, counterfactual attention learning (Rao et al., ICCV 2021), on WS-DAN, for any timm CNN.

M attention maps (1x1 conv + BN + ReLU on the last feature map) pool the features bilinearly
into an (M x C) part feature, classified linearly. Counterfactual attention: the same pooling
with random maps gives logits that are subtracted from the real ones; the difference (the
"effect" of the learned attention) gets a cross-entropy of its own, so the maps are rewarded for
doing better than chance. A feature-centre loss pulls each image's part feature to its class
centre (a moving average kept as a buffer). In training, one map sampled by its mass crops the
image and another drops (blacks out) its region; both pass through the net with the same losses.
At test time the mean map crops the image and the prediction averages the raw and crop logits.

Stages: "attention" (maps, bilinear pooling, classifier, counterfactual), "augmentation" (the
crop and drop images and their forward), "crop_pass" (the test-time crop(s) and their forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fgvr.models.backbone import Backbone
from fgvr.models.crop import crop
from fgvr.models.methods.base import Method, MethodOutput
from fgvr.runtime.errors import ConfigError

EPS = 1e-6  # inside the signed square root and the map-mass square root, as the reference
LOGIT_SCALE = 100.0  # the classifier reads the L2-normalised part feature times this
CROP_THETA = (0.4, 0.6)  # training crop: map >= U(0.4, 0.6) x its max
CROP_PADDING = 0.1  # of the image side, on each side of the training crop
DROP_THETA = (0.2, 0.5)  # training drop: pixels where map < U(0.2, 0.5) x its max are kept
TEST_CROP = (0.1, 0.05)  # (theta, padding) of the test-time crop of the mean map
TTA_CROPS = ((0.3, 0.1), (0.2, 0.1), TEST_CROP)  # the reference's test-time crops (and each one flipped)


class AttentionMaps(nn.Module):
    """1x1 conv (no bias) + BN + ReLU: feature map (B, C, h, w) -> M non-negative maps (B, M, h, w)."""

    def __init__(self, in_chs: int, num_maps: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, num_maps, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(num_maps, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def bilinear_pool(features: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Bilinear attention pooling: features (B, C, h, w) weighted by each map (B, M, h, w) and
    averaged over the locations -> (B, M*C), signed square root, L2-normalised. In float32 (the
    pooling is cheap, and the centres it is compared with are kept in float32)."""
    h, w = features.shape[-2:]
    with torch.autocast(features.device.type, enabled=False):
        pooled = torch.einsum("bmhw,bchw->bmc", maps.float(), features.float()).flatten(1) / (h * w)
        pooled = pooled.sign() * (pooled.abs() + EPS).sqrt()
        return F.normalize(pooled, dim=-1)


def sample_maps(maps: torch.Tensor, k: int = 2) -> torch.Tensor:
    """k map indices per image (B, k), drawn with replacement with probabilities proportional to
    the square root of each map's mass (B, M, h, w). By inverting the cumulative distribution
    (torch.multinomial checks its input on the host)."""
    weights = (maps.detach().float().sum((2, 3)) + EPS).sqrt()
    cdf = F.normalize(weights, p=1, dim=1).cumsum(1)
    u = torch.rand(len(maps), k, device=maps.device)
    return torch.searchsorted(cdf, u, right=True).clamp(max=maps.shape[1] - 1)


def upsample(maps: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) maps -> (B, H, W) float at the image size (bilinear, corners aligned, as the reference)."""
    return F.interpolate(maps.float(), size=image_hw, mode="bilinear", align_corners=True)[:, 0]


def crop_boxes(maps: torch.Tensor, theta: torch.Tensor, image_hw: tuple[int, int], padding: float) -> torch.Tensor:
    """The box (B, 4; x1 y1 x2 y2, input pixels, end exclusive) around the pixels where the
    upsampled map (B, 1, h, w) is >= theta (B,) x the map's max, widened by `padding` x the image
    side on each side and clipped to the image: the reference's `int(first - pad)`,
    `int(last + pad)` (the last on row/column is then the exclusive end when the padding is
    under a pixel). An empty mask (never, for theta <= 1) gives the whole image."""
    H, W = image_hw
    on = upsample(maps, image_hw) >= theta[:, None, None] * maps.float().amax((1, 2, 3))[:, None, None]
    spans = []
    for lines, size in ((on.any(1), W), (on.any(2), H)):  # columns with any pixel on, then rows
        lines = lines.to(torch.uint8)
        first = lines.argmax(1)  # argmax returns the first maximum
        last = size - 1 - lines.flip(1).argmax(1)
        pad = round(padding * size, 6)  # int(n - pad) = n - ceil(pad) for an integer n (0 if negative)
        spans.append(((first - math.ceil(pad)).clamp(min=0), (last + math.floor(pad)).clamp(max=size)))
    (x1, x2), (y1, y2) = spans
    return torch.stack([x1, y1, x2, y2], dim=-1).float()


def drop_masks(maps: torch.Tensor, theta: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) float: 1 where the upsampled map (B, 1, h, w) is < theta (B,) x its max
    (kept), 0 on the attended region (dropped)."""
    keep = upsample(maps, image_hw) < theta[:, None, None] * maps.float().amax((1, 2, 3))[:, None, None]
    return keep[:, None].float()


def centre_loss(feature: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences between the features and their centres (B, D), over the batch size."""
    return (feature.float() - centres).pow(2).sum() / feature.shape[0]


def uniform(n: int, bounds: tuple[float, float], device: torch.device) -> torch.Tensor:
    """n thresholds drawn uniformly from [lo, hi), one per image."""
    lo, hi = bounds
    return torch.rand(n, device=device) * (hi - lo) + lo


class CAL(Method):
    """Counterfactual attention learning on a CNN's last feature map (WS-DAN's bilinear attention
    pooling, crop and drop augmentation, and feature-centre loss).

    The declared output: the mean of the raw image's and the attention crop's logits (in
    training, the crop of the augmentation); `tta` averages the reference's test-time crops
    (theta 0.3, 0.2 and 0.1 of the mean map) with the raw image, and the same for the flipped
    image. Loss terms: "raw" CE(raw) / 3, "effect" CE of the effect logits (raw minus
    counterfactual) over the raw, crop and drop images, "aug" CE(crop and drop) x 2 / 3,
    "centre" the feature-centre loss. The class centres are a buffer (saved in checkpoints)."""

    name = "cal"
    needs_cnn = True
    refuses_mixing = ("its feature-centre loss pulls each image's part feature to the centre of its class and moves "
                      "that centre, and a mixed image has no one class")

    def __init__(self, backbone: Backbone, num_classes: int, label_smoothing: float = 0.0, *, num_maps: int = 32,
                 beta: float = 0.05, tta: bool = False):
        super().__init__(label_smoothing)
        model = backbone.model
        if backbone.is_transformer or getattr(model, "output_fmt", "NCHW") != "NCHW":
            raise ConfigError(f"method=cal: needs a CNN whose features are a (B, C, h, w) map (e.g. "
                              f"backbone.name=resnet101); {type(model).__name__} is not one")
        if num_maps < 1:
            raise ConfigError(f"method.num_maps={num_maps}: must be at least 1")
        if not 0 <= beta <= 1:
            raise ConfigError(f"method.beta={beta}: the centre update rate must be in [0, 1]")
        self.num_maps, self.beta, self.tta = num_maps, beta, tta
        self.num_features = backbone.num_features
        dim = num_maps * self.num_features
        self.attention = AttentionMaps(self.num_features, num_maps)
        self.fc = nn.Linear(dim, num_classes, bias=False)
        self.register_buffer("centres", torch.zeros(num_classes, dim))  # the class centres of the part features

    def features(self, backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (B, C, h, w)."""
        fmap = backbone.model.forward_features(x)
        if fmap.ndim != 4 or fmap.shape[1] != self.num_features:
            raise ConfigError(f"method=cal: needs a CNN whose features are a (B, {self.num_features}, h, w) map; "
                              f"{type(backbone.model).__name__} gives {tuple(fmap.shape)}")
        return fmap

    def head(self, fmap: torch.Tensor, counterfactual: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Feature map -> (maps (B, M, h, w), part feature (B, M*C) float32, logits, effect logits
        = logits minus those of the same pooling with random maps U(0, 2), or None)."""
        maps = self.attention(fmap)
        feature = bilinear_pool(fmap, maps)
        logits = self.classify(feature)
        effect = None
        if counterfactual:
            random_maps = torch.rand(maps.shape, device=maps.device) * 2
            effect = logits - self.classify(bilinear_pool(fmap, random_maps))
        return maps, feature, logits, effect

    def classify(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc((feature * LOGIT_SCALE).to(self.fc.weight.dtype))

    def forward(self, backbone: Backbone, x: torch.Tensor, labels: torch.Tensor | None = None) -> MethodOutput:
        if not self.training:
            return self.predict(backbone, x)
        B, image_hw = x.shape[0], x.shape[-2:]
        fmap = self.features(backbone, x)
        with self.stage("attention"):
            maps, feature, logits, effect = self.head(fmap, counterfactual=True)
        with self.stage("augmentation"):
            with torch.no_grad():
                pick = sample_maps(maps)  # (B, 2): one map crops, the other drops
                chosen = maps.detach().gather(1, pick[..., None, None].expand(-1, -1, *maps.shape[-2:]))
                boxes = crop_boxes(chosen[:, :1], uniform(B, CROP_THETA, x.device), image_hw, CROP_PADDING)
                crops = crop(x, boxes, image_hw)
                drops = x * drop_masks(chosen[:, 1:], uniform(B, DROP_THETA, x.device), image_hw).to(x.dtype)
            aug_fmap = self.features(backbone, torch.cat([crops, drops]))  # one pass for both: (2B, C, h, w)
            _, _, aug_logits, aug_effect = self.head(aug_fmap, counterfactual=True)
        extras = {"maps": maps.detach().float(), "boxes": boxes}
        output = (logits + aug_logits[:B]) / 2
        if labels is None:
            return MethodOutput(output, {}, extras)
        batch_centres = F.normalize(self.centres[labels], dim=-1)
        losses = self.losses(logits, torch.cat([effect, aug_effect]), aug_logits, feature, batch_centres, labels)
        self.update_centres(feature.detach(), batch_centres, labels)
        return MethodOutput(output, losses, extras)

    def losses(self, logits: torch.Tensor, effect: torch.Tensor, aug_logits: torch.Tensor, feature: torch.Tensor,
               batch_centres: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference's weighted terms: raw logits (B), effect logits of [raw; crop; drop] (3B),
        crop and drop logits (2B), the part features (B, M*C) and their normalised class centres."""
        return {
            "raw": self.ce(logits, labels) / 3,
            "effect": self.ce(effect, labels.repeat(3)),
            "aug": self.ce(aug_logits, labels.repeat(2)) * 2 / 3,
            "centre": centre_loss(feature, batch_centres),
        }

    @torch.no_grad()
    def update_centres(self, feature: torch.Tensor, batch_centres: torch.Tensor, labels: torch.Tensor) -> None:
        """centre[y] += beta (feature - normalised centre[y]). The reference's indexed assignment
        keeps one write per class when a label repeats; here, deterministically, the batch's last
        image of the class (the others' updates are zeroed before the index_add_)."""
        later = torch.ones(len(labels), len(labels), dtype=torch.bool, device=labels.device).triu(1)
        last = ~((labels[:, None] == labels[None, :]) & later).any(1)
        delta = self.beta * (feature.float() - batch_centres) * last[:, None]
        self.centres.index_add_(0, labels, delta.to(self.centres.dtype))

    def predict(self, backbone: Backbone, x: torch.Tensor) -> MethodOutput:
        """Test time: the mean of the raw and the mean-map crop logits (with `tta`, of the raw and
        three crops, for the image and its mirror image). Differentiable, for the cost report's step;
        evaluation runs it without gradient."""
        B, image_hw = x.shape[0], x.shape[-2:]
        views = torch.cat([x, x.flip(-1)]) if self.tta else x
        fmap = self.features(backbone, views)
        with self.stage("attention"):
            maps, _, logits, _ = self.head(fmap)
        settings = TTA_CROPS if self.tta else (TEST_CROP,)
        total, boxes = logits.float(), {}
        with self.stage("crop_pass"):
            mean_map = maps.mean(1, keepdim=True)
            for theta, padding in settings:
                theta_all = torch.full((views.shape[0],), theta, device=x.device)
                boxes[theta, padding] = crop_boxes(mean_map, theta_all, image_hw, padding)
                total = total + self.head(self.features(backbone, crop(views, boxes[theta, padding], image_hw)))[2]
        total = total / (len(settings) + 1)
        if self.tta:
            total = (total[:B] + total[B:]) / 2
        return MethodOutput(total, {}, {"maps": maps[:B].float(), "boxes": boxes[TEST_CROP][:B]})
