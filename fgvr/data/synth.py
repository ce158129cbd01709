"""The built-in synthetic fine-grained set, written in the official CUB-200-2011 layout.

Every image holds several textured discs on a noisy background. One warm-coloured disc is the
"part": its grating (orientation x spatial frequency) alone defines the class, and
bounding_boxes.txt holds its box. The other discs are cool-coloured and carry gratings drawn
from the same set, so the image as a whole contains several class-like textures and a global
average cannot tell the classes apart; a model that finds the part can.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from fgvr.config import SynthConfig

FREQUENCIES = (0.08, 0.16)  # cycles per pixel at the stored image size
VERSION = 2  # 2: the part anywhere in the frame (1: only in the central half)


def class_grid(num_classes: int) -> list[tuple[float, float]]:
    """(orientation in radians, frequency) per class: orientations spread over [0, pi)."""
    per_freq = -(-num_classes // len(FREQUENCIES))
    return [(np.pi * (k % per_freq) / per_freq, FREQUENCIES[k // per_freq]) for k in range(num_classes)]


def synth_root(cache_dir: str | Path, cfg: SynthConfig) -> Path:
    """Where a given generator setting lives: the folder name hashes the settings."""
    key = json.dumps({"v": VERSION, **{k: getattr(cfg, k) for k in SynthConfig.__dataclass_fields__}}, sort_keys=True)
    return Path(cache_dir).expanduser() / f"synth-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _disc(img: np.ndarray, cx: float, cy: float, r: float, theta: float, freq: float, rgb: np.ndarray, rng) -> None:
    """Paint a disc of grating texture in colour `rgb` (computed on the disc's window only)."""
    x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
    x1, y1 = min(int(cx + r) + 2, img.shape[1]), min(int(cy + r) + 2, img.shape[0])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    mask = np.clip(r + 0.5 - np.hypot(xx - cx, yy - cy), 0, 1)[..., None]  # anti-aliased edge
    window = img[y0:y1, x0:x1]
    window[:] = window * (1 - mask) + wave[..., None] * rgb * mask


def render(rng: np.random.Generator, label: int, cfg: SynthConfig) -> tuple[np.ndarray, tuple[float, ...]]:
    """One RGB uint8 image of class `label` and the part's box (x, y, w, h)."""
    size, grid = cfg.image_size, class_grid(cfg.num_classes)
    r = size * 0.15
    base = rng.uniform(0.25, 0.55, 3).astype(np.float32)
    img = np.clip(base + rng.normal(0, 0.06, (size, size, 3)), 0, 1).astype(np.float32)
    # Disc centres anywhere inside the frame (so a fixed centre crop cannot stand in for finding
    # the part), not overlapping one another by more than a little; the first is the part.
    centres = [rng.uniform(r, size - r, 2)]
    while len(centres) < 1 + cfg.distractors:
        c = rng.uniform(r, size - r, 2)
        if all(np.hypot(*(c - o)) > 1.6 * r for o in centres):
            centres.append(c)
    for cx, cy in centres[1:]:
        theta, freq = grid[rng.integers(len(grid))]
        cool = np.array([rng.uniform(0.1, 0.4), rng.uniform(0.4, 0.8), rng.uniform(0.7, 1.0)], np.float32)
        _disc(img, cx, cy, r, theta, freq, cool, rng)
    (cx, cy), (theta, freq) = centres[0], grid[label]
    warm = np.array([rng.uniform(0.85, 1.0), rng.uniform(0.45, 0.75), rng.uniform(0.0, 0.2)], np.float32)
    _disc(img, cx, cy, r, theta, freq, warm, rng)
    return (img * 255).round().astype(np.uint8), (cx - r, cy - r, 2 * r, 2 * r)


def generate(root: str | Path, cfg: SynthConfig) -> Path:
    """Write the set to `root` once (atomically: built in a temp dir, then renamed)."""
    root = Path(root)
    if (root / "images.txt").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        rng = np.random.default_rng(cfg.seed)
        grid = class_grid(cfg.num_classes)
        class_dirs = [f"{k + 1:03d}.theta{round(np.degrees(t)):03d}_freq{f:.2f}" for k, (t, f) in enumerate(grid)]
        lines: dict[str, list[str]] = {n: [] for n in ("images", "labels", "split", "boxes")}
        image_id = 0
        for label, cdir in enumerate(class_dirs):
            (tmp / "images" / cdir).mkdir(parents=True)
            for j in range(cfg.train_per_class + cfg.test_per_class):
                image_id += 1
                img, box = render(rng, label, cfg)
                rel = f"{cdir}/synth_{image_id:05d}.jpg"
                cv2.imwrite(str(tmp / "images" / rel), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                lines["images"].append(f"{image_id} {rel}")
                lines["labels"].append(f"{image_id} {label + 1}")
                lines["split"].append(f"{image_id} {int(j < cfg.train_per_class)}")
                lines["boxes"].append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
        files = {"images": "images.txt", "labels": "image_class_labels.txt", "split": "train_test_split.txt",
                 "boxes": "bounding_boxes.txt"}
        for key, name in files.items():
            (tmp / name).write_text("\n".join(lines[key]) + "\n")
        (tmp / "classes.txt").write_text("".join(f"{k + 1} {d}\n" for k, d in enumerate(class_dirs)))
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first; its copy is identical
            if not (root / "images.txt").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
