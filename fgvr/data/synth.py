"""The built-in synthetic fine-grained sets, written in the official CUB-200-2011 layout
(bounding_boxes.txt holds the part's box), generated once per setting and cached.

`kind=discs` (data=synth, the CPU default): every image holds several textured discs on a
noisy background. One warm-coloured disc is the "part": its grating (orientation x spatial
frequency) alone defines the class. The other discs are cool-coloured and carry gratings drawn
from the same set, so the image as a whole contains several class-like textures and a global
average cannot tell the classes apart; a model that finds the part can.

`kind=parts` (data=synth_parts, the selector benchmark): the premise region methods are built
on. The part is a small saturated disc whose colour (one of `groups`) is visible at any size,
but whose class within that colour is the orientation of a fine grating (`detail_freq` cycles
per pixel of the stored image) that the downscaled global view cannot resolve: a network input
a quarter of the stored side averages it away, while a crop of the part cut from the stored
image shows it. Distractor discs carry gratings of random classes, in colours
`distractor_similarity` of the way from grey to a part's saturation. So the global view alone
can tell the colour group (at most groups / num_classes of the classes), and finding the part
and looking at it closely tells the rest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from fgvr.runtime.config import SynthConfig, SynthKind
from fgvr.runtime.errors import ConfigError, DataError
from fgvr.runtime.files import atomic_dir

FREQUENCIES = (0.08, 0.16)  # discs: cycles per pixel at the stored image size
VERSION = 2  # discs; 2: the part anywhere in the frame (1: only in the central half)
PARTS_VERSION = 1
Box = tuple[float, float, float, float]
DISCS_KEYS = ("num_classes", "train_per_class", "test_per_class", "image_size", "distractors", "seed")


def class_grid(num_classes: int) -> list[tuple[float, float]]:
    """(orientation in radians, frequency) per class: orientations spread over [0, pi)."""
    per_freq = -(-num_classes // len(FREQUENCIES))
    return [(np.pi * (k % per_freq) / per_freq, FREQUENCIES[k // per_freq]) for k in range(num_classes)]


def synth_root(cache_dir: str | Path, cfg: SynthConfig) -> Path:
    """Where a given generator setting lives: the folder name hashes the settings that kind uses."""
    if SynthKind(cfg.kind) is SynthKind.discs:
        key, prefix = {"v": VERSION, **{k: getattr(cfg, k) for k in DISCS_KEYS}}, "synth"
    else:
        names = [k for k in SynthConfig.__dataclass_fields__ if k != "kind"]
        key, prefix = {"v": PARTS_VERSION, **{k: getattr(cfg, k) for k in names}}, "synth_parts"
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / f"{prefix}-{digest}"


def check_parts(cfg: SynthConfig) -> None:
    """The parts knobs' ranges, in one line each."""
    per_group = -(-cfg.num_classes // max(cfg.groups, 1))
    problems = {
        "groups": (1 <= cfg.groups <= min(cfg.num_classes, len(PART_HUES)),
                   f"between 1 and min(data.synth.num_classes, {len(PART_HUES)})"),
        "part_size": (0.05 <= cfg.part_size <= 0.5, "between 0.05 and 0.5 (a fraction of the image side)"),
        "detail_freq": (0 < cfg.detail_freq <= 0.45, "in (0, 0.45] cycles per pixel (0.5 is the Nyquist limit)"),
        "distractor_similarity": (0 <= cfg.distractor_similarity <= 1, "between 0 and 1"),
        "distractors": (0 <= cfg.distractors <= 8, "between 0 and 8"),
        "image_size": (cfg.image_size >= 32, "at least 32"),
        "num_classes": (per_group <= 36, "at most 36 per colour group (orientations 5 degrees apart)"),
    }
    for key, (ok, rule) in problems.items():
        if not ok:
            raise ConfigError(f"data.synth.{key}={getattr(cfg, key)}: must be {rule}")


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


# Part colours (RGB), far apart in hue and all fully saturated; distractors are greyed versions.
PART_HUES = np.array([[0.95, 0.15, 0.10], [0.95, 0.85, 0.10], [0.15, 0.85, 0.20], [0.15, 0.35, 0.95],
                      [0.85, 0.15, 0.90], [0.10, 0.85, 0.90], [0.95, 0.55, 0.05], [0.55, 0.20, 0.95]], np.float32)


def parts_classes(cfg: SynthConfig) -> list[tuple[int, float]]:
    """(colour group, grating orientation in radians) per class: the classes of a group take
    orientations evenly spread over [0, pi), so neighbours differ by 180 / per-group degrees."""
    per_group = -(-cfg.num_classes // cfg.groups)
    return [(k % cfg.groups, np.pi * (k // cfg.groups) / per_group) for k in range(cfg.num_classes)]


def render_parts(rng: np.random.Generator, label: int, cfg: SynthConfig) -> tuple[np.ndarray, tuple[float, ...]]:
    """One RGB uint8 image of class `label` for kind=parts and the part's box (x, y, w, h)."""
    size, classes = cfg.image_size, parts_classes(cfg)
    r = cfg.part_size * size / 2
    base = rng.uniform(0.3, 0.6, 3).astype(np.float32)
    img = np.clip(base + rng.normal(0, 0.05, (size, size, 3)), 0, 1).astype(np.float32)
    margin = r + 0.08 * size  # the eval centre crop (1 / data.resize_ratio of the side) keeps the part whole
    centres = [rng.uniform(margin, size - margin, 2)]
    for _ in range(100 * (1 + cfg.distractors)):  # bounded: a crowded setting gets fewer distractors
        if len(centres) == 1 + cfg.distractors:
            break
        c = rng.uniform(r, size - r, 2)
        if all(np.hypot(*(c - o)) > 2.2 * r for o in centres):
            centres.append(c)
    grey = np.float32(0.55)
    for cx, cy in centres[1:]:
        _, theta = classes[rng.integers(len(classes))]
        colour = grey + cfg.distractor_similarity * (PART_HUES[rng.integers(cfg.groups)] - grey)
        _disc(img, cx, cy, r, theta, cfg.detail_freq, colour, rng)
    (cx, cy), (group, theta) = centres[0], classes[label]
    _disc(img, cx, cy, r, theta, cfg.detail_freq, PART_HUES[group], rng)
    return (img * 255).round().astype(np.uint8), (cx - r, cy - r, 2 * r, 2 * r)


def class_names(cfg: SynthConfig) -> list[str]:
    if SynthKind(cfg.kind) is SynthKind.discs:
        return [f"{k + 1:03d}.theta{round(np.degrees(t)):03d}_freq{f:.2f}"
                for k, (t, f) in enumerate(class_grid(cfg.num_classes))]
    return [f"{k + 1:03d}.colour{g}_theta{round(np.degrees(t)):03d}" for k, (g, t) in enumerate(parts_classes(cfg))]


def generate(root: str | Path, cfg: SynthConfig) -> Path:
    """Write the set to `root` once (atomically: built in a temporary folder, then renamed)."""
    root = Path(root)
    if (root / "images.txt").is_file():
        return root
    parts = SynthKind(cfg.kind) is SynthKind.parts
    if parts:
        check_parts(cfg)
    rng = np.random.default_rng(cfg.seed)
    draw = render_parts if parts else render

    def images():
        image_id = 0
        for label in range(cfg.num_classes):
            for j in range(cfg.train_per_class + cfg.test_per_class):
                image_id += 1
                img, box = draw(rng, label, cfg)
                yield label, f"synth_{image_id:05d}.jpg", img, j < cfg.train_per_class, box

    with atomic_dir(root) as tmp:
        write_cub(tmp, class_names(cfg), images())
    return root


def write_cub(root: str | Path, classes: list[str], images: Iterable[tuple[int, str, np.ndarray, bool, Box]],
              quality: int = 95) -> Path:
    """A data set in the official CUB-200-2011 layout: images/<class>/<name>, images.txt,
    image_class_labels.txt, train_test_split.txt, bounding_boxes.txt and classes.txt, with 1-based
    ids in the order given. `images` yields (label from 0, file name, uint8 pixels: RGB (H, W, 3) or
    grey (H, W), whether it is a train image, its box (x, y, w, h) in pixels)."""
    root = Path(root)
    lines: dict[str, list[str]] = {n: [] for n in ("images", "labels", "split", "boxes")}
    for image_id, (label, name, pixels, train, box) in enumerate(images, 1):
        rel = f"{classes[label]}/{name}"
        (root / "images" / classes[label]).mkdir(parents=True, exist_ok=True)
        pixels = pixels[..., ::-1] if pixels.ndim == 3 else pixels  # OpenCV writes BGR
        if not cv2.imwrite(str(root / "images" / rel), pixels, [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise DataError(f"{root / 'images' / rel}: cannot write the image")
        lines["images"].append(f"{image_id} {rel}")
        lines["labels"].append(f"{image_id} {label + 1}")
        lines["split"].append(f"{image_id} {int(train)}")
        lines["boxes"].append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
    files = {"images": "images.txt", "labels": "image_class_labels.txt", "split": "train_test_split.txt",
             "boxes": "bounding_boxes.txt"}
    for key, name in files.items():
        (root / name).write_text("\n".join(lines[key]) + "\n")
    (root / "classes.txt").write_text("".join(f"{k + 1} {d}\n" for k, d in enumerate(classes)))
    return root
