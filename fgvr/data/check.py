"""`fgvr data check`: is a data set complete and readable? And the cheap part `fgvr train` runs.

The cheap part (`quick_check`) parses the annotation files, compares the split sizes with the
official totals and decodes a few images: a wrong or half-extracted data.root fails in seconds.
The full check (`check`) opens every image: missing, unreadable and truncated files are
problems; grayscale, CMYK, RGBA, palette or 16-bit images, and files whose contents are not
the format their name says, are reported as notes (the loader converts every mode to RGB).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from fgvr.data.catalog import BENCHMARKS, Benchmark
from fgvr.data.image import load_image
from fgvr.data.readers import Splits
from fgvr.runtime.errors import DataError

SUFFIX_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF",
                  ".tiff": "TIFF"}


def count_problems(bench: Benchmark, splits: Splits, level: str | None = None, totals: bool = True) -> list[str]:
    """How the splits differ from the data set's official totals ([] if they match); without `totals`, only
    the classes that lack a train or test image."""
    found = (len(splits.train), len(splits.test), len(splits.classes))
    official = (bench.train, bench.test, bench.num_classes(level))
    problems = []
    if totals and found != official:
        problems.append("{} train / {} test images in {} classes".format(*found)
                        + ", not {}'s {} / {} in {}".format(bench.title, *official))
    for split in ("train", "test"):
        present = np.bincount(getattr(splits, split).labels, minlength=len(splits.classes)) > 0
        if not present.all():
            absent = np.flatnonzero(~present)
            problems.append(f"{len(absent)} classes without a {split} image (e.g. {splits.classes[absent[0]]!r})")
    return problems


def quick_check(fmt: str, root: str, splits: Splits, level: str | None = None, decode: bool = True,
                sample: int = 8) -> None:
    """What `fgvr train` checks before it starts: the official totals (where data.format `fmt` is a
    benchmark) and, with `decode`, that a few train images spread over the split decode."""
    bench = BENCHMARKS.get(fmt)
    if bench is not None:
        problems = count_problems(bench, splits, level)
        if problems:
            raise DataError(f"data.root={root}: {'; '.join(problems)}; point data.root at the complete data set "
                            f"(fgvr data check {fmt} --root DIR says what is wrong) or set data.check_counts=false "
                            "to train on these")
    if not decode:
        return
    paths = splits.train.paths
    for path in paths[np.linspace(0, len(paths) - 1, min(sample, len(paths))).astype(int)]:
        if os.path.isfile(path):  # a missing file is check_files' to report, with data.skip_bad
            load_image(path)


@dataclass
class ImageInfo:
    problem: str  # "" when the file is fine, else missing, unreadable, truncated or undecodable
    mode: str  # PIL's mode: RGB, L, CMYK, RGBA, P, I;16, ...
    format: str  # the format of the contents: JPEG, PNG, ...
    width: int
    height: int


def inspect_image(path: str, decode: bool = True) -> ImageInfo:
    """The image's header (PIL, without decoding) and, with `decode`, whether it decodes in full."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            info = ImageInfo("", im.mode, im.format or "?", *im.size)
    except FileNotFoundError:
        return ImageInfo("missing", "", "", 0, 0)
    except Image.DecompressionBombError:  # PIL's guard against images too large to decode safely
        return ImageInfo("too large to decode safely", "", "", 0, 0)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return ImageInfo("unreadable", "", "", 0, 0)
    if decode:
        try:
            load_image(path)
        except DataError as e:
            info.problem = "truncated" if "truncated" in str(e) else "undecodable"
    return info


def scan_images(paths: list[str], decode: bool, workers: int | None = None, progress: bool = False) -> list[ImageInfo]:
    """inspect_image over many files, in worker processes."""
    from rich.console import Console
    from rich.progress import track

    workers = workers or os.cpu_count() or 1
    inspect = partial(inspect_image, decode=decode)
    parallel = workers > 1 and len(paths) > 64
    with ProcessPoolExecutor(workers) if parallel else nullcontext() as pool:
        chunk = max(1, min(256, len(paths) // (8 * workers)))
        results = pool.map(inspect, paths, chunksize=chunk) if parallel else map(inspect, paths)
        if progress and sys.stderr.isatty():
            results = track(results, total=len(paths), description="reading images", transient=True,
                            console=Console(stderr=True))
        return list(results)


@dataclass
class Report:
    name: str
    root: str
    counts: dict[str, int]  # images per split
    classes: int
    problems: list[str] = field(default_factory=list)  # each makes the data set unusable as it is
    notes: list[str] = field(default_factory=list)  # worth knowing, handled by the loader
    decoded: int = 0  # images opened and decoded in full

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{self.name} at {self.root}: {self.classes} classes, "
                 + ", ".join(f"{n} {split}" for split, n in self.counts.items()) + " images",
                 f"  decoded {self.decoded} of {sum(self.counts.values())} images"]
        lines += [f"  problem: {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        lines.append("ok" if self.ok else f"{len(self.problems)} problem{'s' * (len(self.problems) > 1)} found")
        return "\n".join(lines)


def check(name: str, fmt: str, root: str, splits: Splits, level: str | None = None, workers: int | None = None,
          progress: bool = False, counts: bool = True) -> Report:
    """Counts against the official totals of data.format `fmt` (unless not `counts`: a subset), then every
    image opened and decoded; `name` is data.name, the report's."""
    report = Report(name, root, {"train": len(splits.train), "test": len(splits.test)}, len(splits.classes))
    bench = BENCHMARKS.get(fmt)
    if bench is None:
        report.notes.append(f"{name} has no official totals to compare with")
    elif not counts:
        report.problems += count_problems(bench, splits, level, totals=False)
        report.notes.append(f"counts not compared with {bench.title}'s official totals (check_counts=false)")
    else:
        report.problems += count_problems(bench, splits, level)
    paths = np.concatenate([splits.train.paths, splits.test.paths]).tolist()
    infos = scan_images(paths, decode=True, workers=workers, progress=progress)
    bad: dict[str, list[str]] = {}  # problem -> paths
    modes: dict[str, list[str]] = {}  # mode -> paths
    misnamed: list[str] = []
    for path, info in zip(paths, infos):
        if info.problem:
            bad.setdefault(info.problem, []).append(path)
            continue
        report.decoded += 1
        modes.setdefault(info.mode, []).append(path)
        expected = SUFFIX_FORMATS.get(Path(path).suffix.lower())
        if expected and info.format != expected:
            misnamed.append(f"{path} ({info.format})")
    report.problems += [f"{len(p)} {kind} image{'s' * (len(p) > 1)}, e.g. {p[0]}" for kind, p in bad.items()]
    duplicates = len(paths) - len(set(paths))
    if duplicates:
        report.problems.append(f"{duplicates} images listed more than once")
    report.notes += [f"{len(p)} {mode} images (converted to RGB when loaded), e.g. {p[0]}"
                     for mode, p in modes.items() if mode != "RGB"]
    if misnamed:
        report.notes.append(f"{len(misnamed)} images whose contents are not what their name says, e.g. {misnamed[0]}")
    return report
