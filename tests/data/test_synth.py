import hashlib

import cv2
import numpy as np

from fgvr.config import SynthConfig
from fgvr.data.readers import read_cub
from fgvr.data.synth import generate, synth_root


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
