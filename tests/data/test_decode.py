"""JPEGs decoded at the smallest libjpeg scale that covers the first resize: the batches of the full
decode up to resampling noise, the same boxes, never fewer pixels than the resize needs."""

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fgvr.data.dataset import ImageDataset, build_loaders, collate
from fgvr.data.image import decode, load_image, load_resized
from fgvr.data.readers import make_records
from fgvr.data.transforms import eval_transform
from fgvr.runtime.config import AugmentConfig, DataCache, DataConfig, DataFormat
from fgvr.runtime.errors import DataError
from tests.data.test_bad_files import BAD_IMAGES, spoil

TURNED = 6  # EXIF orientation: stored landscape, shown turned a quarter (portrait)


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Photo-like RGB pixels: smooth colour fields, fine texture, an edge and sensor noise."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w]
    texture = 25 * np.sin(xx * rng.uniform(0.05, 0.4) + yy * rng.uniform(0.05, 0.4))[..., None]
    image = np.clip(field + texture + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    cv2.circle(image, (w // 3, h // 2), h // 4, (250, 30, 40), -1)
    return image


def save(path: Path, pixels: np.ndarray, mode: str = "RGB", orientation: int = 1) -> str:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image = Image.fromarray(pixels).convert(mode)
    if path.suffix == ".png":
        image.save(path)
    else:
        image.save(path, quality=90, exif=exif.tobytes())
    return str(path)


# name, (w, h) as stored, mode, EXIF orientation; the box (x, y, w, h) in the pixels of the image as shown
FILES = [("photo.jpg", (1000, 750), "RGB", 1, (120, 80, 700, 500)),
         ("odd.jpg", (999, 601), "RGB", 1, (333.5, 101, 600, 499)),
         ("gray.jpg", (800, 600), "L", 1, (10, 20, 500, 400)),
         ("cmyk.jpg", (640, 480), "CMYK", 1, (100, 50, 300, 300)),
         ("turned.jpg", (1000, 750), "RGB", TURNED, (100, 300, 500, 600)),
         ("flat.png", (700, 500), "RGB", 1, (50, 50, 400, 300))]


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    rows = ["path,label,x,y,w,h"]
    for k, (name, (w, h), mode, orientation, box) in enumerate(FILES):
        save(root / name, photo(w, h, seed=k), mode, orientation)
        rows.append(f"{name},{k % 3},{','.join(map(str, box))}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "test.csv").write_text("\n".join(rows) + "\n")
    return root


def full_decode_batch(loader):
    """The keys of the loader's first batch through the same dataset decoding every image in full."""
    ds = loader.dataset
    full = ImageDataset(ds.records, ds.transform, seed=ds.seed, reduced=False)
    return collate([full[key] for key in list(loader.sampler)[:loader.batch_size]])


@pytest.mark.parametrize("img_size,tolerance", [(64, 4.0), (224, 1.5)])  # resize to 80: JPEGs at 1/8, 1/4; 280: 1/2
def test_reduced_decode_gives_the_batches_of_the_full_decode(csv_root, tmp_path, img_size, tolerance):
    """Train (crop, flip, erasing) and eval batches of RGB, odd-sized, grayscale, CMYK and EXIF-turned
    JPEGs and a PNG: the same labels and boxes (to 1e-4 of the side), and images that differ by
    resampling noise. The full decode averages the source pixels each output pixel covers (a
    12.5 x 9.4 px footprint at 80 px); the reduced one averages 8 x 8 blocks, then those. Detail
    finer than an output pixel (here deliberately strong: pixel-scale texture and sensor noise)
    aliases differently, most at 1/8: up to 3.8 grey levels mean per image at 80 px, 0.9 at 280,
    about what a Lanczos resize of the full decode differs from its area resize by (1-3 levels on
    these images); a shift by one output pixel is 5-20 levels, swapped channels about 60.
    TrivialAugment is left out: its posterize, solarize and equalize turn a level's difference at
    their thresholds into tens."""
    cfg = DataConfig(name="mine", format=DataFormat.csv, root=str(csv_root), img_size=img_size, resize_ratio=1.25,
                     batch_size=len(FILES), num_workers=0, val_fraction=0, check_counts=False,
                     augment=AugmentConfig(hflip=True, trivial_augment=False, random_erasing=0.3))
    loaders = build_loaders(cfg, str(tmp_path), seed=3, pin_memory=False)
    for loader in (loaders.train, loaders.test):
        assert loader.dataset.size == (round(img_size * 1.25),) * 2
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            reduced, full = next(iter(loader)), full_decode_batch(loader)
            assert torch.equal(reduced.labels, full.labels) and reduced.images.shape == full.images.shape
            assert not torch.equal(reduced.images, full.images)  # the reduced decode ran
            diff = (reduced.images.float() - full.images.float()).abs().mean(dim=(1, 2, 3))
            assert diff.max() <= tolerance and diff.mean() <= tolerance / 2, diff
            assert torch.allclose(reduced.boxes, full.boxes, atol=1e-4, equal_nan=True)
            assert full.boxes.isfinite().sum() >= len(FILES) - 1  # boxes were compared, not NaN


def test_decoded_cache_decodes_reduced_as_the_loader_does(csv_root, tmp_path):
    """data.cache=decoded holds what the uncached loader resizes at decode, to the pixel."""
    common = dict(name="mine", format=DataFormat.csv, root=str(csv_root), img_size=64, resize_ratio=1.25,
                  batch_size=len(FILES), num_workers=0, val_fraction=0, check_counts=False)
    plain = build_loaders(DataConfig(**common), str(tmp_path), seed=0, pin_memory=False)
    cached = build_loaders(DataConfig(**common, cache=DataCache.decoded), str(tmp_path), seed=0, pin_memory=False)
    a, b = next(iter(plain.test)), next(iter(cached.test))
    assert torch.equal(a.images, b.images)
    assert torch.allclose(a.boxes, b.boxes, atol=1e-6)


@pytest.mark.parametrize("side,decoded", [(258, (500, 375)), (187, (250, 188)), (188, (500, 375)),
                                          (93, (125, 94)), (94, (250, 188)), (40, (125, 94)), (376, (1000, 750)),
                                          (751, (1000, 750)), (None, (1000, 750))])
def test_a_jpeg_is_decoded_at_the_smallest_scale_that_covers_the_side(tmp_path, side, decoded):
    path = save(tmp_path / "photo.jpg", photo(1000, 750))
    image, size, scale = decode(path, None if side is None else (side, side))
    assert image.shape == (decoded[1], decoded[0], 3) and image.dtype == np.uint8 and size == (1000, 750)
    assert scale == 1000 // decoded[0]


def test_decoded_sides_never_fall_below_the_side(tmp_path):
    """999 x 601: libjpeg rounds reduced sizes up (1/8: 125 x 76); every side gets the smallest
    scale whose exact sides (601 / 8 = 75.1) both reach it, so the resize after it only shrinks,
    and images smaller than the side come in full."""
    path = save(tmp_path / "odd.jpg", photo(999, 601))
    for side in range(1, 700, 3):
        image, size, scale = decode(path, (side, side))
        h, w = image.shape[:2]
        assert size == (999, 601) and (w, h) == (math.ceil(999 / scale), math.ceil(601 / scale))
        assert 601 / scale >= side or scale == 1, (side, w, h)
        assert scale == 8 or 601 / (2 * scale) < side, (side, scale)  # no smaller scale covers it


def test_only_jpegs_are_reduced_and_modes_and_orientation_as_the_full_decode(tmp_path):
    """PNGs decode in full; grayscale and CMYK JPEGs come out in the full decode's colours; an
    EXIF-turned JPEG is turned as the full decode turns it, with its full size as shown."""
    pixels = photo(1000, 750)
    png = save(tmp_path / "a.png", pixels)
    assert decode(png, (100, 100)).image.shape == (750, 1000, 3)
    files = [(save(tmp_path / f"{mode}.jpg", pixels, mode), (1000, 750)) for mode in ("L", "CMYK")]
    files.append((save(tmp_path / "turned.jpg", pixels, orientation=TURNED), (750, 1000)))
    for path, (w, h) in files:
        image, size, scale = decode(path, (100, 100))
        assert image.shape == (math.ceil(h / 4), math.ceil(w / 4), 3) and size == (w, h) and scale == 4
        full = cv2.resize(load_image(path), (300, 300), interpolation=cv2.INTER_AREA)
        assert load_image(path).shape == (h, w, 3) and decode(path, (300, 300)).scale == 2
        assert np.abs(load_resized(path, (300, 300))[0].astype(int) - full).mean() < 1.5, path


@pytest.mark.parametrize("w,h,side,scale", [(999, 601, 120, 4), (1003, 777, 90, 8)])
def test_boxes_land_on_the_object_for_a_size_the_scale_does_not_divide(tmp_path, w, h, side, scale):
    """A white rectangle on black, its box the annotation: after the reduced decode (whose last row
    and column stand for part of a block) and the resize, the box lies on the rectangle's edges,
    found to a fraction of a pixel from the area-averaged grey levels across them."""
    pixels = np.zeros((h, w, 3), np.uint8)
    box = [w // 5, h // 6, w - 9, h - 5]  # near the right and bottom edges, where a stretch would show
    pixels[box[1]:box[3], box[0]:box[2]] = 255
    path = save(tmp_path / "odd.jpg", pixels)
    ds = ImageDataset(make_records([path], [0], [box]), eval_transform(side, 1.0))  # resize to side, crop it all
    assert decode(path, ds.size).scale == scale
    image, _, out = ds[0]
    white = image[0].numpy() / 255
    row, col, mid = white[side // 2], white[:, side // 2], side // 2
    edges = [(1 - row[:mid]).sum(), (1 - col[:mid]).sum(), mid + row[mid:].sum(), mid + col[mid:].sum()]
    assert np.abs(out.numpy() * side - edges).max() < 0.05, (out * side, edges)


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_a_bad_jpeg_asked_for_reduced_is_the_one_line_error_of_the_full_decode(tmp_path, kind):
    path = tmp_path / "bird.jpg"
    save(path, photo(400, 300))
    spoil(path, kind)
    with pytest.raises(DataError) as full:
        load_image(str(path))
    with pytest.raises(DataError) as reduced:
        load_resized(str(path), (40, 40))
    assert str(reduced.value) == str(full.value)


def test_a_decode_not_of_the_size_the_header_gives_is_redone_in_full(tmp_path, monkeypatch):
    """Where OpenCV reads another EXIF orientation than Pillow, the reduced image is not the size
    the header promised: the image is decoded in full rather than given a wrong size."""
    path = save(tmp_path / "photo.jpg", photo(1000, 750))
    monkeypatch.setattr("fgvr.data.image._jpeg_size", lambda data: (750, 1000))  # Pillow's reading: turned
    image, size, scale = decode(path, (100, 100))
    assert image.shape == (750, 1000, 3) and size == (1000, 750) and scale == 1
