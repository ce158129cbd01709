"""The dataset, the seeded val split and the loaders."""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fgvr.data.cache import DecodedImages, decoded_cache
from fgvr.data.check import quick_check
from fgvr.data.image import load_image, load_resized
from fgvr.data.readers import Records, read_splits
from fgvr.data.transforms import eval_transform, to_chw_tensor, train_transform
from fgvr.runtime.config import DataCache, DataConfig, DataFormat
from fgvr.runtime.distributed import cpus_per_process
from fgvr.runtime.errors import DataError
from fgvr.runtime.preemption import protect_worker

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Records + an albumentations transform -> (uint8 CHW image, label, box).

    The box is the record's ground-truth box carried through the transform, as fractions
    (x1, y1, x2, y2) of the output image; NaN when the data has none or the crop cut it away.

    Keys are (index, epoch) pairs from EpochSampler, or plain indices. Augmentation randomness
    is seeded from (seed, epoch, index), so a batch does not depend on the number of workers
    and a resumed epoch sees exactly the images an uninterrupted run would have seen.

    With `decoded` (data.cache=decoded) images come resized from the cache, and the transform
    must be the one that starts after the resize (`resized=True`). Otherwise, when the transform
    starts with a resize, each image is resized as it is decoded (the transform's resize then has
    nothing left to do), a JPEG from libjpeg's reduced-scale decode where that still covers the
    size: the same images up to resampling noise and the same boxes, for fewer pixels decoded.
    `reduced=False` decodes in full and leaves the resize to the transform."""

    def __init__(self, records: Records, transform, seed: int = 0, skip_bad: bool = False,
                 decoded: DecodedImages | None = None, reduced: bool = True):
        self.records, self.transform, self.seed, self.skip_bad = records, transform, seed, skip_bad
        self.decoded = decoded
        first = transform.transforms[0] if transform.transforms else None
        resize = reduced and decoded is None and isinstance(first, A.Resize)
        self.size = (first.width, first.height) if resize else None  # the resize done at decode

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and its box in its pixels."""
        if self.decoded is not None:
            image, scale = self.decoded[index]
        elif self.size is not None:
            image, (w, h) = load_resized(self.records.paths[index], self.size)
            scale = np.array([self.size[0] / w, self.size[1] / h], np.float32)
        else:
            return load_image(self.records.paths[index]), self.records.boxes[index]
        return image, self.records.boxes[index] * np.tile(scale, 2)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            image, box = self._load(index)
        except DataError:
            if self.skip_bad:
                return None
            raise
        seed = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
        self.transform.set_random_seed(int(seed))
        h, w = image.shape[:2]
        box = np.clip(box, 0, (w, h, w, h))  # an annotation past the image's edge: the part inside it
        known = np.isfinite(box).all() and box[2] > box[0] and box[3] > box[1]  # else: no box (NaN)
        out = self.transform(image=image, bboxes=box[None] if known else np.zeros((0, 4), np.float32))
        image = out["image"]
        h, w = image.shape[:2]
        box = out["bboxes"][0] / (w, h, w, h) if len(out["bboxes"]) else np.full(4, np.nan)
        return to_chw_tensor(image), int(self.records.labels[index]), torch.as_tensor(box, dtype=torch.float32)


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, S, S) uint8
    labels: torch.Tensor  # (B,) int64
    boxes: torch.Tensor  # (B, 4) float32 ground-truth boxes as fractions of the image; NaN if unknown
    skipped: int  # samples dropped because they failed to load (data.skip_bad)


def collate(samples: list) -> Batch:
    """Stack a batch, dropping samples that failed to load (data.skip_bad) and counting them."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise DataError("a whole batch of images failed to load; check the data set files")
    images, labels, boxes = zip(*kept)
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.int64), torch.stack(boxes),
                 len(samples) - len(kept))


class DataWait:
    """Iterates `batches`, adding up in `seconds` the time spent waiting for each one: how long a
    training loop is starved by its data pipeline (host time; nothing is synchronised)."""

    def __init__(self, batches: Iterable):
        self.batches, self.seconds = batches, 0.0

    def __iter__(self) -> Iterator:
        batches = iter(self.batches)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.seconds += time.perf_counter() - start
            if batch is None:
                return
            yield batch


class EpochSampler(Sampler):
    """Yields (index, epoch) keys for this rank: a fresh permutation per epoch, seeded by
    (seed, epoch), dealt out to the ranks in turn (rank r takes positions r, r + W, ...).

    For training (`pad=True`) the order is padded by repeating its start to a multiple of the
    world size, as torch's DistributedSampler does, so every rank runs the same number of steps.
    Evaluation shards are not padded, so sums over ranks count every image once.
    `set_epoch(epoch, start)` begins the epoch after its first `start` samples (over all ranks):
    a run resumed mid-epoch sees exactly the batches an uninterrupted run would have seen."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = False):
        self.n, self.shuffle, self.seed, self.rank, self.world_size, self.pad = n, shuffle, seed, rank, world_size, pad
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _total(self) -> int:
        return -(-self.n // self.world_size) * self.world_size if self.pad else self.n

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self._total(), self.world_size))

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.n)
        order = order[torch.arange(self._total()) % self.n]  # padded by repeating its start
        return ((i, self.epoch) for i in order[self.start + self.rank::self.world_size].tolist())


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): `fraction` of every class (at least one when fraction > 0) goes to val."""
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        val.append(rng.choice(idx, k, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.arange(0)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def check_files(records: Records, split: str, skip_bad: bool) -> Records:
    """Fail fast on missing files (or drop them with data.skip_bad=true)."""
    exists = np.fromiter((os.path.isfile(p) for p in records.paths), bool, len(records))
    if exists.all():
        return records
    missing = records.paths[~exists]
    if not skip_bad:
        raise DataError(f"{missing[0]}: image file not found ({len(missing)} of {len(records)} {split} images "
                        "missing); check data.root, or set data.skip_bad=true to skip them")
    log.warning("skipping %d missing %s images (data.skip_bad=true), e.g. %s", len(missing), split, missing[0])
    return records.subset(np.flatnonzero(exists))


@dataclass
class Loaders:
    """A run's loaders; `with` (or close()) ends their worker processes when the run ends, failed or not."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    classes: list[str]
    missing: dict[str, int]  # image files of each split not found, left out with data.skip_bad=true

    def close(self) -> None:
        """Stop the persistent workers now. Left to interpreter exit, multiprocessing would SIGTERM
        them and wait out the grace period protect_worker gives a SIGTERM (and print a traceback)."""
        for loader in (self.train, self.val, self.test):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None:
                iterator._shutdown_workers()
                loader._iterator = None

    def __enter__(self) -> Loaders:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def require_boxes(model, loaders: Loaders, name: str) -> None:
    """One line, before any work, when the model reads ground-truth boxes (selector=oracle) that
    the data does not have for every image."""
    selector = getattr(model, "selector", None)
    if selector is None or not selector.needs_boxes:
        return
    for split, loader in (("train", loaders.train), ("val", loaders.val), ("test", loaders.test)):
        if loader is None:
            continue
        boxes = loader.dataset.records.boxes
        missing = int((~np.isfinite(boxes).all(-1)).sum())
        if missing:
            raise DataError(f"selector={selector.name} crops the ground-truth box, but {missing} of {len(boxes)} "
                            f"{split} images of data={name} have none; use it on data with bounding boxes "
                            "(synth, synth_parts, cub, nabirds, cars, aircraft, dogs, or a csv with box columns)")


def init_worker(worker_id: int, yield_cores: bool) -> None:
    """A loader worker's start: SLURM's signals handled (protect_worker) and, with `yield_cores`,
    the lowest CPU priority (nice 19). A model on the CPU computes on every core; a worker the
    scheduler puts beside its threads stalls them all (each parallel op waits for the thread the
    worker displaced), costing the loop up to twice the worker's own time. At nice 19 workers run
    on what the compute threads leave, and at full speed whenever the loop waits for a batch."""
    protect_worker(worker_id)
    if yield_cores:
        os.nice(19)


def build_loaders(cfg: DataConfig, cache_dir: str, seed: int, pin_memory: bool, scale: float = 1.0,
                  rank: int = 0, world_size: int = 1, yield_cores: bool = False) -> Loaders:
    """Train / val / test loaders of one rank; `scale` > 1 delivers images that much larger than
    data.img_size (the same view at a higher resolution, for selector.crop_source=original).
    With data.cache=decoded the images come from a decoded cache of each official split (built
    on first use). `yield_cores`: the workers run at the lowest priority (see `init_worker`), for a
    model on the CPU."""
    splits = read_splits(cfg, cache_dir)
    if cfg.check_counts:
        quick_check(DataFormat(cfg.format).value, cfg.root, splits, cfg.level, decode=not cfg.skip_bad)
    train_idx, val_idx = stratified_split(splits.train.labels, cfg.val_fraction, seed)
    parts = {"train": splits.train.subset(train_idx), "val": splits.train.subset(val_idx), "test": splits.test}
    found = {k: check_files(r, k, cfg.skip_bad) for k, r in parts.items()}
    missing = {k: len(parts[k]) - len(found[k]) for k in parts}
    parts = found
    workers = cfg.num_workers if cfg.num_workers is not None else min(8, cpus_per_process())
    eval_bs = cfg.eval_batch_size or 2 * cfg.batch_size
    size = round(cfg.img_size * scale)
    decoded = None
    if DataCache(cfg.cache) is DataCache.decoded:
        side = round(size * cfg.resize_ratio)  # the transforms' first resize
        decoded = {split: decoded_cache(getattr(splits, split), side, cache_dir, split, workers, cfg.skip_bad)
                   for split in ("train", "test")}
    common = dict(num_workers=workers, pin_memory=pin_memory, collate_fn=collate,
                  worker_init_fn=functools.partial(init_worker, yield_cores=yield_cores),
                  persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)

    def loader(name: str, train: bool) -> DataLoader | None:
        records = parts[name]
        if len(records) == 0:
            return None
        resized = decoded is not None
        tf = train_transform(size, cfg.resize_ratio, cfg.augment, resized) if train else \
            eval_transform(size, cfg.resize_ratio, resized)
        source = decoded["test" if name == "test" else "train"].select(records.paths) if resized else None
        ds = ImageDataset(records, tf, seed=seed, skip_bad=cfg.skip_bad, decoded=source)
        sampler = EpochSampler(len(records), shuffle=train, seed=seed, rank=rank, world_size=world_size, pad=train)
        # Its own generator: worker seeds never draw from (and shift) the global torch RNG,
        # so a resumed run continues with the same random stream as an uninterrupted one.
        return DataLoader(ds, batch_size=cfg.batch_size if train else eval_bs, sampler=sampler,
                          drop_last=train and len(sampler) > cfg.batch_size,
                          generator=torch.Generator().manual_seed(seed), **common)

    train = loader("train", True)
    if train is None:
        raise DataError(f"data.root={cfg.root}: the train split is empty")
    test = loader("test", False)
    if test is None:
        raise DataError(f"data.root={cfg.root}: the test split is empty")
    return Loaders(train, loader("val", False), test, splits.classes, missing)
