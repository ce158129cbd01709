import hashlib
import json

import cv2
import numpy as np
import pytest

from fgvr.data.readers import read_cub
from fgvr.data.synth import generate, synth_root
from fgvr.runtime.config import SynthConfig
from fgvr.runtime.errors import ConfigError


def _spectrum(path: str, box: np.ndarray | None) -> np.ndarray:
    """A global texture descriptor: the normalised 2-D amplitude spectrum of the grey image."""
    g = cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float32)
    if box is not None:
        x1, y1, x2, y2 = box.round().astype(int)
        g = g[max(y1, 0):y2, max(x1, 0):x2]
    g = cv2.resize(g, (32, 32))
    f = np.abs(np.fft.fft2(g - g.mean())).ravel()
    return f / np.linalg.norm(f)


def _nearest_centroid_acc(splits, crop: bool, num_classes: int) -> float:
    def feats(r):
        return np.stack([_spectrum(p, b if crop else None) for p, b in zip(r.paths, r.boxes)])

    train, test = feats(splits.train), feats(splits.test)
    centroids = np.stack([train[splits.train.labels == c].mean(0) for c in range(num_classes)])
    return float((np.argmax(test @ centroids.T, 1) == splits.test.labels).mean())


def test_part_decides_the_class_not_the_whole_image(tmp_path):
    """Texture statistics of the part's box separate the classes; those of the whole image do not."""
    cfg = SynthConfig(num_classes=10, train_per_class=30, test_per_class=20)
    splits = read_cub(generate(tmp_path / "synth", cfg))
    assert splits.classes[0].startswith("001.theta000")
    part, whole = _nearest_centroid_acc(splits, True, 10), _nearest_centroid_acc(splits, False, 10)
    assert part >= 0.95, part
    assert whole <= 0.7, whole  # chance is 0.1, but every image holds several class-like gratings


def test_boxes_hold_the_warm_part(tmp_path):
    splits = read_cub(generate(tmp_path / "s", SynthConfig(num_classes=2, train_per_class=4, test_per_class=1)))
    for path, (x1, y1, x2, y2) in zip(splits.train.paths, splits.train.boxes):
        img = cv2.imread(path)[..., ::-1].astype(int)
        warm = (img[..., 0] - img[..., 2]) > 120  # red well above blue: only the part is painted so
        ys, xs = np.nonzero(warm)
        assert len(xs) > 20
        assert x1 - 2 <= np.median(xs) <= x2 + 2 and y1 - 2 <= np.median(ys) <= y2 + 2


def test_generation_is_deterministic_and_cached(tmp_path):
    cfg = SynthConfig(num_classes=2, train_per_class=3, test_per_class=1)

    def digest(root):
        return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()

    a, b = generate(tmp_path / "a", cfg), generate(tmp_path / "b", cfg)
    assert digest(a) == digest(b)
    mtime = (a / "images.txt").stat().st_mtime_ns
    generate(a, cfg)  # second call reuses
    assert (a / "images.txt").stat().st_mtime_ns == mtime
    assert synth_root(tmp_path, cfg) != synth_root(tmp_path, SynthConfig(num_classes=3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_a_failed_generation_leaves_nothing_and_a_finished_one_the_usual_permissions(tmp_path, monkeypatch):
    import os

    import fgvr.data.synth as synth

    cfg = SynthConfig(num_classes=2, train_per_class=2, test_per_class=1)
    drawn, render = [], synth.render

    def failing(rng, label, cfg):  # the second image fails, with the first already written
        if drawn:
            raise OSError("the disk went away")
        drawn.append(label)
        return render(rng, label, cfg)

    monkeypatch.setattr(synth, "render", failing)
    with pytest.raises(OSError, match="went away"):
        generate(tmp_path / "s", cfg)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary folder
    monkeypatch.undo()
    umask = os.umask(0)
    os.umask(umask)
    assert (generate(tmp_path / "s", cfg).stat().st_mode & 0o777) == 0o777 & ~umask  # readable by others as usual


PARTS = dict(kind="parts", num_classes=8, groups=2, train_per_class=12, test_per_class=4, image_size=128)


def _parts(**overrides) -> SynthConfig:
    return SynthConfig(**(PARTS | overrides))


def test_parts_part_box_holds_the_saturated_disc_of_its_colour_group(tmp_path):
    from fgvr.data.synth import PART_HUES, parts_classes

    cfg = _parts()
    splits = read_cub(generate(tmp_path / "p", cfg))
    assert splits.classes[:3] == ["001.colour0_theta000", "002.colour1_theta000", "003.colour0_theta045"]
    groups = [g for g, _ in parts_classes(cfg)]
    for path, label, (x1, y1, x2, y2) in zip(splits.train.paths, splits.train.labels, splits.train.boxes):
        img = cv2.imread(path)[..., ::-1].astype(np.float32) / 255
        assert x2 - x1 == pytest.approx(0.2 * 128, abs=0.2)  # part_size of the side
        # The most saturated spot (over the grating's period) is the part, in its group's colour.
        blurred = cv2.blur(img, (9, 9))
        saturation = blurred.max(-1) - blurred.min(-1)
        y, x = np.unravel_index(saturation.argmax(), saturation.shape)
        assert x1 <= x <= x2 and y1 <= y <= y2
        assert np.argmax(blurred[y, x]) == np.argmax(PART_HUES[groups[label]])


def test_parts_detail_is_lost_in_the_global_view_and_kept_in_a_crop(tmp_path):
    """The premise of data=synth_parts: within a colour group, the orientation spectrum of the
    part cut from the stored image tells the classes apart; the same part cut from a view
    downscaled 4x (what the 64 px network input holds) does not."""
    cfg = _parts(num_classes=4, groups=1, train_per_class=30, test_per_class=20)
    splits = read_cub(generate(tmp_path / "p", cfg))

    def spectrum(path: str, box: np.ndarray, scale: int) -> np.ndarray:
        g = cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float32)
        if scale > 1:
            g = cv2.resize(g, (g.shape[1] // scale, g.shape[0] // scale), interpolation=cv2.INTER_AREA)
        x1, y1, x2, y2 = (box / scale).round().astype(int)
        part = cv2.resize(g[y1:y2, x1:x2], (32, 32))
        f = np.abs(np.fft.fft2(part - part.mean())).ravel()
        return f / np.linalg.norm(f)

    def accuracy(scale: int) -> float:
        feats = {s: np.stack([spectrum(p, b, scale) for p, b in zip(r.paths, r.boxes)])
                 for s, r in (("train", splits.train), ("test", splits.test))}
        centroids = np.stack([feats["train"][splits.train.labels == c].mean(0) for c in range(4)])
        return float((np.argmax(feats["test"] @ centroids.T, 1) == splits.test.labels).mean())

    full, global_view = accuracy(1), accuracy(4)
    assert full >= 0.95, full
    assert global_view <= 0.5, global_view  # chance is 0.25


def test_parts_generation_is_deterministic_and_its_cache_key_covers_every_knob(tmp_path):
    cfg = _parts(num_classes=2, train_per_class=2, test_per_class=1)

    def digest(root):
        return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()

    assert digest(generate(tmp_path / "a", cfg)) == digest(generate(tmp_path / "b", cfg))
    keys = {synth_root(tmp_path, cfg)}
    for knob, value in (("part_size", 0.3), ("detail_freq", 0.3), ("distractor_similarity", 0.9), ("groups", 1),
                        ("distractors", 1), ("image_size", 96), ("seed", 1)):
        keys.add(synth_root(tmp_path, _parts(num_classes=2, train_per_class=2, test_per_class=1, **{knob: value})))
    assert len(keys) == 8 and all(k.name.startswith("synth_parts-") for k in keys)
    # The discs set's key is the one it always had: its parts knobs do not change it.
    assert synth_root(tmp_path, SynthConfig()) == synth_root(tmp_path, SynthConfig(part_size=0.4))
    assert synth_root(tmp_path, SynthConfig()).name == "synth-" + hashlib.sha1(json.dumps(
        {"v": 2, "num_classes": 10, "train_per_class": 160, "test_per_class": 40, "image_size": 96, "distractors": 3,
         "seed": 0}, sort_keys=True).encode()).hexdigest()[:10]


@pytest.mark.parametrize("knob,value,message", [
    ("groups", 9, "data.synth.groups=9: must be between 1 and min"),
    ("part_size", 0.7, "data.synth.part_size=0.7: must be between 0.05 and 0.5"),
    ("detail_freq", 0.6, "data.synth.detail_freq=0.6: must be in \\(0, 0.45\\]"),
    ("distractor_similarity", -1.0, "data.synth.distractor_similarity=-1.0: must be between 0 and 1"),
])
def test_parts_knobs_out_of_range_are_one_line(tmp_path, knob, value, message):
    with pytest.raises(ConfigError, match=message):
        generate(tmp_path / "x", _parts(**{knob: value}))
    assert not list(tmp_path.iterdir())  # nothing written
