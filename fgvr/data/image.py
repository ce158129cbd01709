"""Decoding an image file: every mode to RGB uint8, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from fgvr.runtime.errors import DataError

cv2.setNumThreads(1)  # loader workers are the parallelism; OpenCV's own threads only contend

_END_MARKERS = {b"\xff\xd8": b"\xff\xd9", b"\x89P": b"IEND\xaeB`\x82"}  # JPEG EOI, PNG IEND
FIX = "remove it or set data.skip_bad=true"  # how every bad-image error ends


def load_image(path: str) -> np.ndarray:
    """Decode an image file to RGB uint8 (grayscale, palette, RGBA and CMYK included).

    Raises DataError naming the file when it is missing, unreadable, empty, truncated or not an image
    (the loaders skip and count such files with data.skip_bad=true)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror or e}); {FIX}") from None
    if not data:
        raise DataError(f"{path}: empty image file (0 bytes); {FIX}")
    end = _END_MARKERS.get(data[:2])
    if end is not None and end not in data[-64:]:
        raise DataError(f"{path}: truncated image file (no end marker); re-download it, or {FIX}")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:
        raise DataError(f"{path}: not a decodable image ({e.err or 'OpenCV error'}); {FIX}") from None
    if image is None:
        raise DataError(f"{path}: not a decodable image; {FIX}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
