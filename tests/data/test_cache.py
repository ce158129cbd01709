"""data.cache=decoded: the same batches as decoding every epoch, built once, never stale."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fgvr.data.dataset import build_loaders
from fgvr.runtime.config import AugmentConfig, DataCache, DataConfig, DataFormat
from fgvr.runtime.errors import DataError


def cub_config(root, cache: DataCache, **kwargs) -> DataConfig:
    return DataConfig(name="cub", format=DataFormat.cub, root=str(root), img_size=24, resize_ratio=1.25, batch_size=4,
                      num_workers=0, val_fraction=0.25, cache=cache, check_counts=False,
                      augment=AugmentConfig(hflip=True, trivial_augment=True, random_erasing=0.3), **kwargs)


def batches(loader, epoch: int = 0) -> list:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def cache_dirs(cache_dir) -> list[str]:
    return sorted(p.name for p in (cache_dir / "decoded").iterdir() if p.is_dir())


def test_decoded_cache_gives_the_batches_of_decoding_every_epoch(cub_root, tmp_path):
    """Images (grayscale CUB files included), labels and the boxes carried through resize, crop,
    flip and TrivialAugment are those of the uncached pipeline, in every split."""
    plain = build_loaders(cub_config(cub_root, DataCache.none), str(tmp_path), seed=1, pin_memory=False)
    cached = build_loaders(cub_config(cub_root, DataCache.decoded), str(tmp_path), seed=1, pin_memory=False)
    assert cache_dirs(tmp_path) == [n for n in cache_dirs(tmp_path) if n.startswith(("train-30px-", "test-30px-"))]
    assert len(cache_dirs(tmp_path)) == 2
    for split in ("train", "val", "test"):
        for a, b in zip(batches(getattr(plain, split), 1), batches(getattr(cached, split), 1), strict=True):
            assert torch.equal(a.labels, b.labels)
            assert (a.images.int() - b.images.int()).abs().max() <= 1  # resize of the same pixels
            assert torch.allclose(a.boxes, b.boxes, atol=1e-6, equal_nan=True)


def test_cache_is_built_once_and_rebuilt_when_a_file_or_the_size_changes(cub_root, tmp_path):
    build_loaders(cub_config(cub_root, DataCache.decoded), str(tmp_path), seed=0, pin_memory=False)
    first = cache_dirs(tmp_path)
    stamp = {p: os.stat(tmp_path / "decoded" / p / "images.npy").st_mtime_ns for p in first}
    build_loaders(cub_config(cub_root, DataCache.decoded), str(tmp_path), seed=7, pin_memory=False)  # another seed
    assert cache_dirs(tmp_path) == first  # reused: the val split is carved from the same cached train split
    assert all(os.stat(tmp_path / "decoded" / p / "images.npy").st_mtime_ns == t for p, t in stamp.items())

    image = cub_root / "images" / "001.Bird_1" / "Bird_1_0000.jpg"  # the first test image
    Image.fromarray(np.full((40, 48, 3), 255, np.uint8)).save(image)  # the data set changed
    loaders = build_loaders(cub_config(cub_root, DataCache.decoded), str(tmp_path), seed=0, pin_memory=False)
    assert len(set(cache_dirs(tmp_path)) - set(first)) == 1  # the test split's cache is new
    cfg = cub_config(cub_root, DataCache.decoded)
    cfg.img_size = 32
    build_loaders(cfg, str(tmp_path), seed=0, pin_memory=False)
    assert sum(n.startswith(("train-40px-", "test-40px-")) for n in cache_dirs(tmp_path)) == 2
    assert not list((tmp_path / "decoded").glob("*.tmp*"))  # no half-built cache left behind
    assert next(iter(loaders.test)).images[0].min() >= 250  # the new file, not the stale copy


def test_unreadable_image_fails_the_build_unless_skip_bad(cub_root, tmp_path):
    bad = sorted((cub_root / "images").rglob("*.jpg"))[1]
    bad.write_bytes(b"\xff\xd8 not a jpeg \xff\xd9")
    with pytest.raises(DataError, match=f"{bad.name}: not a decodable image"):
        build_loaders(cub_config(cub_root, DataCache.decoded), str(tmp_path), seed=0, pin_memory=False)
    assert not (tmp_path / "decoded").exists() or not cache_dirs(tmp_path)  # nothing half-built was kept
    loaders = build_loaders(cub_config(cub_root, DataCache.decoded, skip_bad=True), str(tmp_path), seed=0,
                            pin_memory=False)
    skipped = sum(b.skipped for split in ("train", "val", "test") for b in batches(getattr(loaders, split)))
    assert skipped == 1


def test_an_unwritable_cache_dir_is_one_line(cub_root, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DataError, match="cannot write the decoded cache there .* or data.cache=none"):
        build_loaders(cub_config(cub_root, DataCache.decoded), str(tmp_path / "file"), seed=0, pin_memory=False)
