"""Bad files end in one line that names the file and the fix: images that do not decode, annotation files
that are not UTF-8 or have malformed lines, and a subset checked with check_counts=false."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgvr.data.check import quick_check
from fgvr.data.dataset import build_loaders
from fgvr.data.image import load_image
from fgvr.data.readers import read_cub
from fgvr.runtime.config import DataCache, DataConfig, DataFormat
from fgvr.runtime.errors import DataError
from tests.conftest import write_cub
from tests.data.miniatures import WRITERS
from tests.data.test_check import data

SKIP = "remove it or set data.skip_bad=true"


def spoil(path: Path, kind: str) -> None:
    """Make an image file bad the way a fault tester does."""
    whole = path.read_bytes()
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "undecodable":  # a JPEG header and end marker, no pixels
        path.write_bytes(whole[: whole.index(b"\xff\xda")] + b"\xff\xd9")
    else:  # text saved under an image's name
        path.write_text("<html>404 Not Found</html>\n")


BAD_IMAGES = ["zero_byte", "truncated", "undecodable", "text"]


def loader_config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(name="cub", format=DataFormat.cub, root=str(root), img_size=24, resize_ratio=1.25, batch_size=4,
                      num_workers=0, val_fraction=0.0, check_counts=False, **kwargs)


def skipped(loaders) -> int:
    return sum(b.skipped for split in ("train", "test") for b in getattr(loaders, split))


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_image_is_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "bird.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(path)
    spoil(path, kind)
    with pytest.raises(DataError) as e:
        load_image(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: ") and message.endswith(SKIP) and "\n" not in message, message


def test_zero_byte_image_in_the_quick_check_of_train(cub_root):
    splits = read_cub(cub_root)
    Path(splits.train.paths[0]).write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{splits.train.paths[0]}: empty image file (0 bytes); {SKIP}")):
        quick_check("my_cub", str(cub_root), splits)
    quick_check("my_cub", str(cub_root), splits, decode=False)  # data.skip_bad=true: the loader skips it


@pytest.mark.parametrize("cache", [DataCache.none, DataCache.decoded])
def test_bad_images_are_skipped_and_counted_with_skip_bad(cub_root, tmp_path, cache):
    """Decoded every epoch or once into the cache: one line without data.skip_bad, skipped and counted with it."""
    images = sorted((cub_root / "images").rglob("*.jpg"))
    for image, kind in zip(images[1:], BAD_IMAGES):
        spoil(image, kind)
    with pytest.raises(DataError, match=SKIP):
        skipped(build_loaders(loader_config(cub_root, cache=cache), str(tmp_path), seed=0, pin_memory=False))
    loaders = build_loaders(loader_config(cub_root, cache=cache, skip_bad=True), str(tmp_path), seed=0,
                            pin_memory=False)
    assert skipped(loaders) == len(BAD_IMAGES)


def test_bad_images_are_counted_by_data_check_and_stats(cub_root, capsys):
    images = sorted((cub_root / "images").rglob("*.jpg"))
    for image, kind in zip(images, BAD_IMAGES):
        spoil(image, kind)
    assert data("check", "cub", "--root", cub_root, "--workers", 1, "check_counts=false") == 1
    out = capsys.readouterr().out
    assert "decoded 14 of 18 images" in out and f"problem: 2 unreadable images, e.g. {images[0]}" in out
    assert f"problem: 1 truncated image, e.g. {images[1]}" in out
    assert f"problem: 1 undecodable image, e.g. {images[2]}" in out
    assert data("stats", "cub", "--root", cub_root, "--workers", 1) == 0
    assert "2 unreadable" in capsys.readouterr().out  # headers only: the three test images have readable ones


NOT_UTF8 = [("cub", "classes.txt", 2), ("cub", "images.txt", 1), ("nabirds", "hierarchy.txt", 3),
            ("aircraft", "data/variants.txt", 2), ("aircraft", "data/images_variant_test.txt", 1),
            ("pets", "annotations/trainval.txt", 4), ("inat2017", "train2017.json", 1)]


@pytest.mark.parametrize("name,file,line", NOT_UTF8)
def test_non_utf8_annotation_file_names_the_file_and_line(tmp_path, name, file, line):
    from tests.data.test_readers import read

    root, _ = WRITERS[name](tmp_path / name)
    path = root / file
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1][:3] + b"\xe9" + lines[line - 1][3:]  # Latin-1, as an old editor saves it
    path.write_bytes(b"\n".join(lines))
    message = (f"{path}: line {line} is not UTF-8 text (byte 0xe9 at column 4); re-extract the file or convert it "
               "to UTF-8")
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        read(name, root)


def test_non_utf8_classes_txt_through_the_cli_is_one_line(cub_root, capsys):
    (cub_root / "classes.txt").write_bytes(b"1 001.Bird_1\n2 002.M\xf6we\n3 003.Bird_3\n")
    assert data("check", "cub", "--root", cub_root) == 1
    err = capsys.readouterr().err
    assert err == f"fgvr data: error: {cub_root / 'classes.txt'}: line 2 is not UTF-8 text (byte 0xf6 at column 8); " \
        "re-extract the file or convert it to UTF-8\n"


MALFORMED = [
    ("cub", "image_class_labels.txt", "7 seven", "'<image_id> <class_id>' (class_id an integer)"),
    ("cub", "train_test_split.txt", "7 yes", "'<image_id> <is_training_image>' (is_training_image 0 or 1)"),
    ("cub", "classes.txt", "two", "'<class_id> <name>' (class_id an integer)"),
    ("nabirds", "hierarchy.txt", "313 Terns", "'<child_id> <parent_id>' (child_id, parent_id integers)"),
    ("aircraft", "data/images_box.txt", "1025795 3 5 46", "'<image_id> <x1> <y1> <x2> <y2>' (x1, y1, x2, y2 numbers)"),
    ("pets", "annotations/test.txt", "Bengal_4 three 1 3",
     "'<image> <class_id> <species> <breed_id>' (class_id, species, breed_id integers)"),
]


@pytest.mark.parametrize("name,file,bad,expected", MALFORMED)
def test_malformed_annotation_line_names_the_file_and_line(tmp_path, name, file, bad, expected):
    from tests.data.test_readers import read

    root, _ = WRITERS[name](tmp_path / name)
    path = root / file
    lines = path.read_text().splitlines()
    line = 4 if len(lines) >= 4 else len(lines)
    lines[line - 1] = bad
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}, line {line}: expected {expected}, got {bad!r}')}$"):
        read(name, root)


def test_malformed_line_is_shortened(cub_root):
    long = "7 " + "x" * 200
    (cub_root / "image_class_labels.txt").write_text(long + "\n")
    with pytest.raises(DataError, match=re.escape(f"got {long[:77] + '...'!r}")):
        read_cub(cub_root)


ROW = "line 3: expected 2 comma-separated values (path,label) with a path and a label"


@pytest.mark.parametrize("text,expected", [
    ("path,label\na.jpg,1\nb.jpg\n", f"{ROW}, got 'b.jpg'"),
    ("path,label\na.jpg,1\n,2\n", f"{ROW}, got ',2'"),
    ("path,label,x,y,w,h\na.jpg,1,0,0,5,5\nb.jpg,1,0,no,5,5\n", "line 3: expected numbers in the box columns x,y,w,h"),
    ('path,label\na.jpg,1\n"b.jpg,1\n', "line 3: not valid CSV"),
    ('path,label\na.jpg,1\n"b".jpg,1\n', "line 3: not valid CSV"),
])
def test_malformed_csv_row_names_the_file_and_line(tmp_path, text, expected):
    from fgvr.data.readers import read_csv

    (tmp_path / "train.csv").write_text(text)
    (tmp_path / "test.csv").write_text("path,label\nc.jpg,1\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.csv'}, {expected}")):
        read_csv(tmp_path)


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    from fgvr.data.readers import read_csv

    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbfpath,label\na.jpg,wren\n")  # as Excel saves "CSV UTF-8"
    (tmp_path / "test.csv").write_text("path,label\nc.jpg,wren\n")
    assert read_csv(tmp_path).classes == ["wren"]


def test_broken_json_and_xml_name_the_file_and_line(tmp_path):
    from tests.data.test_readers import read

    root, _ = WRITERS["inat2017"](tmp_path / "inat2017")
    (root / "val2017.json").write_text('{"images": [],\n "annotations": [}')
    with pytest.raises(DataError, match=re.escape(f"{root / 'val2017.json'}, line 2: not valid JSON")):
        read("inat2017", root)
    root, _ = WRITERS["dogs"](tmp_path / "dogs")
    annotation = root / "Annotation" / "n02085620-Chihuahua" / "n02085620_100"
    annotation.write_text("<annotation>\n<bndbox><xmin>3</xmin>\n</annotation>")
    with pytest.raises(DataError, match=re.escape(f"{annotation}, line 3: not valid XML")):
        read("dogs", root)


def test_inat_category_not_among_the_categories(tmp_path):
    import json

    from tests.data.test_readers import read

    root, _ = WRITERS["inat2017"](tmp_path / "inat2017")
    doc = json.loads((root / "val2017.json").read_text())
    doc["annotations"][0]["category_id"] = 99
    (root / "val2017.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=re.escape(f"{root / 'val2017.json'}: category_id 99 is not among")):
        read("inat2017", root)


def test_check_of_a_subset_with_check_counts_false(tmp_path, capsys):
    """A subset of CUB passes when check_counts=false: its files are checked, the official totals are not."""
    root = write_cub(tmp_path / "CUB_subset", num_classes=2, per_class=3)
    assert data("check", "cub", "--root", root, "--workers", 1) == 1  # the official totals by default
    assert "problem: 4 train / 2 test images in 2 classes, not CUB-200-2011's" in capsys.readouterr().out
    assert data("check", "cub", "--root", root, "--workers", 1, "check_counts=false") == 0
    out = capsys.readouterr().out
    assert "decoded 6 of 6 images" in out and "note: counts not compared with CUB-200-2011's official totals" in out
    assert out.strip().endswith("ok") and "problem" not in out, out
    spoil(next((root / "images").rglob("*.jpg")), "zero_byte")  # the files are still checked
    assert data("check", "cub", "--root", root, "--workers", 1, "data.check_counts=false") == 1
    out = capsys.readouterr().out
    assert "decoded 5 of 6 images" in out and "problem: 1 unreadable image" in out
