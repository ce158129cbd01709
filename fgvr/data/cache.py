"""`data.cache=decoded`: every image of a split decoded and resized once into a memory-mapped
uint8 array, so decoding, the costliest step of the data pipeline, leaves the training loop.

A split's cache holds its images at the size the transforms resize to first (square, side
round(round(data.img_size x source scale) x data.resize_ratio)), so the transforms start at their
crop; a JPEG is decoded at reduced scale where that covers the side, as without the cache.
The cache's name covers that size and every file's path, size and modification time: a changed
data set or setting makes a new cache and never reads a stale one. It is built under a
temporary name, renamed into place when complete, and by one process at a time (a file lock), so
the ranks of a DDP run build it once."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fgvr.data.image import load_resized
from fgvr.data.readers import Records
from fgvr.runtime.errors import DataError
from fgvr.runtime.files import atomic_dir

log = logging.getLogger(__name__)


class DecodedImages:
    """A split's cached images, or the rows of it that `rows` selects. The arrays are opened
    lazily, so loader workers each map the files instead of being sent a copy."""

    def __init__(self, path: Path, rows: np.ndarray | None = None):
        self.path, self.rows = path, rows
        self._images = self._sizes = None

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None:
            self._images = np.load(self.path / "images.npy", mmap_mode="r")
            self._sizes = np.load(self.path / "sizes.npy")
        return self._images, self._sizes

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_sizes": None}

    def select(self, paths: np.ndarray) -> DecodedImages:
        """The cached rows of these files (each must be in the split)."""
        row = {p: i for i, p in enumerate((self.path / "paths.txt").read_text().splitlines())}
        return DecodedImages(self.path, np.fromiter((row[p] for p in paths), np.int64, len(paths)))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (R, R, 3) uint8, (sx, sy): its scale from the original file's pixels)."""
        images, sizes = self._open()
        row = self.rows[index] if self.rows is not None else index
        w, h = sizes[row]
        if w == 0:
            path = (self.path / "paths.txt").read_text().splitlines()[row]
            raise DataError(f"{path}: not decodable (found while building the decoded cache); remove it or set "
                            "data.skip_bad=true")
        side = images.shape[1]
        # A copy: the map is read-only, and augmentations may write into their input.
        return np.array(images[row]), np.array([side / w, side / h], np.float32)


class _Decode(Dataset):
    """File i -> (i, image resized to side x side, (w, h) of its full decode); (0, 0) if unreadable."""

    def __init__(self, paths: np.ndarray, side: int, skip_bad: bool):
        self.paths, self.side, self.skip_bad = paths, side, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, *load_resized(self.paths[i], (self.side, self.side))
        except DataError:
            if not self.skip_bad:
                raise
            return i, None, (0, 0)


def cache_key(paths: np.ndarray, side: int) -> str:
    """A digest of the size and every file's path, size and modification time (missing files too)."""
    digest = hashlib.sha1(f"decoded-v3 {side}\n".encode())  # v2: area-averaged shrinking; v3: reduced JPEG decode
    for p in paths:
        try:
            st = os.stat(p)
            digest.update(f"{p} {st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{p} missing\n".encode())
    return digest.hexdigest()[:16]


def decoded_cache(records: Records, side: int, cache_dir: str | Path, split: str, workers: int,
                  skip_bad: bool) -> DecodedImages:
    """The split's decoded cache, built first if there is none for these files and this size."""
    root = Path(cache_dir).expanduser() / "decoded"
    path = root / f"{split}-{side}px-{cache_key(records.paths, side)}"
    if path.is_dir():
        return DecodedImages(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f"{path.name}.lock", "w")
    except OSError as e:
        raise DataError(f"{root}: cannot write the decoded cache there ({e.strerror}); set paths.cache_dir=<a "
                        "writable folder> or data.cache=none") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then use its cache
        if not path.is_dir():
            _build(records.paths, side, path, workers, skip_bad)
    return DecodedImages(path)


def _build(paths: np.ndarray, side: int, path: Path, workers: int, skip_bad: bool) -> None:
    need, free = len(paths) * side * side * 3, shutil.disk_usage(path.parent).free
    if need > free:
        raise DataError(f"{path.parent}: the decoded cache needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB "
                        "free; set paths.cache_dir=<a larger disk> or data.cache=none")
    log.info("decoding %d images at %d px into %s (%.1f GiB, once)", len(paths), side, path, need / 2**30)
    start = time.perf_counter()
    with atomic_dir(path) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(paths), side, side, 3))
        sizes = np.zeros((len(paths), 2), np.int32)
        # Its own generator: a loader draws its workers' seeds from the global RNG otherwise, and the run
        # that builds the cache would start from other weights than the runs that find it.
        loader = DataLoader(_Decode(paths, side, skip_bad), batch_size=None, num_workers=workers,
                            generator=torch.Generator())
        for i, image, size in loader:
            if image is not None:
                images[i] = image
            sizes[i] = size
        images.flush()
        del images
        np.save(tmp / "sizes.npy", sizes)
        (tmp / "paths.txt").write_text("\n".join(paths) + "\n")
    log.info("decoded cache ready in %.0f s", time.perf_counter() - start)
