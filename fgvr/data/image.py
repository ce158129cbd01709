"""Decoding an image file: every mode to RGB uint8, with errors that name the file; JPEGs at the
smallest scale that still covers the size they are resized to."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import ExifTags, Image

from fgvr.runtime.errors import DataError

cv2.setNumThreads(1)  # loader workers are the parallelism; OpenCV's own threads only contend

_JPEG = b"\xff\xd8"
_END_MARKERS = {_JPEG: b"\xff\xd9", b"\x89P": b"IEND\xaeB`\x82"}  # JPEG EOI, PNG IEND
_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}
FIX = "remove it or set data.skip_bad=true"  # how every bad-image error ends


class Decoded(NamedTuple):
    image: np.ndarray  # (h, w, 3) RGB uint8: the full size divided by `scale`, rounded up
    size: tuple[int, int]  # (w, h) of the full decode: the pixels of the image's boxes
    scale: int  # 1, or libjpeg's reduction: 2, 4 or 8


def load_image(path: str) -> np.ndarray:
    """Decode an image file to RGB uint8 (grayscale, palette, RGBA and CMYK included).

    Raises DataError naming the file when it is missing, unreadable, empty, truncated or not an image
    (the loaders skip and count such files with data.skip_bad=true)."""
    return decode(path).image


def load_resized(path: str, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """(image, (w, h)): the image resized to `size` (w, h) as the transforms' first resize resizes
    its full decode (areas averaged when it shrinks), and its full size (w, h). A JPEG is decoded
    at reduced scale where that covers `size`: the same image up to resampling noise, for less
    work. Errors as load_image's."""
    image, (w, h), scale = decode(path, size)
    if scale == 1:
        shrink = size[0] < w or size[1] < h
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR), (w, h)
    # Output column i averages columns [i s, (i + 1) s) of the full decode (s = w / size[0]), so
    # [i s / scale, (i + 1) s / scale) of the reduced one: an area resize by that exact factor (not to
    # the reduced width, rounded up from w / scale), cut to `size`. Rows likewise.
    image = cv2.resize(image, None, fx=size[0] * scale / w, fy=size[1] * scale / h, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image[:size[1], :size[0]]), (w, h)


def decode(path: str, cover: tuple[int, int] | None = None) -> Decoded:
    """The image as load_image decodes it, but with `cover` (w, h) a JPEG at the smallest of
    libjpeg's 1/8, 1/4 and 1/2 scales that leaves it at least that large before libjpeg rounds up
    (w / r >= cover w, h / r >= cover h; in full when none does; other formats always). At scale 1/r libjpeg turns each r x r block of pixels into one (a
    partial block at the right or bottom edge too). Errors as load_image's."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror or e}); {FIX}") from None
    if not data:
        raise DataError(f"{path}: empty image file (0 bytes); {FIX}")
    end = _END_MARKERS.get(data[:2])
    if end is not None and end not in data[-64:]:
        raise DataError(f"{path}: truncated image file (no end marker); re-download it, or {FIX}")
    full = _jpeg_size(data) if cover is not None and data[:2] == _JPEG else None
    if full is not None:
        for scale, flags in _REDUCED.items():  # the largest reduction first
            # Covered at the exact factor, so the resize after it only shrinks (area averaging on both
            # axes: OpenCV's INTER_AREA averages only when neither axis grows).
            if full[0] >= cover[0] * scale and full[1] >= cover[1] * scale:
                reduced = math.ceil(full[0] / scale), math.ceil(full[1] / scale)  # libjpeg rounds up
                image = _decode(path, data, flags)
                if image.shape[1::-1] == reduced:  # else OpenCV read another EXIF orientation than Pillow
                    return Decoded(image, full, scale)
                break
    image = _decode(path, data, cv2.IMREAD_COLOR)
    return Decoded(image, image.shape[1::-1], 1)


def _decode(path: str, data: bytes, flags: int) -> np.ndarray:
    """OpenCV's decode to RGB (it turns the image as its EXIF orientation says)."""
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise DataError(f"{path}: not a decodable image ({e.err or 'OpenCV error'}); {FIX}") from None
    if image is None:
        raise DataError(f"{path}: not a decodable image; {FIX}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(w, h) of a JPEG's full decode from its header (its EXIF orientation applied), or None when
    Pillow cannot read the header (the decode then says what is wrong)."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            w, h = image.size
            turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # a quarter turn
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return (h, w) if turned else (w, h)
