import re
from pathlib import Path

import numpy as np
import pytest

from fgvr.data.catalog import BENCHMARKS
from fgvr.data.readers import read_csv, read_cub, read_folder
from fgvr.runtime.errors import ConfigError, DataError
from tests.conftest import write_cub
from tests.data.miniatures import WRITERS, H, W


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
    expected = "expected '<image_id> <x> <y> <width> <height>' (x, y, width, height numbers), got '1 2 3'"
    with pytest.raises(DataError, match=re.escape(f"bounding_boxes.txt, line 1: {expected}")):
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


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_benchmark_reader_reads_its_miniature(tmp_path, name):
    """Through the data set's own config, as `fgvr train data=NAME data.root=...` reads it."""
    root, expected = WRITERS[name](tmp_path / name)
    splits = read(name, root)
    assert splits.classes == expected.classes and splits.hierarchy == expected.hierarchy
    assert (len(splits.train), len(splits.test)) == (expected.train, expected.test)
    for records in (splits.train, splits.test):
        assert set(records.labels.tolist()) == set(range(len(expected.classes)))  # 0-based, contiguous
        assert all(Path(p).is_file() for p in records.paths)
        if expected.boxes:  # inside the image, in pixel coordinates
            assert np.isfinite(records.boxes).all()
            assert (records.boxes[:, :2] >= 0).all() and (records.boxes[:, 2:] <= (W, H)).all()
            assert (records.boxes[:, 2:] > records.boxes[:, :2]).all()
        else:
            assert np.isnan(records.boxes).all()


def test_every_benchmark_has_a_config_a_miniature_and_a_download_entry():
    from fgvr.runtime.config import config_dir

    configs = {p.stem for p in (config_dir() / "data").glob("*.yaml")}
    assert set(BENCHMARKS) == set(WRITERS) and set(BENCHMARKS) <= configs
    digits = {"md5": 32, "sha256": 64}
    for bench in BENCHMARKS.values():
        assert bench.archives and bench.folder, bench.name
        for a in bench.archives:
            assert a.url or bench.manual, f"{bench.name}: no URL and no manual step"
            assert a.url is None or (a.url.startswith(("http://", "https://")) and a.url.endswith(a.name))
            assert a.checksums and all(len(h) == digits[algo] and int(h, 16) >= 0
                                       for algo, h in (c.split(":") for c in a.checksums)), a


def read(name: str, root: Path, *overrides: str):
    from fgvr.commands.data import data_config
    from fgvr.data.readers import read_splits

    return read_splits(data_config(name, str(root), list(overrides)), str(root.parent))


def test_cars_boxes_are_converted_from_1_based_pixels(tmp_path):
    root, _ = WRITERS["cars"](tmp_path / "cars")
    splits = read("cars", root)
    np.testing.assert_allclose(splits.train.boxes[0], [4, 6, 44, 38])  # x1=5 .. x2=44 inclusive, 1-based
    assert splits.test.labels.tolist() == [2, 0, 1, 2]  # the `test` flag picks the split
    assert Path(splits.train.paths[0]).name == "000001.jpg"


def test_cars_annotations_without_a_field_name_it(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "cars_annos.mat", {"annotations": np.zeros((1, 2), dtype=[("relative_im_path", object)]),
                                          "class_names": np.array([["a"]], dtype=object)})
    with pytest.raises(DataError, match="cars_annos.mat: annotations have no field 'bbox_x1'"):
        read("cars", tmp_path)


def test_aircraft_label_levels(tmp_path):
    root, _ = WRITERS["aircraft"](tmp_path / "fgvc-aircraft-2013b")
    family = read("aircraft", root, "level=family")
    assert family.classes == ["Boeing 707", "Cessna 172", "F-16", "Boeing 727"]
    assert family.hierarchy == {"Boeing 707": ["Boeing"], "Cessna 172": ["Cessna"], "F-16": ["General Dynamics"],
                                "Boeing 727": ["Boeing"]}
    maker = read("aircraft", root, "level=manufacturer")
    assert maker.classes == ["Boeing", "Cessna", "General Dynamics"] and maker.hierarchy == {}
    assert maker.train.labels.tolist() == [0, 0, 1, 1, 2, 2, 0, 0]  # both Boeing variants are Boeing
    np.testing.assert_allclose(family.train.boxes[0], [2, 4, 46, 30])
    with pytest.raises(ConfigError, match="data.level=model: choose one of variant, family, manufacturer"):
        read("aircraft", root, "level=model")
    with pytest.raises(ConfigError, match="data.level=family: only data=aircraft has label levels"):
        read("cub", root, "level=family")


def test_aircraft_name_not_in_the_class_list(tmp_path):
    root, _ = WRITERS["aircraft"](tmp_path / "fgvc-aircraft-2013b")
    with (root / "data" / "images_variant_test.txt").open("a") as f:
        f.write("9999999 747-400\n")
    with pytest.raises(DataError, match="images_variant_test.txt: '747-400' is not in .*variants.txt"):
        read("aircraft", root)


def test_nabirds_keeps_only_leaf_classes_and_their_ancestors(tmp_path):
    """classes.txt also lists the hierarchy's inner nodes (never a label) and the ids are sparse."""
    root, _ = WRITERS["nabirds"](tmp_path / "nabirds")
    splits = read("nabirds", root)
    assert splits.classes == ["Forster's Tern", "Common Tern", "Wood Duck (Male)"]  # ids 295, 313, 817
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    (root / "hierarchy.txt").unlink()
    assert read("nabirds", root).hierarchy == {}


def test_dogs_boxes_are_the_union_of_the_dogs(tmp_path):
    root, _ = WRITERS["dogs"](tmp_path / "dogs")
    np.testing.assert_allclose(read("dogs", root).train.boxes[0], [2, 1, 40, 30])  # 1-based VOC boxes
    (root / "Annotation" / "n02085620-Chihuahua" / "n02085620_100").unlink()
    assert np.isnan(read("dogs", root).train.boxes[0]).all()  # an image without its annotation file
    (root / "test_list.mat").write_bytes(b"junk")
    with pytest.raises(DataError, match="test_list.mat: not a readable .mat file"):
        read("dogs", root)


def test_flowers_trains_on_train_plus_val(tmp_path):
    root, _ = WRITERS["flowers"](tmp_path / "flowers")
    splits = read("flowers", root)
    assert [Path(p).name for p in splits.train.paths] == [f"image_{i:05d}.jpg" for i in range(7, 13)]
    with pytest.raises(DataError, match="nowhere/imagelabels.mat: file not found"):
        read("flowers", tmp_path / "nowhere")


def test_pets_class_names_come_from_the_image_names(tmp_path):
    root, _ = WRITERS["pets"](tmp_path / "pets")
    splits = read("pets", root)
    assert splits.classes == ["Abyssinian", "american_bulldog", "Bengal"]
    assert splits.train.paths[0].endswith("images/Abyssinian_1.jpg")


def test_inat_tests_on_val_and_names_a_broken_json(tmp_path):
    root, _ = WRITERS["inat2017"](tmp_path / "inat2017")
    splits = read("inat2017", root)
    assert all("/train_val_images/" in p for p in splits.test.paths) and len(splits.test) == 6
    (root / "val2017.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="val2017.json: not an iNat2017 annotation file"):
        read("inat2017", root)
    (root / "val2017.json").write_text("{not json")
    with pytest.raises(DataError, match="val2017.json, line 1: not valid JSON"):
        read("inat2017", root)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_training_runs_on_every_miniature(tmp_path, train_run, name):
    """`fgvr train data=NAME data.root=...`: each benchmark's config, reader and loaders end to end."""
    root, expected = WRITERS[name](tmp_path / name)
    results, run_dir = train_run(f"data={name}", f"data.root={root}", "data.batch_size=4", "data.val_fraction=0",
                                 "trainer.epochs=1", run_dir=tmp_path / "run")
    assert results["status"] == "finished" and results["num_classes"] == len(expected.classes)
    assert results["steps"] == expected.train // 4 and results["test_images"] == expected.test  # every split read
