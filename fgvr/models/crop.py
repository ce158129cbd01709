"""The batched crop: every image's box(es) resized to one size in a single grid_sample call."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fgvr.runtime.errors import ConfigError


def crop(images: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int], antialias: int = 1,
         align_corners: bool = False) -> torch.Tensor:
    """Bilinear crops of `images` (B, C, H, W) at `boxes` (x1 y1 x2 y2, pixels): one box per image
    (B, 4) -> (B, C, *size), or K per image (B, K, 4) -> (B, K, C, *size).

    Sampling follows `F.interpolate(image[:, y1:y2, x1:x2], size, mode="bilinear")` (half-pixel
    centres, samples clamped to the box), so for whole-pixel boxes it equals cropping each image
    and resizing it; but it is one op for the batch, on the batch's device, with no host sync
    (the K crops of an image are sampled as one tall grid, without copying the image).
    `align_corners=True` samples as `align_corners=True` does instead (the first and last samples
    on the box's first and last pixel centres): GLSim's reference crops so (`F.upsample_bilinear`).

    `antialias` > 1 samples an antialias x antialias grid inside every output pixel and averages
    it (a box filter over the pixel's footprint), so a box shrunk up to that many times does not
    alias detail finer than the crop can hold into false coarse patterns (`crop_antialias`)."""
    oh, ow = (size, size) if isinstance(size, int) else size
    if antialias > 1:
        fine = crop(images, boxes, (oh * antialias, ow * antialias), align_corners=align_corners)
        return F.avg_pool2d(fine.flatten(0, -3), antialias).unflatten(0, fine.shape[:-2])
    H, W = images.shape[-2:]
    single = boxes.ndim == 2
    boxes = (boxes[:, None] if single else boxes).to(images.dtype if images.is_floating_point() else torch.float32)
    B, K = boxes.shape[:2]
    x = _sample_points(boxes[..., 0], boxes[..., 2], ow, align_corners)  # (B, K, ow) pixel coordinates
    y = _sample_points(boxes[..., 1], boxes[..., 3], oh, align_corners)  # (B, K, oh)
    grid = torch.stack([  # grid_sample's normalised coordinates (align_corners=False)
        ((2 * x + 1) / W - 1)[:, :, None, :].expand(-1, -1, oh, -1),
        ((2 * y + 1) / H - 1)[:, :, :, None].expand(-1, -1, -1, ow),
    ], dim=-1).reshape(B, K * oh, ow, 2)
    out = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    out = out.unflatten(2, (K, oh)).transpose(1, 2)  # (B, K, C, oh, ow)
    return out[:, 0] if single else out


def scale_boxes(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """(..., 4) x1 y1 x2 y2 boxes times (width, height, width, height): image fractions to pixels,
    with Python scalars only (a tensor of the sizes would be a host-to-device copy on every call)."""
    x, y = boxes[..., 0::2] * width, boxes[..., 1::2] * height
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def clip_boxes(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """(..., 4) boxes with their corners clipped to at most (W, H, W, H), without a host tensor."""
    h, w = image_hw
    x, y = boxes[..., 0::2].clamp(max=w), boxes[..., 1::2].clamp(max=h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def _sample_points(start: torch.Tensor, end: torch.Tensor, n: int, align_corners: bool = False) -> torch.Tensor:
    """Pixel coordinates of n half-pixel-centred samples over [start, end), clamped inside it; with
    `align_corners`, n samples from the first pixel's centre to the last's."""
    length = (end - start).clamp(min=1)
    i = torch.arange(n, device=start.device, dtype=start.dtype)
    if align_corners:
        offset = i / max(n - 1, 1) * (length[..., None] - 1)
    else:
        offset = ((i + 0.5) / n * length[..., None] - 0.5).clamp(min=0)
    return start[..., None] + torch.minimum(offset, length[..., None] - 1)


def source_scale_of(crop_source: str, source_scale: float) -> float:
    """How much larger than the input a region method needs the images: `source_scale` when it
    crops the original resolution (crop_source=original), else 1 (it crops the input)."""
    return float(source_scale) if crop_source == "original" else 1.0


def loader_scale(crop_scale: float, texture_scale: float) -> float:
    """How much larger than the input the loaders deliver images for a selector and a texture
    branch with these source scales: the one larger copy both crop (their scales must agree)."""
    if min(crop_scale, texture_scale) > 1 and crop_scale != texture_scale:
        raise ConfigError(f"selector.source_scale={crop_scale} and texture.source_scale={texture_scale}: both "
                          "crop the one larger copy the loaders deliver; set them equal")
    return max(crop_scale, texture_scale)


def crop_antialias(source_side: float, crop_side: int, limit: int = 4) -> int:
    """Samples per output pixel and axis for crops of up to `source_side` pixels into
    `crop_side`: the largest shrink (rounded up, at most `limit`), 1 when crops never shrink."""
    return max(1, min(limit, math.ceil(source_side / crop_side - 1e-6)))
