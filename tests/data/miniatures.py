"""Miniatures of the benchmarks in their official layouts, with the quirks of the real files:
.mat files written with scipy, 1-based ids and pixel boxes, NABirds' UUIDs and sparse class ids,
Aircraft's names with spaces and slashes, grayscale images. Each class has its own colour, so a
model can learn them.

Every writer returns the root and what a reader must find there (`Expected`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.conftest import write_cub

W, H = 48, 40  # every image's size


@dataclass
class Expected:
    classes: list[str]
    train: int
    test: int
    boxes: bool
    hierarchy: dict[str, list[str]] = field(default_factory=dict)


def write_image(path: Path, label: int, mode: str = "RGB", fmt: str = "JPEG") -> None:
    from PIL import Image

    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
    pixels[8:32, 8:40, label % 3] = 230 - 40 * (label // 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt, quality=90)


def _cells(strings: list[str]) -> np.ndarray:
    """A MATLAB cell array of strings, as scipy writes and reads it."""
    cells = np.empty((len(strings), 1), dtype=object)
    for k, s in enumerate(strings):
        cells[k, 0] = np.array([s])
    return cells


def cub(root: Path) -> tuple[Path, Expected]:
    write_cub(root)
    return root, Expected([f"{c:03d}.Bird_{c}" for c in (1, 2, 3)], 12, 6, boxes=True)


NABIRDS_CLASSES = {295: "Forster's Tern", 313: "Common Tern", 817: "Wood Duck (Male)"}
NABIRDS_TREE = {295: 50, 313: 50, 817: 60, 50: 1, 60: 1, 1: 0}  # child -> parent
NABIRDS_INNER = {0: "Birds", 1: "Perching and other birds", 50: "Terns", 60: "Ducks"}


def nabirds(root: Path) -> tuple[Path, Expected]:
    """UUID image ids, class folders named by the 4-digit sparse id, inner nodes in classes.txt."""
    lines: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "boxes")}
    for k, cid in enumerate(sorted(NABIRDS_CLASSES)):
        for j in range(5):
            uuid = f"{k:04x}{j:04x}-21dc-4d0c-bfe1-4cae3c85c829"
            rel = f"{cid:04d}/{uuid.replace('-', '')}.jpg"
            write_image(root / "images" / rel, k, mode="L" if j == 4 else "RGB")
            lines["images"].append(f"{uuid} {rel}")
            lines["labels"].append(f"{uuid} {cid}")
            lines["split"].append(f"{uuid} {int(j < 3)}")
            lines["boxes"].append(f"{uuid} 4 6 30 20")
    for key, name in (("images", "images.txt"), ("labels", "image_class_labels.txt"),
                      ("split", "train_test_split.txt"), ("boxes", "bounding_boxes.txt")):
        (root / name).write_text("\n".join(lines[key]) + "\n")
    names = NABIRDS_INNER | NABIRDS_CLASSES
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in sorted(names.items())))
    (root / "hierarchy.txt").write_text("".join(f"{c} {p}\n" for c, p in NABIRDS_TREE.items()))
    classes = [NABIRDS_CLASSES[c] for c in sorted(NABIRDS_CLASSES)]
    hierarchy = {"Forster's Tern": ["Terns", "Perching and other birds", "Birds"],
                 "Common Tern": ["Terns", "Perching and other birds", "Birds"],
                 "Wood Duck (Male)": ["Ducks", "Perching and other birds", "Birds"]}
    return root, Expected(classes, 9, 6, boxes=True, hierarchy=hierarchy)


def cars(root: Path) -> tuple[Path, Expected]:
    """cars_annos.mat: a 1 x N struct array (relative_im_path, bbox_*, class, test) and class_names."""
    from scipy.io import savemat

    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    ann = np.zeros((1, 12), dtype=[(f, object) for f in fields])
    for i in range(12):
        label = i % 3
        rel = f"car_ims/{i + 1:06d}.jpg"
        write_image(root / rel, label, mode="L" if i == 7 else "RGB")
        row = ann[0, i]
        row["relative_im_path"] = np.array([rel])
        for f, v in zip(fields[1:5], (5, 7, 44, 38)):  # 1-based, inclusive
            row[f] = np.array([[v]], np.uint16)
        row["class"] = np.array([[label + 1]], np.uint8)
        row["test"] = np.array([[int(i >= 8)]], np.uint8)
    savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": _cells(names).T})
    return root, Expected(names, 8, 4, boxes=True)


AIRCRAFT = [("707-320", "Boeing 707", "Boeing"), ("Cessna 172", "Cessna 172", "Cessna"),
            ("F-16A/B", "F-16", "General Dynamics"), ("727-200", "Boeing 727", "Boeing")]


def aircraft(root: Path) -> tuple[Path, Expected]:
    """fgvc-aircraft-2013b/data: images/<7-digit id>.jpg, images_<level>_<split>.txt, the class lists
    and images_box.txt (1-based x1 y1 x2 y2)."""
    data = root / "data"
    files: dict[str, list[str]] = {}
    boxes = []
    n = 0
    for k, levels in enumerate(AIRCRAFT):
        for j in range(3):
            n += 1
            image_id = f"{1025794 + n:07d}"
            write_image(data / "images" / f"{image_id}.jpg", k)
            split = "trainval" if j < 2 else "test"
            for level, name in zip(("variant", "family", "manufacturer"), levels):
                files.setdefault(f"images_{level}_{split}.txt", []).append(f"{image_id} {name}")
            boxes.append(f"{image_id} 3 5 46 30")
    for name, lines in files.items():
        (data / name).write_text("\n".join(lines) + "\n")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")
    for name, column in (("variants.txt", 0), ("families.txt", 1), ("manufacturers.txt", 2)):
        (data / name).write_text("".join(f"{v}\n" for v in dict.fromkeys(a[column] for a in AIRCRAFT)))
    hierarchy = {v: [f, m] for v, f, m in AIRCRAFT}
    return root, Expected([a[0] for a in AIRCRAFT], 8, 4, boxes=True, hierarchy=hierarchy)


def dogs(root: Path) -> tuple[Path, Expected]:
    """lists.tar's train_list.mat / test_list.mat (cell arrays, 1-based labels), Images/<breed>/,
    Annotation/<breed>/<image> (PASCAL-VOC XML without an extension, one box per dog)."""
    from scipy.io import savemat

    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02113978-Mexican_hairless"]
    xml = ("<annotation><size><width>48</width><height>40</height></size>"
           "<object><name>dog</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>30</ymax></bndbox>"
           "</object><object><bndbox><xmin>10</xmin><ymin>2</ymin><xmax>40</xmax><ymax>25</ymax></bndbox>"
           "</object></annotation>")
    lists: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for k, breed in enumerate(breeds):
        wnid = breed.split("-")[0]
        for j in range(4):
            rel = f"{breed}/{wnid}_{100 + j}.jpg"
            write_image(root / "Images" / rel, k)
            (root / "Annotation" / breed).mkdir(parents=True, exist_ok=True)
            (root / "Annotation" / breed / f"{wnid}_{100 + j}").write_text(xml)
            files, labels = lists["train" if j < 3 else "test"]
            files.append(rel)
            labels.append(k + 1)
    for part, (files, labels) in lists.items():
        savemat(root / f"{part}_list.mat", {"file_list": _cells(files),
                                            "annotation_list": _cells([f.removesuffix(".jpg") for f in files]),
                                            "labels": np.array(labels, np.uint8)[:, None]})
    return root, Expected(breeds, 9, 3, boxes=True)


def flowers(root: Path) -> tuple[Path, Expected]:
    """jpg/image_NNNNN.jpg, imagelabels.mat (1 x N, 1-based) and setid.mat (trnid, valid, tstid)."""
    from scipy.io import savemat

    labels = np.array([1, 2, 3] * 4, np.uint8)
    for i, label in enumerate(labels, 1):
        write_image(root / "jpg" / f"image_{i:05d}.jpg", int(label) - 1)
    ids = np.arange(1, 13, dtype=np.uint16)
    savemat(root / "imagelabels.mat", {"labels": labels[None]})
    savemat(root / "setid.mat", {"trnid": ids[None, 6:9], "valid": ids[None, 9:], "tstid": ids[None, :6]})
    return root, Expected(["001", "002", "003"], 6, 6, boxes=False)


def pets(root: Path) -> tuple[Path, Expected]:
    """annotations/{trainval,test}.txt (`#` header lines; `image class species breed`, 1-based)
    and images/; cat breeds are capitalised, dog breeds not."""
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1)]
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for k, (breed, species) in enumerate(breeds):
        for j in range(1, 6):
            write_image(root / "images" / f"{breed}_{j}.jpg", k)
            lines["trainval" if j <= 3 else "test"].append(f"{breed}_{j} {k + 1} {species} {k + 1}")
    (root / "annotations").mkdir(parents=True)
    for part, rows in lines.items():
        (root / "annotations" / f"{part}.txt").write_text(header + "\n".join(rows) + "\n")
    return root, Expected([b for b, _ in breeds], 9, 6, boxes=False)


def inat2017(root: Path) -> tuple[Path, Expected]:
    """train2017.json / val2017.json (COCO style) and train_val_images/<supercategory>/<name>/."""
    import json

    categories = [{"id": 0, "name": "Cardinalis cardinalis", "supercategory": "Aves"},
                  {"id": 1, "name": "Danaus plexippus", "supercategory": "Insecta"},
                  {"id": 2, "name": "Quercus alba", "supercategory": "Plantae"}]
    image_id = 0
    for part, per_class in (("train", 3), ("val", 2)):
        images, annotations = [], []
        for c in categories:
            for _ in range(per_class):
                image_id += 1
                rel = f"train_val_images/{c['supercategory']}/{c['name']}/{image_id:032x}.jpg"
                write_image(root / rel, c["id"])
                images.append({"id": image_id, "width": W, "height": H, "file_name": rel, "license": 1,
                               "rights_holder": "someone"})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": c["id"]})
        doc = {"info": {"year": 2017}, "images": images, "annotations": annotations, "categories": categories,
               "licenses": []}
        (root / f"{part}2017.json").write_text(json.dumps(doc))
    return root, Expected([c["name"] for c in categories], 9, 6, boxes=False,
                          hierarchy={c["name"]: [c["supercategory"]] for c in categories})


WRITERS = {"cub": cub, "nabirds": nabirds, "cars": cars, "aircraft": aircraft, "dogs": dogs, "flowers": flowers,
           "pets": pets, "inat2017": inat2017}
