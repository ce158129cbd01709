"""Readers: one function per data set format, each returning the official splits as records.

A reader only parses annotation files; it never opens images. Labels are 0-based and
contiguous; boxes are (x1, y1, x2, y2) in the original image's pixel coordinates (the left edge
of the first pixel is 0; the 1-based inclusive boxes of the MATLAB-era files are converted),
NaN where unknown. `read_splits` picks the reader of what data.format names: a benchmark's own
(fgvr/data/catalog.py), a layout of your own (folder, csv), or the CUB one for a generated set.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fgvr.data.catalog import BENCHMARKS
from fgvr.runtime.config import DataFormat
from fgvr.runtime.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Records:
    """A split as parallel arrays (cheap to share with loader workers, unlike lists of objects)."""

    paths: np.ndarray  # (N,) str, absolute
    labels: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) float32, x1 y1 x2 y2, NaN if unknown

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Records":
        return Records(self.paths[index], self.labels[index], self.boxes[index])


@dataclass
class Splits:
    train: Records
    test: Records
    classes: list[str]
    # Where the data set has a taxonomy: each class's ancestors, nearest first
    # (NABirds' hierarchy.txt, Aircraft's variant -> family -> manufacturer, iNat's supercategory).
    hierarchy: dict[str, list[str]] = field(default_factory=dict)


def make_records(paths: list[str], labels: list[int], boxes: list | None = None) -> Records:
    n = len(paths)
    box_arr = np.full((n, 4), np.nan, np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(n, 4)
    return Records(np.asarray(paths, dtype=str), np.asarray(labels, np.int64), box_arr)


def read_text(path: Path, hint: str) -> str:
    """An annotation file's text (UTF-8, a byte-order mark dropped), with one-line errors that name the file
    when it is missing, unreadable or not UTF-8."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; {hint}")
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e}); {hint}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {data[e.start]:#04x} at column "
                        f"{e.start - start + 1}); re-extract the file or convert it to UTF-8") from None


def malformed(path: Path, lineno: int, expected: str, line: str) -> DataError:
    """The one-line error for a line of an annotation file that is not what its format says."""
    shown = line.strip() if len(line.strip()) <= 80 else line.strip()[:77] + "..."
    return DataError(f"{path}, line {lineno}: expected {expected}, got {shown!r}")


def _flag(s: str) -> bool:
    if s not in ("0", "1"):
        raise ValueError(s)
    return s == "1"


_KINDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), _flag: ("0 or 1", "each 0 or 1")}


def _table(path: Path, hint: str, /, **fields: Callable) -> list[list]:
    """The rows of a whitespace-separated annotation file, blank and '#' lines skipped: the named fields of
    each line, converted (str, int, float or _flag). A last str field takes the rest of the line (a name
    with spaces); otherwise fields past the named ones are ignored."""
    kinds = list(fields.values())
    rest = kinds[-1] is str
    typed = []  # e.g. "class_id an integer", "x, y numbers"
    for kind, (one, many) in _KINDS.items():
        names = [name for name, k in fields.items() if k is kind]
        if names:
            typed.append(f"{', '.join(names)} {one if len(names) == 1 else many}")
    expected = "'" + " ".join(f"<{name}>" for name in fields) + "'" + (f" ({'; '.join(typed)})" if typed else "")
    rows = []
    for lineno, line in enumerate(read_text(path, hint).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        values = line.split(maxsplit=len(kinds) - 1) if rest else line.split()
        try:
            if len(values) < len(kinds):
                raise ValueError(line)
            rows.append([kind(v) for kind, v in zip(kinds, values)])
        except ValueError:
            raise malformed(path, lineno, expected, line) from None
    return rows


def _vision_box(x1, y1, x2, y2) -> tuple[np.ndarray, ...]:
    """1-based inclusive pixel boxes (Cars, Aircraft, PASCAL-VOC XML; numbers, numeric strings or
    arrays of them) as pixel coordinates."""
    x1, y1, x2, y2 = (np.asarray(v, dtype=float) for v in (x1, y1, x2, y2))
    return x1 - 1, y1 - 1, x2, y2


def read_cub(root: str | Path) -> Splits:
    """CUB-200-2011 layout (NABirds uses it too): images.txt, image_class_labels.txt,
    train_test_split.txt, classes.txt, bounding_boxes.txt (optional) and images/.
    NABirds' hierarchy.txt (`child_id parent_id`), where present, gives each class's ancestors."""
    root = Path(root)
    hint = f"data.root={root} must be a CUB-200-2011 folder (the one holding images.txt and images/)"
    if not root.is_dir():
        raise DataError(f"data.root={root}: no such folder; point it at the extracted CUB_200_2011 folder")
    images = dict(_table(root / "images.txt", hint, image_id=str, path=str))
    labels = dict(_table(root / "image_class_labels.txt", hint, image_id=str, class_id=int))
    is_train = dict(_table(root / "train_test_split.txt", hint, image_id=str, is_training_image=_flag))
    names = dict(_table(root / "classes.txt", hint, class_id=int, name=str))
    # Only the classes images use (NABirds' classes.txt also lists the inner nodes of its
    # hierarchy, and its ids are sparse): contiguous labels in the order of the class ids.
    class_ids = sorted(set(labels.values()) & names.keys())
    to_index = {c: k for k, c in enumerate(class_ids)}
    boxes = {}
    if (root / "bounding_boxes.txt").is_file():
        for i, x, y, w, h in _table(root / "bounding_boxes.txt", hint, image_id=str, x=float, y=float, width=float,
                                    height=float):
            boxes[i] = (x, y, x + w, y + h)
    nan_box = (np.nan,) * 4
    split: dict[bool, tuple[list, list, list]] = {True: ([], [], []), False: ([], [], [])}
    for i, rel in images.items():
        if i not in labels or i not in is_train:
            raise DataError(f"{root}: image id {i} ({rel}) has no label or no split entry")
        if labels[i] not in to_index:
            raise DataError(f"{root / 'image_class_labels.txt'}: class {labels[i]} of image {i} not in classes.txt")
        paths, targets, part_boxes = split[is_train[i]]
        paths.append(str(root / "images" / rel))
        targets.append(to_index[labels[i]])
        part_boxes.append(boxes.get(i, nan_box))
    hierarchy = {}
    if (root / "hierarchy.txt").is_file():
        parent = dict(_table(root / "hierarchy.txt", hint, child_id=int, parent_id=int))
        for c in class_ids:
            chain, node = [], parent.get(c)
            while node in names and names[node] not in chain:  # up to the root (a cycle would end it too)
                chain.append(names[node])
                node = parent.get(node)
            hierarchy[names[c]] = chain
    return Splits(make_records(*split[True]), make_records(*split[False]), [names[c] for c in class_ids], hierarchy)


def read_folder(root: str | Path) -> Splits:
    """root/train/<class>/<image> and root/test/<class>/<image>; classes from train, sorted."""
    root = Path(root)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(f"data.root={root}: missing {part}/ folder; expected {root}/{part}/<class>/<image>")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'}: no class folders")
    index = {c: k for k, c in enumerate(classes)}

    def scan(part: str) -> Records:
        paths, labels = [], []
        for d in sorted((root / part).iterdir()):
            if not d.is_dir():
                continue
            if d.name not in index:
                raise DataError(f"{d}: class folder not present under {root / 'train'}")
            files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += [str(f) for f in files]
            labels += [index[d.name]] * len(files)
        return make_records(paths, labels)

    return Splits(scan("train"), scan("test"), classes)


def read_csv(root: str | Path, train_csv: str = "train.csv", test_csv: str = "test.csv") -> Splits:
    """CSV lists with a header: `path,label` and optionally `x,y,w,h` (box) columns.

    Labels may be class names or integers; either way the sorted distinct values become 0..K-1."""
    root = Path(root)
    tables = {}
    for part, name in (("train", train_csv), ("test", test_csv)):
        path = root / name
        text = read_text(path, f"set data.root or data.{part}_csv")
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            lines = [(reader.line_num, fields) for fields in reader if fields]
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e}); fix or re-export the file") from None
        header = lines[0][1] if lines else []
        missing = {"path", "label"} - set(header)
        if missing:
            raise DataError(f"{path}: needs a header with columns path,label (missing {', '.join(sorted(missing))})")
        rows = []
        for lineno, fields in lines[1:]:
            row = dict(zip(header, fields))
            if len(fields) != len(header) or not row["path"].strip() or not row["label"].strip():
                raise malformed(path, lineno, f"{len(header)} comma-separated values ({','.join(header)}) with a path "
                                "and a label", ",".join(fields))
            rows.append((lineno, row))
        tables[part] = (path, rows)
    raw = [r["label"] for _, rows in tables.values() for _, r in rows]
    numeric = all(s.strip().lstrip("-").isdigit() for s in raw)
    classes = [str(c) for c in sorted({int(s) for s in raw})] if numeric else sorted(set(raw))
    index = {c: k for k, c in enumerate(classes)}

    def records(path: Path, rows: list[tuple[int, dict]]) -> Records:
        has_box = bool(rows) and {"x", "y", "w", "h"} <= set(rows[0][1])
        paths, labels, boxes = [], [], []
        for lineno, r in rows:
            label = str(int(r["label"])) if numeric else r["label"]
            paths.append(str(root / r["path"]))
            labels.append(index[label])
            try:
                x, y, w, h = (float(r[k]) for k in "xywh") if has_box else (np.nan,) * 4
            except ValueError:
                raise malformed(path, lineno, "numbers in the box columns x,y,w,h", ",".join(r.values())) from None
            boxes.append((x, y, x + w, y + h))
        return make_records(paths, labels, boxes)

    return Splits(records(*tables["train"]), records(*tables["test"]), classes)


def _loadmat(path: Path, keys: tuple[str, ...], hint: str, **options) -> dict:
    """The named variables of a MATLAB file, with a one-line error if it or one of them is missing."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise DataError(f"{path}: file not found; {hint}")
    try:
        mat = loadmat(str(path), **options)
    except (MatReadError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .mat file ({e}); re-extract it") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DataError(f"{path}: no variable {missing[0]!r}; {hint}")
    return mat


def _xml_box(path: Path) -> tuple[float, ...]:
    """The union of a PASCAL-VOC annotation's object boxes (NaN if there is no file)."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return (np.nan,) * 4
    try:
        boxes = [[b.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
                 for b in ET.parse(path).getroot().iter("bndbox")]
    except ET.ParseError as e:
        raise DataError(f"{path}, line {e.position[0]}: not valid XML ({e}); re-extract it") from None
    if not boxes:
        return (np.nan,) * 4
    try:
        b = np.array(boxes, dtype=float)
    except (TypeError, ValueError):
        raise DataError(f"{path}: expected numbers in each bndbox's xmin, ymin, xmax, ymax; re-extract it") from None
    return _vision_box(*b[:, :2].min(0), *b[:, 2:].max(0))


def read_dogs(root: str | Path) -> Splits:
    """Stanford Dogs: train_list.mat / test_list.mat (file_list, 1-based labels), Images/<breed>/
    and, for the boxes, Annotation/<breed>/<image id> (PASCAL-VOC XML)."""
    root = Path(root)
    hint = f"data.root={root} must hold train_list.mat, test_list.mat (lists.tar) and Images/"
    parts, names = {}, {}
    for part in ("train", "test"):
        mat = _loadmat(root / f"{part}_list.mat", ("file_list", "labels"), hint)
        files = [str(f[0][0]) for f in mat["file_list"]]
        labels = [int(v) - 1 for v in mat["labels"].ravel()]
        names |= {label: f.split("/", 1)[0] for f, label in zip(files, labels)}  # n02085620-Chihuahua
        boxes = [_xml_box(root / "Annotation" / f.removesuffix(".jpg")) for f in files]
        parts[part] = make_records([str(root / "Images" / f) for f in files], labels, boxes)
    return Splits(parts["train"], parts["test"], [names[k] for k in sorted(names)])


def read_flowers(root: str | Path) -> Splits:
    """Oxford Flowers 102: imagelabels.mat (1-based labels), setid.mat (trnid, valid, tstid) and
    jpg/image_NNNNN.jpg. Train is the official train + val, as the FGVC papers use it."""
    root = Path(root)
    hint = f"data.root={root} must hold imagelabels.mat, setid.mat and jpg/"
    labels = _loadmat(root / "imagelabels.mat", ("labels",), hint)["labels"].ravel().astype(np.int64) - 1
    setid = _loadmat(root / "setid.mat", ("trnid", "valid", "tstid"), hint)

    def records(ids: np.ndarray) -> Records:
        ids = np.sort(ids.ravel().astype(np.int64))
        return make_records([str(root / "jpg" / f"image_{i:05d}.jpg") for i in ids], labels[ids - 1].tolist())

    classes = [f"{k + 1:03d}" for k in range(int(labels.max()) + 1)]
    return Splits(records(np.concatenate([setid["trnid"].ravel(), setid["valid"].ravel()])),
                  records(setid["tstid"]), classes)


def read_pets(root: str | Path) -> Splits:
    """Oxford-IIIT Pets: annotations/trainval.txt and test.txt (`image class species breed`,
    1-based class ids, '#' comments) and images/<image>.jpg; class names from the image names."""
    root = Path(root)
    hint = f"data.root={root} must hold annotations/ and images/ (both archives extracted)"
    names: dict[int, str] = {}
    parts = {}
    for part in ("trainval", "test"):
        paths, labels = [], []
        rows = _table(root / "annotations" / f"{part}.txt", hint, image=str, class_id=int, species=int, breed_id=int)
        for name, class_id, *_ in rows:
            label = class_id - 1
            names[label] = name.rsplit("_", 1)[0]
            paths.append(str(root / "images" / f"{name}.jpg"))
            labels.append(label)
        parts[part] = make_records(paths, labels)
    return Splits(parts["trainval"], parts["test"], [names[k] for k in sorted(names)])


def read_cars(root: str | Path) -> Splits:
    """Stanford Cars: cars_annos.mat (`annotations`: relative_im_path, bbox_x1..bbox_y2, 1-based
    class, test flag; `class_names`) beside car_ims/."""
    root = Path(root)
    hint = f"data.root={root} must hold cars_annos.mat and car_ims/ (car_ims.tgz extracted)"
    mat = _loadmat(root / "cars_annos.mat", ("annotations", "class_names"), hint, squeeze_me=True)
    ann, classes = mat["annotations"], [str(c) for c in mat["class_names"]]
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    missing = [f for f in fields if f not in (ann.dtype.names or ())]
    if missing:
        raise DataError(f"{root / 'cars_annos.mat'}: annotations have no field {missing[0]!r}; {hint}")
    labels = ann["class"].astype(np.int64) - 1
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"{root / 'cars_annos.mat'}: class ids outside 1..{len(classes)}")
    boxes = np.stack(_vision_box(*(ann[f].astype(float) for f in fields[1:5])), axis=1)
    paths = np.array([str(root / p) for p in ann["relative_im_path"]])
    is_test = ann["test"].astype(bool)
    parts = [make_records(paths[m].tolist(), labels[m].tolist(), boxes[m]) for m in (~is_test, is_test)]
    return Splits(*parts, classes)


AIRCRAFT_LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


def read_aircraft(root: str | Path, level: str = "variant") -> Splits:
    """FGVC-Aircraft 2013b: data/images_<level>_{trainval,test}.txt (`image_id name`), the class
    list data/<variants|families|manufacturers>.txt, data/images_box.txt (1-based `id x1 y1 x2 y2`)
    and data/images/. Train is the official trainval, as the FGVC papers use it; `level` picks
    the labels (variant: 100 classes, family, manufacturer) and the coarser levels become the
    hierarchy. The images keep their 20-pixel copyright banner at the bottom."""
    if level not in AIRCRAFT_LEVELS:
        raise ConfigError(f"data.level={level}: choose one of {', '.join(AIRCRAFT_LEVELS)}")
    root = Path(root)
    data = root / "data"
    hint = f"data.root={root} must be the fgvc-aircraft-2013b folder (the one holding data/images/)"
    names_file = data / AIRCRAFT_LEVELS[level]
    classes = [line.strip() for line in read_text(names_file, hint).splitlines() if line.strip()]
    index = {c: k for k, c in enumerate(classes)}
    boxes = {}
    if (data / "images_box.txt").is_file():
        boxes = {i: _vision_box(*xyxy) for i, *xyxy in _table(data / "images_box.txt", hint, image_id=str, x1=float,
                                                              y1=float, x2=float, y2=float)}
    coarser = [lv for lv in list(AIRCRAFT_LEVELS)[list(AIRCRAFT_LEVELS).index(level) + 1:]
               if (data / f"images_{lv}_trainval.txt").is_file()]
    hierarchy: dict[str, list[str]] = {}
    parts = {}
    for part in ("trainval", "test"):
        labels = dict(_table(data / f"images_{level}_{part}.txt", hint, image_id=str, name=str))
        unknown = next((n for n in labels.values() if n not in index), None)
        if unknown is not None:
            raise DataError(f"{data / f'images_{level}_{part}.txt'}: {unknown!r} is not in {names_file}")
        ancestors = [dict(_table(data / f"images_{lv}_{part}.txt", hint, image_id=str, name=str)) for lv in coarser]
        for i, name in labels.items():
            hierarchy.setdefault(name, [a.get(i, "") for a in ancestors])
        parts[part] = make_records([str(data / "images" / f"{i}.jpg") for i in labels],
                                   [index[n] for n in labels.values()],
                                   [boxes.get(i, (np.nan,) * 4) for i in labels])
    return Splits(parts["trainval"], parts["test"], classes, hierarchy if coarser else {})


def _json(path: Path, hint: str):
    import json

    text = read_text(path, hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}); re-extract it") \
            from None


def read_inat(root: str | Path) -> Splits:
    """iNaturalist 2017: train2017.json and val2017.json (COCO style: images with file_name
    relative to root, annotations with image_id and category_id, categories with name and
    supercategory) beside train_val_images/. The test split is the official val: the test
    labels were never released."""
    root = Path(root)
    hint = f"data.root={root} must hold train2017.json, val2017.json (train_val2017.zip) and train_val_images/"
    parts, categories = {}, {}
    for part in ("train", "val"):
        path = root / f"{part}2017.json"
        doc = _json(path, hint)
        try:
            label = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
            files = [(im["file_name"], label[im["id"]]) for im in doc["images"]]
            categories |= {c["id"]: (c["name"], c.get("supercategory")) for c in doc["categories"]}
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: not an iNat2017 annotation file (missing {e}); {hint}") from None
        parts[part] = files
    ids = sorted(categories)
    index = {c: k for k, c in enumerate(ids)}
    unknown = next(((part, c) for part, files in parts.items() for _, c in files if c not in index), None)
    if unknown is not None:
        raise DataError(f"{root / f'{unknown[0]}2017.json'}: category_id {unknown[1]!r} is not among the categories; "
                        "re-extract it")

    def records(files: list[tuple[str, int]]) -> Records:
        return make_records([str(root / f) for f, _ in files], [index[c] for _, c in files])

    classes = [categories[c][0] for c in ids]
    hierarchy = {name: [sup] for name, sup in categories.values() if sup}
    return Splits(records(parts["train"]), records(parts["val"]), classes, hierarchy)


READERS: dict[str, Callable[..., Splits]] = {
    "cub": read_cub, "cars": read_cars, "aircraft": read_aircraft, "dogs": read_dogs, "flowers": read_flowers,
    "pets": read_pets, "inat": read_inat, "folder": read_folder, "csv": read_csv}


def reader(fmt: DataFormat) -> Callable[..., Splits]:
    """The reader of what data.format names: a benchmark's own, a layout's of your own, CUB's for synth."""
    bench = BENCHMARKS.get(fmt.value)
    return READERS[(bench.reader or bench.name) if bench else "cub" if fmt is DataFormat.synth else fmt.value]


def read_splits(cfg, cache_dir: str) -> Splits:
    """The official splits of the data set a data config names (a generated one is made on first use)."""
    fmt, root = DataFormat(cfg.format), cfg.root
    if fmt is DataFormat.synth and root is None:
        from fgvr.data.synth import generate, synth_root

        if cfg.synth is None:
            raise ConfigError("data.synth is null, and data.format=synth generates the set from it; "
                              "use data=synth or data=synth_parts")
        root = synth_root(cache_dir, cfg.synth)
        if not (root / "images.txt").is_file():
            log.info("generating the synthetic data set in %s (once)", root)
        generate(root, cfg.synth)
    if root is None:
        raise ConfigError(f"data.root is not set; pass data.root=/path/to/{cfg.name}")
    if cfg.level is not None and fmt is not DataFormat.aircraft:
        raise ConfigError(f"data.level={cfg.level}: only data=aircraft has label levels; drop the override")
    options = dict(train_csv=cfg.train_csv, test_csv=cfg.test_csv) if fmt is DataFormat.csv else {}
    if cfg.level is not None:
        options["level"] = cfg.level
    return reader(fmt)(root, **options)
