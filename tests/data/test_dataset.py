import os

import numpy as np
import pytest
from PIL import Image

from fgvr.data.dataset import ImageDataset, build_loaders, check_files, collate, stratified_split
from fgvr.data.image import load_image
from fgvr.data.readers import make_records
from fgvr.data.transforms import eval_transform, train_transform
from fgvr.runtime.config import AugmentConfig, DataConfig, DataFormat
from fgvr.runtime.errors import ConfigError, DataError


@pytest.mark.parametrize("mode,suffix", [("RGB", ".jpg"), ("L", ".jpg"), ("P", ".png"), ("RGBA", ".png"),
                                         ("CMYK", ".jpg"), ("LA", ".png"), ("I;16", ".png")])
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode, suffix):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (200, 40, 10)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 256)
    else:
        image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / f"img{suffix}"
    image.save(path)
    out = load_image(str(path))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if mode in ("RGB", "P", "RGBA"):  # lossless or near: the colour survives
        assert abs(int(out[10, 5, 0]) - 200) < 12 and abs(int(out[10, 5, 2]) - 10) < 12
    if mode == "CMYK":  # decoded to RGB, not left in CMYK or inverted
        assert out[10, 5, 0] > 150 and out[10, 25].max() < 40


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.jpg: cannot read"):
        load_image(str(tmp_path / "missing.jpg"))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="junk.jpg: not a decodable image"):
        load_image(str(junk))
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(full)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.jpg: truncated"):
        load_image(str(cut))


def test_skip_bad_drops_broken_images_and_counts_them(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    records = make_records([str(good), str(bad)], [0, 1])
    ds = ImageDataset(records, eval_transform(8, 1.0), skip_bad=True)
    images, labels, boxes, skipped = collate([ds[0], ds[1]])
    assert images.shape == (1, 3, 8, 8) and labels.tolist() == [0] and skipped == 1
    assert boxes.shape == (1, 4) and boxes.isnan().all()  # no box known
    with pytest.raises(DataError, match="bad.png"):
        ImageDataset(records, eval_transform(8, 1.0))[1]


def test_check_files_missing(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    records = make_records([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], [0, 0])
    with pytest.raises(DataError, match="b.jpg: image file not found .1 of 2 train"):
        check_files(records, "train", skip_bad=False)
    assert len(check_files(records, "train", skip_bad=True)) == 1


def test_stratified_split_is_seeded_and_per_class():
    labels = np.repeat(np.arange(5), 20)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert len(val) == 10 and np.bincount(labels[val]).tolist() == [2] * 5
    assert not set(train) & set(val) and len(train) + len(val) == 100
    assert np.array_equal(val, stratified_split(labels, 0.1, seed=3)[1])
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=4)[1])
    assert len(stratified_split(labels, 0.0, seed=3)[1]) == 0


def test_augmentation_depends_on_seed_epoch_index_not_on_worker(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(path)
    records = make_records([str(path)] * 2, [0, 0])
    tf = train_transform(16, 1.5, AugmentConfig(hflip=True, trivial_augment=True, random_erasing=0.5))
    ds = ImageDataset(records, tf, seed=1)
    a = ds[(0, 0)][0]
    again = ImageDataset(records, train_transform(16, 1.5, AugmentConfig(True, True, 0.5)), seed=1)
    assert (a == again[(0, 0)][0]).all()
    assert any((a != ds[(0, e)][0]).any() for e in range(1, 5))  # a new epoch draws new crops


def test_build_loaders_on_cub_layout(cub_root):
    cfg = DataConfig(name="cub", format=DataFormat.cub, root=str(cub_root), check_counts=False, img_size=24,
                     batch_size=4, num_workers=0, val_fraction=0.25)
    loaders = build_loaders(cfg, "unused", seed=0, pin_memory=False)
    assert len(loaders.train.dataset) + len(loaders.val.dataset) == 12 and len(loaders.test.dataset) == 6
    images, labels, boxes, skipped = next(iter(loaders.train))
    assert images.shape == (4, 3, 24, 24) and images.dtype.is_floating_point is False and skipped == 0
    assert boxes.shape == (4, 4) and boxes.isfinite().all()
    larger = build_loaders(cfg, "unused", seed=0, pin_memory=False, scale=2.0)  # selector.crop_source=original
    assert next(iter(larger.test)).images.shape == (6, 3, 48, 48)


def test_boxes_follow_the_geometric_transforms(tmp_path):
    """The ground-truth box comes out as fractions of the transformed image; NaN if cropped away."""
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(path)
    records = make_records([str(path)] * 3, [0] * 3, [[10, 10, 30, 20], [0, 0, 2, 2], [np.nan] * 4])
    ds = ImageDataset(records, eval_transform(40, 1.25))  # resize to 50 x 50, centre crop 40
    box = ds[0][2]  # x: 10..30 of 100 -> 5..15 of 50 -> 0..10 of 40; y: 10..20 of 50 -> 10..20 -> 5..15
    assert np.allclose(box.numpy(), [0, 5 / 40, 10 / 40, 15 / 40], atol=1e-6)
    assert ds[1][2].isnan().all() and ds[2][2].isnan().all()  # outside the centre crop; unknown
    flip = train_transform(40, 1.0, AugmentConfig(hflip=True))
    flipped = [ImageDataset(records, flip, seed=s)[(0, 0)][2] for s in range(8)]
    assert {round(float(b[0]), 4) for b in flipped} == {0.1, 0.7}  # x1 of the box and of its mirror image


def test_build_loaders_without_root_is_a_config_error():
    cfg = DataConfig(name="cub", format=DataFormat.cub, root=None)
    with pytest.raises(ConfigError, match="data.root is not set"):
        build_loaders(cfg, "unused", seed=0, pin_memory=False)


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0, 1.3])
def test_shrinking_averages_detail_the_output_cannot_hold(theta):
    """A grating finer than the output's pixels (0.3 cycles/px, shrunk 4x) must fade to its mean,
    not alias into false coarse stripes (bilinear sampling keeps std ~53 of the original 90)."""
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    grey = 127.5 + 127.5 * np.sin(2 * np.pi * 0.3 * (xx * np.cos(theta) + yy * np.sin(theta)))
    image = np.repeat(grey.round().astype(np.uint8)[..., None], 3, axis=-1)
    out = eval_transform(64, 1.0)(image=image, bboxes=np.zeros((0, 4), np.float32))["image"]
    assert out.std() < 20, out.std()


@pytest.mark.parametrize("yield_cores", [True, False])
def test_workers_yield_the_cores_to_a_model_on_the_cpu(cub_root, yield_cores):
    """A model on the CPU computes on every core: its loaders' workers run at nice 19 (on a GPU,
    where the workers are the CPU's main work, at the training process's own priority)."""
    cfg = DataConfig(name="cub", format=DataFormat.cub, root=str(cub_root), check_counts=False, img_size=24,
                     batch_size=4, num_workers=1)
    with build_loaders(cfg, "unused", seed=0, pin_memory=False, yield_cores=yield_cores) as loaders:
        for loader in (loaders.train, loaders.test):
            batches = iter(loader)
            next(batches)
            worker = batches._workers[0].pid
            assert os.getpriority(os.PRIO_PROCESS, worker) == (19 if yield_cores else os.nice(0))
