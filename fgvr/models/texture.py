"""The Gabor texture branch (Zhu et al., "Learning Gabor Texture Features for Fine-Grained
Recognition", ICCV 2023), beside the semantic backbone:

1. regions: fixed multi-position, multi-scale proposals over the input, scored by a small head on
   the backbone's features pooled over each (`RegionGate`); the top-K (after a greedy NMS) whose
   score clears a threshold are cropped and zoomed to `region_size`. `regions=glsim` takes the
   GLSim box instead.
2. filters: a bank of learnable complex Gabor filters under the paper's constraints
   (`GaborBank`), the magnitude of each quadrature pair as the response;
3. statistics: a learnable soft histogram of each response (`SoftHistogram`), an MLP over
   (levels, counts) -> one descriptor per filter, self-attention across the filters with their
   parameters encoded in ("filter correlation"), pooled and projected to the backbone width;
4. fusion: the region features, weighted by their gate scores, are summed per image: the model
   adds them to the global feature (H = M + sum_r s_r T_r) or gives them to the head as a token.

Filters and histograms run in float32 outside autocast; their parameters take no weight decay.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.autograd.function import once_differentiable

from fgvr.models.backbone import Tokens
from fgvr.models.crop import crop, scale_boxes, source_scale_of
from fgvr.models.selectors import box_iou
from fgvr.runtime.errors import ConfigError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey
CPU_BLOCK = 2**20  # response values made and read at a time on the CPU (TextureEncoder.statistics)


def w_max(kernel_size: int) -> float:
    """The highest centre frequency (cycles/pixel) whose pass band stays under Nyquist for a
    K x K kernel whose envelope fits within +-2.5 sigma: (2 pi K - 25) / (4 pi K)."""
    return (2 * math.pi * kernel_size - 25) / (4 * math.pi * kernel_size)


def _bounded(raw: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    """low + (high - low) * sigmoid(raw): inside the bounds, with a gradient everywhere."""
    return low + (high - low) * torch.sigmoid(raw)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


class GaborBank(nn.Module):
    """N complex Gabor filters, K x K, with learnable orientation theta, envelope widths
    sigma_x, sigma_y and centre frequency W on the rotated coordinates, each kept inside the
    paper's bounds by a sigmoid map of a raw parameter:

        theta in [0, pi];  sigma_y in [5 / (2 pi), K / 5];  sigma_x in [5 / (2 pi (1 - 2W)), K / 5];
        W in [0, W_max/2] for the low-frequency half and [W_max/2, W_max] for the high half
        (`split_bands=False`: all in [0, W_max]).

    They start as a hand-set bank (orientations evenly spaced per band, mid-range widths and
    frequencies); `learnable=False` keeps them there (the fixed-filter ablation). The kernels
    are generated from the parameters in one expression per forward (cached when no gradient is
    wanted and the parameters are unchanged), made zero-mean and unit-norm, and applied to every
    region (and channel) with one convolution. Output: the magnitude of each quadrature pair."""

    def __init__(self, num_filters: int = 32, kernel_size: int = 11, learnable: bool = True,
                 split_bands: bool = True, stride: int = 1):
        super().__init__()
        if num_filters < 2 or num_filters % 2:
            raise ConfigError(f"texture.num_filters={num_filters}: must be even and at least 2 (half low-, "
                              "half high-frequency)")
        if kernel_size < 5 or kernel_size % 2 == 0:
            raise ConfigError(f"texture.kernel_size={kernel_size}: must be odd and at least 5")
        self.num_filters, self.kernel_size, self.stride = num_filters, kernel_size, stride
        self.w_max = w_max(kernel_size)
        n = num_filters // 2
        band = torch.arange(num_filters) // n  # 0: low, 1: high
        self.register_buffer("w_low", band * self.w_max / 2 if split_bands else torch.zeros(num_filters),
                             persistent=False)
        self.register_buffer("w_high", (band + 1) * self.w_max / 2 if split_bands else
                             torch.full((num_filters,), self.w_max), persistent=False)
        r = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
        yy, xx = torch.meshgrid(r, r, indexing="ij")  # views with stride 0: DDP cannot broadcast those
        self.register_buffer("yy", yy.contiguous(), persistent=False)
        self.register_buffer("xx", xx.contiguous(), persistent=False)
        if split_bands:  # every orientation once per band
            theta = (torch.arange(num_filters) % n + 0.5) / n
            freq = torch.full((num_filters,), 0.5)
        else:  # the orientations interleaved over two frequencies, as many filters as with the split
            theta = (torch.arange(num_filters) // 2 + 0.5) / n
            freq = torch.tensor([0.25, 0.75]).repeat(n)
        raw = {"theta": _logit(theta), "sigma_x": torch.zeros(num_filters), "sigma_y": torch.zeros(num_filters),
               "freq": _logit(freq)}
        for name, value in raw.items():
            if learnable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def params(self) -> dict[str, torch.Tensor]:
        """The bounded filter parameters, (N,) each: theta (rad), sigma_x, sigma_y (px), W (cycles/px)."""
        K = self.kernel_size
        w = _bounded(self.freq, self.w_low, self.w_high)
        return {
            "theta": _bounded(self.theta, 0.0, math.pi),
            "sigma_x": _bounded(self.sigma_x, 5 / (2 * math.pi * (1 - 2 * w)), K / 5),
            "sigma_y": _bounded(self.sigma_y, 5 / (2 * math.pi), K / 5),
            "freq": w,
        }

    def kernels(self) -> torch.Tensor:
        """(2N, 1, K, K): the real (even) kernels, then the imaginary (odd) ones; each part
        zero-mean, each complex kernel of unit L2 norm (both parts together, so a filter whose
        odd part vanishes at W = 0 is not blown up)."""
        if torch.is_grad_enabled() and self.theta.requires_grad:
            return self._generate()
        key = (self.theta.device, *(getattr(self, n)._version for n in ("theta", "sigma_x", "sigma_y", "freq")))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._generate())
        return self._cache[1]

    def _generate(self) -> torch.Tensor:
        p = {k: v[:, None, None] for k, v in self.params().items()}
        cos, sin = torch.cos(p["theta"]), torch.sin(p["theta"])
        x = self.xx * cos + self.yy * sin  # rotated coordinates, (N, K, K)
        y = -self.xx * sin + self.yy * cos
        envelope = torch.exp(-0.5 * ((x / p["sigma_x"]) ** 2 + (y / p["sigma_y"]) ** 2))
        phase = 2 * math.pi * p["freq"] * x
        k = torch.stack([envelope * torch.cos(phase), envelope * torch.sin(phase)])  # (2, N, K, K)
        k = k - k.mean((-2, -1), keepdim=True)
        k = k / k.square().sum((0, -2, -1), keepdim=True).sqrt().clamp(min=1e-8)
        return k.flatten(0, 1)[:, None]

    def forward(self, x: torch.Tensor, kernels: torch.Tensor | None = None) -> torch.Tensor:
        """(R, C, S, S) regions -> (R, C * N, h, w) response magnitudes (valid convolution, float32);
        `kernels`: those of `kernels()`, when the caller made them once for several calls."""
        R, C = x.shape[:2]
        with torch.autocast(x.device.type, enabled=False):
            out = F.conv2d(x.float().flatten(0, 1)[:, None], self.kernels() if kernels is None else kernels,
                           stride=self.stride)
            mag = Magnitude.apply(out)
        return mag.unflatten(0, (R, C)).flatten(1, 2)


class Magnitude(torch.autograd.Function):
    """(B, 2N, h, w) responses, the N real parts then the N imaginary ones -> (B, N, h, w)
    sqrt(re^2 + im^2 + 1e-8): in place, with its derivative written out (autograd's chain of
    squares, sum and root makes and reads several more maps of this size)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        re, im = out.chunk(2, dim=1)
        mag = torch.mul(re, re).addcmul_(im, im).add_(1e-8).sqrt_()
        ctx.save_for_backward(out, mag)
        return mag

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out, mag = ctx.saved_tensors
        return out * (grad / mag).repeat(1, 2, 1, 1)


class SoftHistogram(nn.Module):
    """A learnable soft histogram of each response map: M levels between the map's min and max,
    every value shared between its two neighbouring levels by triangular (linear) weights, so
    the counts of a map sum to 1 and are differentiable in the values and the levels. The inner
    levels are learnable per filter (their spacing is a softmax, so they stay ordered and the
    outer two stay at the min and max); `learnable=False` keeps them evenly spaced."""

    def __init__(self, num_maps: int, levels: int = 8, learnable: bool = True):
        super().__init__()
        if levels < 2:
            raise ConfigError(f"texture.levels={levels}: must be at least 2")
        self.levels = levels
        gaps = torch.zeros(num_maps, levels - 1)
        if learnable:
            self.gaps = nn.Parameter(gaps)
        else:
            self.register_buffer("gaps", gaps)

    def knots(self) -> torch.Tensor:
        """(N, M) level positions in [0, 1], increasing, the first 0 and the last 1."""
        t = torch.cumsum(torch.softmax(self.gaps.float(), dim=-1), dim=-1)
        t = torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1], torch.ones_like(t[:, :1])], dim=-1)
        return t

    def forward(self, maps: torch.Tensor, knots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, N, h, w) -> (levels, counts), both (R, N, M): the levels in the maps' units.
        `knots`: those of `knots()`, when the caller made them once for several calls."""
        with torch.autocast(maps.device.type, enabled=False):
            t = self.knots() if knots is None else knots
            lo, hi, counts = SoftCounts.apply(maps.float().flatten(2), t)
            levels = lo[..., None] + t * (hi - lo)[..., None]
        return levels, counts


class SoftCounts(torch.autograd.Function):
    """maps (R, N, P) and increasing levels knots (N, M) in [0, 1] (the first 0, the last 1) ->
    each map's min and max (R, N) and its soft counts (R, N, M), as SoftHistogram defines them:
    with u = (x - min) / max(max - min, 1e-6), a value in [t_k, t_k+1] gives 1 - f to level k
    and f to k + 1, f = (u - t_k) / (t_k+1 - t_k).

    So counts[m] = S[m-1] - S[m], where S[k] is the mean of the ramp clamp((u - t_k) / (t_k+1 -
    t_k), 0, 1) (S[-1] = 1, S[M-1] = 0): M - 1 ramps made in place in one buffer, with no index
    tensors, comparisons or scatters over the maps (that form, through autograd, made the Gabor
    branch 10x its arithmetic on a CPU). The backward is written out from the same means and each
    value's interval (the integer part of the sum of its ramps), so it reads the maps once more;
    the gradients of the min and max go to their first occurrence, as torch.min(dim)'s do."""

    @staticmethod
    def forward(ctx, maps: torch.Tensor, knots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (lo, lo_at), (hi, hi_at) = maps.min(-1), maps.max(-1)
        scale = (hi - lo).clamp(min=1e-6)
        u = (maps - lo[..., None]).div_(scale[..., None])
        inv = 1 / knots.diff(dim=-1)  # (N, M - 1)
        offset = -knots[:, :-1] * inv
        ramp, position = torch.empty_like(u), torch.zeros_like(u)
        means = []
        for k in range(inv.shape[-1]):
            torch.addcmul(offset[:, k, None], u, inv[:, k, None], out=ramp).clamp_(0, 1)
            means.append(ramp.mean(-1))
            position += ramp  # k + f in interval k
        S = torch.stack(means, dim=-1)  # (R, N, M - 1)
        ctx.save_for_backward(position, S, knots, inv, lo_at, hi_at, hi - lo, scale)
        return lo, hi, torch.cat([1 - S[..., :1], S[..., :-1] - S[..., 1:], S[..., -1:]], dim=-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lo: torch.Tensor, grad_hi: torch.Tensor, grad: torch.Tensor):
        position, S, knots, inv, lo_at, hi_at, span, scale = ctx.saved_tensors
        P, intervals = position.shape[-1], inv.shape[-1]
        g = (grad[..., 1:] - grad[..., :-1]) * inv  # P x d loss / d u, for a value in interval k
        k = position.long().clamp_(0, intervals - 1)  # each value's interval (a NaN's: any, its loss is NaN)
        inside = torch.zeros_like(S).scatter_add_(-1, k, torch.ones_like(position)) / P  # share of values in k
        f = S - (1 - inside.cumsum(-1))  # the mean over all values of f in k (0 outside it)
        grad_knots = torch.zeros_like(grad)
        grad_knots[..., :-1] += g * (f - inside)
        grad_knots[..., 1:] -= g * f
        # u = (x - lo) / scale: sum over the values of d loss / d u, and of it times u
        du = (g * inside).sum(-1)
        du_u = (g * (inside * knots[:, :-1] + f / inv)).sum(-1)
        grad_scale = torch.where(span >= 1e-6, -du_u / scale, 0)  # max(span, 1e-6) passes no gradient below it
        # A flat map (all values its min) moves with its min: u stays 0, the values and the min's
        # terms cancel value by value (as amin's gradient, shared among its ties, does).
        varied = span > 0
        grad_maps = (g * (varied / (P * scale))[..., None]).gather(-1, k)
        grad_maps.scatter_add_(-1, lo_at[..., None], (grad_lo - du * varied / scale - grad_scale)[..., None])
        grad_maps.scatter_add_(-1, hi_at[..., None], (grad_hi + grad_scale)[..., None])
        return grad_maps, grad_knots.sum(0)


class TextureEncoder(nn.Module):
    """Regions (R, C, S, S) -> texture features (R, out_features): the Gabor bank, a soft
    histogram per response, an MLP over each filter's (levels, counts) -> a descriptor, the
    filter's parameters (and, for RGB, its channel) embedded into it, self-attention across the
    descriptors, mean over the filters, LayerNorm and a linear map to the backbone width."""

    def __init__(self, out_features: int, channels: int = 1, num_filters: int = 32, kernel_size: int = 11,
                 stride: int = 2, learnable: bool = True, split_bands: bool = True, levels: int = 8,
                 learnable_histogram: bool = True, dim: int = 64, attn_layers: int = 1):
        super().__init__()
        self.bank = GaborBank(num_filters, kernel_size, learnable, split_bands, stride)
        self.hist = SoftHistogram(channels * num_filters, levels, learnable_histogram)
        self.describe = nn.Sequential(nn.Linear(2 * levels, dim), nn.GELU(), nn.Linear(dim, dim))
        self.encode_filter = nn.Linear(5, dim)
        self.channel_embed = nn.Parameter(torch.zeros(channels, 1, dim)) if channels > 1 else None
        self.blocks = nn.Sequential(*[Block(dim, max(1, dim // 32), mlp_ratio=2.0, qkv_bias=True)
                                      for _ in range(attn_layers)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_features)

    def filter_codes(self) -> torch.Tensor:
        """(N, 5): each filter's parameters, scaled to about [-1, 1]; theta as (cos 2t, sin 2t)."""
        p, top = self.bank.params(), self.bank.kernel_size / 5
        return torch.stack([torch.cos(2 * p["theta"]), torch.sin(2 * p["theta"]), p["sigma_x"] / top,
                            p["sigma_y"] / top, p["freq"] / self.bank.w_max], dim=-1)

    def statistics(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, C, S, S) -> each response's (levels, counts), (R, C*N, M) each. On the CPU the regions
        go through in blocks whose responses hold about CPU_BLOCK values: a whole batch's (~100 MB)
        would be fresh memory, page-faulted in by every op, and cost several times the arithmetic."""
        kernels, knots = self.bank.kernels(), self.hist.knots()
        if regions.device.type != "cpu" or torch.compiler.is_exporting():  # an export keeps the batch size free
            return self.hist(self.bank(regions, kernels), knots)
        h, w = (side // self.bank.stride for side in regions.shape[-2:])
        block = max(1, CPU_BLOCK // (regions.shape[1] * self.bank.num_filters * h * w))
        parts = [self.hist(self.bank(r, kernels), knots) for r in regions.split(block)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        levels, counts = self.statistics(regions)
        # Standardised per region over all filters and levels: the MLP sees how the filters'
        # responses differ from one another (contrast-invariant) at a scale of about 1, and the
        # counts centred; raw, both vary by a few hundredths and the branch starts slowly.
        levels = (levels - levels.mean((1, 2), keepdim=True)) / levels.std((1, 2), keepdim=True).clamp(min=1e-6)
        desc = self.describe(torch.cat([levels, counts * counts.shape[-1] - 1], dim=-1))
        code = self.encode_filter(self.filter_codes())  # (N, dim)
        if self.channel_embed is not None:
            code = (code + self.channel_embed).flatten(0, 1)  # (C*N, dim), channel-major like the maps
        return self.proj(self.norm(self.blocks(desc + code).mean(1)))


class Regions(NamedTuple):
    boxes: torch.Tensor  # (B, K, 4) x1 y1 x2 y2 in input pixels
    weights: torch.Tensor  # (B, K) each region's weight in the sum (0: below the threshold)


def proposal_boxes(scales: list[float], ratios: list[float], step: float) -> torch.Tensor:
    """Fixed proposals (P, 4) in image fractions: for each scale (side as a fraction of the
    image) and aspect ratio (w / h, area kept), every position `step` apart, plus the last one
    flush with the far edge."""
    boxes = []
    for s in scales:
        for r in ratios:
            w, h = min(s * math.sqrt(r), 1.0), min(s / math.sqrt(r), 1.0)
            xs = torch.arange(0, 1 - w + 1e-6, step).tolist()
            ys = torch.arange(0, 1 - h + 1e-6, step).tolist()
            xs += [1 - w] if 1 - w - xs[-1] > 1e-6 else []
            ys += [1 - h] if 1 - h - ys[-1] > 1e-6 else []
            boxes += [(x, y, x + w, y + h) for y in ys for x in xs]
    return torch.tensor(boxes, dtype=torch.float32)


class RegionGate(nn.Module):
    """Scores the fixed proposals on the backbone's features (the patch tokens or feature-map
    cells averaged over each proposal, weighted by overlap) with a small MLP, keeps the top-K
    after a greedy NMS (K steps, batched, on the device), and weights them by their score:
    `soft` multiplies each region's feature by its score; `ste` by 1 in the forward pass and by
    the score's gradient in the backward (straight-through). Regions scoring under `threshold`
    get weight 0, except each image's best, so the branch never switches off."""

    def __init__(self, in_features: int, scales: list[float], ratios: list[float], step: float, top_k: int,
                 threshold: float, nms_iou: float, gate: str):
        super().__init__()
        if gate not in ("soft", "ste"):
            raise ConfigError(f"texture.gate={gate}: choose soft or ste")
        if not scales or not ratios or any(not 0 < s <= 1 for s in scales) or any(r <= 0 for r in ratios):
            raise ConfigError("texture.scales must be fractions in (0, 1] and texture.ratios positive, "
                              "e.g. scales=[0.5,0.75] ratios=[1.0]")
        if not 0 < step <= 1:
            raise ConfigError(f"texture.step={step}: must be in (0, 1]")
        proposals = proposal_boxes(scales, ratios, step)
        P = len(proposals)
        if not 1 <= top_k <= P:
            raise ConfigError(f"texture.top_k={top_k}: must be between 1 and the {P} proposals")
        self.register_buffer("proposals", proposals, persistent=False)
        iou = box_iou(proposals.repeat_interleave(P, 0), proposals.repeat(P, 1)).view(P, P)
        self.register_buffer("suppress", (iou > nms_iou) | torch.eye(P, dtype=torch.bool), persistent=False)
        self.top_k, self.threshold, self.gate = top_k, threshold, gate
        hidden = max(in_features // 4, 16)
        self.score = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, hidden), nn.GELU(),
                                   nn.Linear(hidden, 1))

    def pool_weights(self, tokens: Tokens, image_hw: tuple[int, int]) -> torch.Tensor:
        """(P, h*w): each proposal's overlap with each cell, normalised to sum to 1."""
        (h, w), (sy, sx) = tokens.grid_hw, tokens.stride_hw
        H, W = image_hw
        boxes = scale_boxes(self.proposals, W, H)
        cx = torch.arange(w, device=boxes.device) * sx
        cy = torch.arange(h, device=boxes.device) * sy
        ox = (torch.minimum(boxes[:, 2:3], cx + sx) - torch.maximum(boxes[:, 0:1], cx)).clamp(min=0)  # (P, w)
        oy = (torch.minimum(boxes[:, 3:4], cy + sy) - torch.maximum(boxes[:, 1:2], cy)).clamp(min=0)  # (P, h)
        overlap = (oy[:, :, None] * ox[:, None, :]).flatten(1)
        return overlap / overlap.sum(-1, keepdim=True).clamp(min=1e-6)

    def proposal_scores(self, tokens: Tokens, image_hw: tuple[int, int]) -> torch.Tensor:
        """(B, P): every proposal's score in (0, 1)."""
        pooled = torch.einsum("ph,bhd->bpd", self.pool_weights(tokens, image_hw).to(tokens.patches.dtype),
                              tokens.patches)
        return torch.sigmoid(self.score(pooled).squeeze(-1).float())

    def forward(self, tokens: Tokens, image_hw: tuple[int, int]) -> Regions:
        scores = self.proposal_scores(tokens, image_hw)
        idx = self._nms_topk(scores.detach())
        s = scores.gather(1, idx)
        keep = s.detach() >= self.threshold
        keep[:, 0] = True  # the best region always counts
        weights = s if self.gate == "soft" else 1 + s - s.detach()
        H, W = image_hw
        boxes = scale_boxes(self.proposals[idx], W, H)
        return Regions(boxes, weights * keep)

    def _nms_topk(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K) indices of the K best proposals, greedily skipping any that overlap an already
        chosen one by IoU > nms_iou (once all are suppressed, the best of the rest, never one twice)."""
        avail, picks = scores.clone(), []
        for _ in range(self.top_k):
            pick = avail.argmax(-1)
            picks.append(pick)
            avail = torch.where(self.suppress[pick], avail - 2, avail)  # under every free score, still ordered
            avail = avail.scatter(1, pick[:, None], -math.inf)
        return torch.stack(picks, dim=1)


class GaborTexture(nn.Module):
    """The texture branch as the model uses it (FGVRModel.texture_pass): `regions()` chooses the
    regions (the gate over proposals, or the GLSim box), `crops()` cuts them from the image and
    `encode()` encodes each and sums them per image, weighted -> (B, in_features), to be fused as
    `fusion` says.

    crop_source: `input` cuts the regions from the network input; `original` from a
    `source_scale` times larger copy of the same view (the loader-side copy a selector with
    crop_source=original reads too), so a zoomed region shows detail the input has lost."""

    def __init__(self, in_features: int, regions: str = "proposals", region_size: int = 112,
                 crop_source: str = "input", source_scale: float = 2.0, channels: str = "gray",
                 num_filters: int = 32, kernel_size: int = 11, stride: int = 2,
                 learnable: bool = True, split_bands: bool = True, levels: int = 8, learnable_histogram: bool = True,
                 dim: int = 64, attn_layers: int = 1, scales: tuple[float, ...] = (0.5, 0.75),
                 ratios: tuple[float, ...] = (1.0,), step: float = 0.25, top_k: int = 4, threshold: float = 0.25,
                 nms_iou: float = 0.5, gate: str = "soft", fusion: str = "add"):
        super().__init__()
        for key, value, choices in (("regions", regions, ("proposals", "glsim")),
                                    ("crop_source", crop_source, ("input", "original")),
                                    ("channels", channels, ("gray", "rgb")), ("fusion", fusion, ("add", "token"))):
            if value not in choices:
                raise ConfigError(f"texture.{key}={value}: choose one of {', '.join(choices)}")
        if region_size < kernel_size:
            raise ConfigError(f"texture.region_size={region_size}: must be at least texture.kernel_size={kernel_size}")
        if source_scale < 1:
            raise ConfigError(f"texture.source_scale={source_scale}: must be at least 1")
        self.regions_from, self.region_size, self.fusion = regions, region_size, fusion
        self.source_scale = source_scale_of(crop_source, source_scale)
        self.gray = channels == "gray"
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)
        self.encoder = TextureEncoder(in_features, 1 if self.gray else 3, num_filters, kernel_size, stride, learnable,
                                      split_bands, levels, learnable_histogram, dim, attn_layers)
        self.gate = (RegionGate(in_features, list(scales), list(ratios), step, top_k, threshold, nms_iou, gate)
                     if regions == "proposals" else None)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.bank.{n}" for n in ("theta", "sigma_x", "sigma_y", "freq")} | {"encoder.hist.gaps"}

    def regions(self, tokens: Tokens, image_hw: tuple[int, int], glsim_boxes: torch.Tensor | None) -> Regions:
        if self.gate is not None:
            return self.gate(tokens, image_hw)
        return Regions(glsim_boxes[:, None], glsim_boxes.new_ones(glsim_boxes.shape[0], 1))

    def crops(self, pixels: torch.Tensor, boxes: torch.Tensor, antialias: int = 1) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] and (B, K, 4) boxes in their coordinates -> (B, K, C, S, S)
        (`antialias`: see crop)."""
        with torch.autocast(pixels.device.type, enabled=False):
            image = (pixels.float() * self.luma).sum(1, keepdim=True) if self.gray else pixels.float()
            return crop(image, boxes.float(), self.region_size, antialias)

    def encode(self, crops: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, K, C, S, S) region crops and their (B, K) weights -> the weighted sum (B, D)."""
        feats = self.encoder(crops.flatten(0, 1)).unflatten(0, crops.shape[:2])  # (B, K, D)
        return (weights[..., None].to(feats.dtype) * feats).sum(1)
