from pathlib import Path

import numpy as np
import pytest

from fgvr.data.readers import read_csv, read_cub, read_folder
from fgvr.errors import DataError
from tests.conftest import write_cub


def test_cub_reads_official_layout(cub_root):
    splits = read_cub(cub_root)
    assert splits.classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    assert len(splits.train) == 12 and len(splits.test) == 6  # split flag 1 = train
    assert set(splits.train.labels) == {0, 1, 2}  # 1-based class ids become 0-based
    assert Path(splits.train.paths[0]).is_file()
    np.testing.assert_allclose(splits.train.boxes[0], [8, 8, 32, 32])  # x y w h -> x1 y1 x2 y2


def test_cub_sparse_class_ids_are_made_contiguous(tmp_path):
    root = write_cub(tmp_path / "cub")
    (root / "classes.txt").write_text("1 a\n5 b\n9 c\n")
    labels = [line.split() for line in (root / "image_class_labels.txt").read_text().split("\n") if line]
    remap = {"1": "1", "2": "5", "3": "9"}
    (root / "image_class_labels.txt").write_text("".join(f"{i} {remap[c]}\n" for i, c in labels))
    splits = read_cub(root)
    assert splits.classes == ["a", "b", "c"] and set(splits.test.labels) == {0, 1, 2}


def test_cub_without_boxes_gives_nan(cub_root):
    (cub_root / "bounding_boxes.txt").unlink()
    assert np.isnan(read_cub(cub_root).train.boxes).all()


@pytest.mark.parametrize("missing", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"])
def test_cub_missing_file_names_it(cub_root, missing):
    (cub_root / missing).unlink()
    with pytest.raises(DataError, match=missing):
        read_cub(cub_root)


def test_cub_wrong_root(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        read_cub(tmp_path / "nope")


def test_cub_malformed_line_names_file_and_line(cub_root):
    (cub_root / "bounding_boxes.txt").write_text("1 2 3\n")
    with pytest.raises(DataError, match=r"bounding_boxes.txt:1: expected 5 fields"):
        read_cub(cub_root)


def test_folder_reader(tmp_path):
    for part, n in (("train", 3), ("test", 2)):
        for cls in ("b_cls", "a_cls"):
            d = tmp_path / part / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.jpg").write_bytes(b"")
            (d / "notes.txt").write_text("not an image")
    splits = read_folder(tmp_path)
    assert splits.classes == ["a_cls", "b_cls"]
    assert len(splits.train) == 6 and len(splits.test) == 4
    assert list(splits.train.labels) == [0, 0, 0, 1, 1, 1]


def test_folder_reader_test_class_unknown_to_train(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "test" / "z").mkdir(parents=True)
    with pytest.raises(DataError, match="z: class folder not present"):
        read_folder(tmp_path)


def test_csv_reader_names_and_boxes(tmp_path):
    (tmp_path / "train.csv").write_text("path,label,x,y,w,h\na.jpg,sparrow,1,2,3,4\nb.jpg,wren,0,0,5,5\n")
    (tmp_path / "test.csv").write_text("path,label,x,y,w,h\nc.jpg,wren,0,0,1,1\n")
    splits = read_csv(tmp_path)
    assert splits.classes == ["sparrow", "wren"]
    assert list(splits.train.labels) == [0, 1] and list(splits.test.labels) == [1]
    np.testing.assert_allclose(splits.train.boxes[0], [1, 2, 4, 6])
    assert splits.train.paths[0] == str(tmp_path / "a.jpg")


def test_csv_reader_integer_labels_sort_numerically(tmp_path):
    (tmp_path / "train.csv").write_text("path,label\na.jpg,10\nb.jpg,2\n")
    (tmp_path / "test.csv").write_text("path,label\nc.jpg,2\n")
    splits = read_csv(tmp_path)
    assert splits.classes == ["2", "10"] and list(splits.train.labels) == [1, 0]
    assert np.isnan(splits.train.boxes).all()


def test_csv_reader_bad_header(tmp_path):
    (tmp_path / "train.csv").write_text("file,class\na.jpg,1\n")
    (tmp_path / "test.csv").write_text("path,label\nc.jpg,2\n")
    with pytest.raises(DataError, match="train.csv: needs a header with columns path,label"):
        read_csv(tmp_path)
