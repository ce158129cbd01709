from pathlib import Path

import numpy as np
import pytest

from fgvr.data.readers import read_csv, read_cub, read_dogs, read_flowers, read_folder, read_pets
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


def _jpeg(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(path)


def test_nabirds_keeps_only_leaf_classes_with_sparse_ids(tmp_path):
    """NABirds' layout is CUB's, with UUID image ids and a classes.txt that also lists the
    hierarchy's inner nodes (never used as a label): only the used classes become labels."""
    root = tmp_path / "nabirds"
    ids = ["0a1b-1", "0a1b-2", "0a1b-3", "0a1b-4"]
    for i in ids:
        _jpeg(root / "images" / f"{i}.jpg")
    (root / "images.txt").write_text("".join(f"{i} {i}.jpg\n" for i in ids))
    (root / "image_class_labels.txt").write_text("0a1b-1 295\n0a1b-2 817\n0a1b-3 295\n0a1b-4 817\n")
    (root / "train_test_split.txt").write_text("0a1b-1 1\n0a1b-2 1\n0a1b-3 0\n0a1b-4 0\n")
    (root / "classes.txt").write_text("0 Birds\n1 Perching Birds\n295 Forster's Tern\n817 Wood Duck (Male)\n")
    splits = read_cub(root)
    assert splits.classes == ["Forster's Tern", "Wood Duck (Male)"] and splits.train.labels.tolist() == [0, 1]


def test_dogs_reads_the_mat_lists_and_xml_boxes(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "dogs"
    root.mkdir()
    files = {"train": ["n02085620-Chihuahua/n02085620_1.jpg", "n02085782-Japanese_spaniel/n02085782_2.jpg"],
             "test": ["n02085620-Chihuahua/n02085620_3.jpg"]}
    for part, names in files.items():
        cells = np.empty((len(names), 1), dtype=object)
        for k, n in enumerate(names):
            cells[k, 0] = np.array([n])
        labels = [[1 if "Chihuahua" in n else 2] for n in names]
        savemat(root / f"{part}_list.mat", {"file_list": cells, "labels": np.array(labels, np.uint8)})
        for n in names:
            _jpeg(root / "Images" / n)
    xml = ("<annotation><object><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>10</xmax><ymax>12</ymax></bndbox></object>"
           "<object><bndbox><xmin>5</xmin><ymin>1</ymin><xmax>20</xmax><ymax>9</ymax></bndbox></object></annotation>")
    (root / "Annotation" / "n02085620-Chihuahua").mkdir(parents=True)
    (root / "Annotation" / "n02085620-Chihuahua" / "n02085620_1").write_text(xml)
    splits = read_dogs(root)
    assert splits.classes == ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    assert splits.train.labels.tolist() == [0, 1] and splits.test.labels.tolist() == [0]
    np.testing.assert_allclose(splits.train.boxes[0], [2, 1, 20, 12])  # the union of both dogs
    assert np.isnan(splits.train.boxes[1]).all() and Path(splits.test.paths[0]).is_file()
    (root / "test_list.mat").write_bytes(b"junk")
    with pytest.raises(DataError, match="test_list.mat: not a readable .mat file"):
        read_dogs(root)


def test_flowers_trains_on_train_plus_val(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "flowers"
    root.mkdir()
    for i in range(1, 7):
        _jpeg(root / "jpg" / f"image_{i:05d}.jpg")
    savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 1, 2, 3, 3]])})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[5]]), "tstid": np.array([[3, 4, 6]])})
    splits = read_flowers(root)
    assert splits.classes == ["001", "002", "003"]
    assert [Path(p).name for p in splits.train.paths] == ["image_00001.jpg", "image_00002.jpg", "image_00005.jpg"]
    assert splits.train.labels.tolist() == [0, 1, 2] and splits.test.labels.tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="nowhere/imagelabels.mat: file not found"):
        read_flowers(tmp_path / "nowhere")


def test_pets_reads_trainval_and_test_lists(tmp_path):
    root = tmp_path / "pets"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "trainval.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\nAbyssinian_100 1 1 1\namerican_bulldog_10 2 2 1\n")
    (root / "annotations" / "test.txt").write_text("Abyssinian_1 1 1 1\nstaffordshire_bull_terrier_2 3 2 35\n")
    splits = read_pets(root)
    assert splits.classes == ["Abyssinian", "american_bulldog", "staffordshire_bull_terrier"]
    assert splits.train.labels.tolist() == [0, 1] and splits.test.labels.tolist() == [0, 2]
    assert splits.train.paths[0].endswith("images/Abyssinian_100.jpg")
