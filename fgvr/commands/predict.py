"""`fgvr predict ckpt=<run dir or .pt> input=<image | folder | CSV>`: the top-k classes of new images
and the region the model used, one row per image, into predictions.csv (or out=, format=jsonl).

input: an image file; a folder, searched recursively for .jpg .jpeg .png .bmp .webp .tif .tiff (any
case), in sorted order; or a CSV whose `path` column names the images (relative paths relative to
the CSV's folder). Each image is prepared as the run's test loader prepares it (square resize to
data.resize_ratio x the input size, centre crop) and batched through the model (its EMA weights
if it had them) on the best device, with the run's eval.tta unless tta= says otherwise.

The CSV has one row per image, in input order (`pandas.read_csv(path)`):
  path                       the image as the input named it: <input>/<file> for a folder, the CSV's
                             own `path` value for a CSV
  class1, prob1, ... classK, probK
                             the top_k classes (the checkpoint's class names), most probable first, and
                             their softmax probabilities
  x1, y1, x2, y2             the region the model classified: the crop of a selector (GLSim and its
                             baselines) or of CAL, the box around the tokens TransFG, FFVT or IELT
                             selected; in the image's own pixels as decoded (EXIF orientation applied;
                             continuous coordinates, the image spans [0, w] x [0, h]). Empty for a
                             model without one (a plain backbone, the texture branch alone)
  error                      why the image could not be read (its other columns then empty); else empty
format=jsonl writes one JSON object per line instead (`pandas.read_json(path, lines=True)`):
  {"path": ..., "classes": [...], "probs": [...], "box": [x1, y1, x2, y2] or null, "error": null or "..."}

The file is written under a temporary name and renamed when complete; an existing file at out=
is replaced only if it is an earlier output of fgvr predict. Unreadable images are logged one line
each and counted: the command then ends with exit code 1 (after writing the file), else 0; a bad
input, out= or option ends with exit code 2 before any work."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fgvr.data.dataset import init_worker
from fgvr.data.image import load_resized
from fgvr.data.transforms import eval_transform, to_chw_tensor
from fgvr.engine.evaluate import forward_tta, load_config, load_model
from fgvr.engine.progress import EpochProgress
from fgvr.models.model import FGVRModel
from fgvr.runtime.config import PredictConfig, PredictFormat, Tta, check_values
from fgvr.runtime.device import autocast_dtype, resolve_device
from fgvr.runtime.distributed import cpus_per_process
from fgvr.runtime.errors import ConfigError, DataError, first_few, first_line
from fgvr.runtime.files import atomic_write

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
BOX = ("x1", "y1", "x2", "y2")
ROW_KEYS = ("path", "classes", "probs", "box", "error")  # of a JSON line


def predict(cfg: PredictConfig) -> Path:
    """Predict every image of cfg.input into cfg.out (default predictions.<format>); returns its path.
    Raises DataError after writing the file when some images could not be read."""
    check_values(cfg, PredictConfig)
    fmt = PredictFormat(cfg.format).value
    out = output_file(cfg.out, fmt)
    names, files = list_images(cfg.input)
    path, state, run_cfg = load_config(cfg.ckpt)
    classes = state["classes"]
    top_k = cfg.top_k or min(5, len(classes))
    if top_k > len(classes):
        raise ConfigError(f"top_k={cfg.top_k}: the checkpoint has {len(classes)} classes; pass top_k={len(classes)} "
                          "or less")
    device = resolve_device(cfg.device, "device")
    model = load_model(path, state, run_cfg, device)
    if model.selector is not None and model.selector.needs_boxes:
        raise ConfigError(f"ckpt={cfg.ckpt}: its selector={model.selector.name} crops each image's ground-truth box, "
                          "which new images do not have; predict with a run of another selector")
    tta = Tta(cfg.tta if cfg.tta is not None else run_cfg.eval.tta).value
    data = run_cfg.data
    workers = cfg.num_workers if cfg.num_workers is not None else data.num_workers
    if workers is None:  # as the run's loaders
        workers = min(8, cpus_per_process())
    images = ImageFiles(files, round(data.img_size * model.source_scale), data.resize_ratio)
    loader = DataLoader(images, batch_size=cfg.batch_size or data.eval_batch_size or 2 * data.batch_size,
                        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        worker_init_fn=functools.partial(init_worker, yield_cores=device.type == "cpu"))
    if out.exists():
        log.warning("replacing %s (an earlier fgvr predict output)", out)
    log.info("predicting %d images with %s (tta=%s, %s) -> %s", len(files), path, tta, device, out)
    rows = predictions(model, loader, names, classes, top_k, tta, autocast_dtype(run_cfg.trainer.precision, device))
    failed = write_rows(out, fmt, top_k, rows)
    if failed:
        raise DataError(f"{failed} of {len(files)} images failed (unreadable; each logged above, its reason in the "
                        f"error column); the predictions of the others are in {out}")
    log.info("%d images -> %s", len(files), out)
    return out


def output_file(out: str | None, fmt: str) -> Path:
    """Where the predictions go, checked before any work: a folder that exists and can be written,
    and nothing there already but an earlier output of fgvr predict."""
    path = Path(out).expanduser() if out else Path(f"predictions.{fmt}")
    shown = f"out={out}" if out else str(path)
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"{shown}: the folder {folder} does not exist; create it or give out= another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{shown}: cannot write into {folder} (permission denied); give out= another path")
    if path.is_dir():
        raise ConfigError(f"{shown}: that is a folder; give out= a file path, e.g. {path / f'predictions.{fmt}'}")
    if path.exists() and not is_prediction(path):
        raise ConfigError(f"{shown}: something else is there already (not an earlier output of fgvr predict); "
                          "give out= another path")
    return path


def is_prediction(path: Path) -> bool:
    """Whether a file is one fgvr predict wrote (CSV or JSON lines), by its first line."""
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    if first.startswith(",".join(header(1)[:3]) + ","):
        return True
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and set(ROW_KEYS) <= row.keys()


def list_images(spec: str) -> tuple[list[str], list[str]]:
    """(each image as the path column names it, the file to read) for an image, a folder or a CSV."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(folder_images(spec, path))
        if not files:
            raise ConfigError(f"input={spec}: no images in that folder or below it ({' '.join(IMAGE_SUFFIXES)})")
        return files, files
    if not path.is_file():
        raise ConfigError(f"input={spec}: no such file or folder")
    if path.suffix.lower() == ".csv":
        names = csv_paths(spec, path)
        return names, [str(path.parent / Path(name).expanduser()) for name in names]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [spec], [str(path)]
    raise ConfigError(f"input={spec}: not an image ({' '.join(IMAGE_SUFFIXES)}), a folder of them or a CSV with a "
                      "path column")


def folder_images(spec: str, path: Path) -> Iterator[str]:
    """The image files in a folder and below it; a folder that cannot be read is an error, not skipped."""
    def unreadable(e: OSError) -> None:
        raise ConfigError(f"input={spec}: cannot read {e.filename} ({e.strerror}); fix its permissions or "
                          "predict on another folder")

    for root, _, names in os.walk(path, onerror=unreadable):
        yield from (os.path.join(root, n) for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES
                    and os.path.isfile(os.path.join(root, n)))


def csv_paths(spec: str, path: Path) -> list[str]:
    """The `path` column of a CSV, as written."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            names = [row["path"] or "" for row in reader] if "path" in (reader.fieldnames or ()) else None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"input={spec}: cannot read it as a CSV ({first_line(e)})") from None
    if names is None:
        raise ConfigError(f"input={spec}: no path column (its header: {first_few(reader.fieldnames or ['none'])}); "
                          "name the column of image paths `path`")
    if not names:
        raise ConfigError(f"input={spec}: no rows under its header; list the images in its path column")
    return names


class Loaded(NamedTuple):
    image: torch.Tensor | None  # (3, size, size) uint8, as the run's test loader delivers it
    size: tuple[int, int]  # (w, h) of the image as decoded
    error: str | None  # why it could not be read


class ImageFiles(Dataset):
    """Image files -> Loaded, through the run's eval transform at `size` (the input size times the
    model's source scale), resized as they are decoded as the training loaders do (ImageDataset)."""

    def __init__(self, files: list[str], size: int, resize_ratio: float):
        self.files, self.size = files, size
        self.transform = eval_transform(size, resize_ratio)
        resize = self.transform.transforms[0]
        self.side = resize.width  # of the square resize before the centre crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Loaded:
        path = self.files[index]
        try:
            image, size = load_resized(path, (self.side, self.side))
        except DataError as e:  # the reason, without the file (the row names it) or the training advice
            return Loaded(None, (0, 0), str(e).removeprefix(f"{path}: ").split("; ")[0])
        image = self.transform(image=image, bboxes=np.zeros((0, 4), np.float32))["image"]
        return Loaded(to_chw_tensor(image), size, None)

    def image_boxes(self, boxes: torch.Tensor, sizes: torch.Tensor, input_size: int) -> torch.Tensor:
        """(n, 4) boxes in pixels of the network input (input_size square) -> the images' own pixels,
        `sizes` (n, 2) their (w, h): the inverse of the eval transform, a square resize to `side`
        and albumentations' CenterCrop of `size` at offset (side - size) // 2."""
        offset = (self.side - self.size) // 2
        return (boxes * (self.size / input_size) + offset) * (sizes / self.side).repeat(1, 2)


class Batch(NamedTuple):
    images: torch.Tensor  # (n, 3, size, size) uint8: the images of the batch that could be read
    sizes: torch.Tensor  # (n, 2) float32: their (w, h)
    errors: list[str | None]  # for every image of the batch, in order: None, or why it could not be read


def collate(samples: list[Loaded]) -> Batch:
    """Stack the images that could be read; carry the others' errors."""
    read = [s for s in samples if s.error is None]
    images = torch.stack([s.image for s in read]) if read else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    sizes = torch.tensor([s.size for s in read], dtype=torch.float32).reshape(-1, 2)
    return Batch(images, sizes, [s.error for s in samples])


@torch.no_grad()
def predictions(model: FGVRModel, loader: DataLoader, names: list[str], classes: list[str], top_k: int, tta: str,
                amp: torch.dtype | None) -> Iterator[dict]:
    """One row per image of the loader's ImageFiles (the keys of a JSON line), in input order; an
    unreadable image logged once."""
    device = next(model.parameters()).device
    channels_last = device.type == "cuda" and not model.backbone.is_transformer
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    names = iter(names)
    with EpochProgress("predict", len(loader)) as progress:
        for batch in loader:
            probs, index, boxes = [], [], None
            if len(batch.images):
                x = batch.images.to(device, non_blocking=True, memory_format=fmt)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits, extras = forward_tta(model, x, None, tta)
                top = logits.float().softmax(-1).topk(top_k, dim=-1)
                probs, index = top.values.cpu().tolist(), top.indices.cpu().tolist()
                region = extras.get("boxes")
                if region is not None:
                    sizes = batch.sizes.to(device, non_blocking=True)
                    boxes = loader.dataset.image_boxes(region.float(), sizes, model.input_size).cpu().tolist()
            read = iter(range(len(probs)))
            for error, name in zip(batch.errors, names):
                if error is not None:
                    log.warning("%s: %s", name, error)
                    yield {"path": name, "classes": [], "probs": [], "box": None, "error": error}
                    continue
                i = next(read)
                yield {"path": name, "classes": [classes[c] for c in index[i]],
                       "probs": [round(p, 6) for p in probs[i]],
                       "box": [round(v, 2) for v in boxes[i]] if boxes is not None else None, "error": None}
            progress.advance()


def header(top_k: int) -> list[str]:
    return ["path", *(f"{kind}{k}" for k in range(1, top_k + 1) for kind in ("class", "prob")), *BOX, "error"]


def write_rows(out: Path, fmt: str, top_k: int, rows: Iterable[dict]) -> int:
    """Write the rows as CSV or JSON lines, atomically; returns how many carry an error."""
    failed = 0

    def write(f: BinaryIO) -> None:
        nonlocal failed
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        table = csv.writer(text) if fmt == "csv" else None
        if table is not None:
            table.writerow(header(top_k))
        for row in rows:
            failed += row["error"] is not None
            if table is None:
                text.write(json.dumps(row) + "\n")
                continue
            ranked = [v for pair in zip(row["classes"], row["probs"]) for v in pair] or [""] * (2 * top_k)
            table.writerow([row["path"], *ranked, *(row["box"] or [""] * 4), row["error"] or ""])
        text.flush()
        text.detach()  # the file stays open for atomic_write to sync and rename

    atomic_write(out, write)
    return failed
