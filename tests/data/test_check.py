"""`fgvr data check` and `fgvr data stats` on the miniatures, and the cheap check `fgvr train` runs."""

import dataclasses
import json
from pathlib import Path

import pytest

from fgvr.cli import main
from fgvr.data import catalog
from fgvr.runtime.errors import DataError
from tests.conftest import fgvr, write_cub
from tests.data.miniatures import WRITERS, write_image


@pytest.fixture
def official(monkeypatch):
    """Make a miniature's counts the official ones of its benchmark."""

    def _official(name: str, classes: int, train: int, test: int) -> None:
        bench = dataclasses.replace(catalog.BENCHMARKS[name], classes=classes, train=train, test=test)
        monkeypatch.setitem(catalog.BENCHMARKS, name, bench)

    return _official


def data(*args) -> int:
    """`fgvr data ...` in this process; its exit code."""
    try:
        main(["data", *map(str, args)])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_check_passes_every_complete_miniature(tmp_path, capsys, official, name):
    root, expected = WRITERS[name](tmp_path / name)
    official(name, len(expected.classes), expected.train, expected.test)
    assert data("check", name, "--root", root, "--workers", 1) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("ok") and "problem" not in out, out
    assert f"{len(expected.classes)} classes, {expected.train} train, {expected.test} test images" in out


def test_check_compares_with_the_official_totals(tmp_path, capsys):
    root = write_cub(tmp_path / "CUB_200_2011")
    assert data("check", "cub", "--root", root, "--workers", 1) == 1
    assert "problem: 12 train / 6 test images in 3 classes, not CUB-200-2011's 5994 / 5794 in 200" in \
        capsys.readouterr().out


def test_check_finds_each_planted_defect(tmp_path, capsys, official):
    root = write_cub(tmp_path / "CUB_200_2011", per_class=8)
    official("cub", 3, 15, 9)
    images = sorted((root / "images").rglob("*.jpg"))
    images[0].unlink()  # missing
    data_bytes = images[1].read_bytes()
    images[1].write_bytes(data_bytes[: len(data_bytes) // 2])  # truncated
    images[2].write_text("<html>404 Not Found</html>")  # not an image at all
    images[3].write_bytes(data_bytes[:data_bytes.index(b"\xff\xda")] + b"\xff\xd9")  # a header, no pixels
    write_image(images[6], 0, mode="CMYK")
    write_image(images[7], 0, fmt="PNG")  # a PNG named .jpg
    json_out = tmp_path / "check.json"
    assert data("check", "cub", "--root", root, "--workers", 2, "--json", json_out) == 1
    out = capsys.readouterr().out
    for kind, image in (("missing", 0), ("truncated", 1), ("unreadable", 2), ("undecodable", 3)):
        assert f"problem: 1 {kind} image, e.g. {images[image]}" in out, (kind, out)
    assert f"note: 1 CMYK images (converted to RGB when loaded), e.g. {images[6]}" in out
    assert "note: 4 L images" in out  # write_cub makes every fifth image grayscale, as real CUB has a few
    assert f"note: 1 images whose contents are not what their name says, e.g. {images[7]} (PNG)" in out
    assert out.strip().endswith("4 problems found")
    report = json.loads(json_out.read_text())
    assert report["ok"] is False and len(report["problems"]) == 4


def test_check_finds_a_class_without_test_images_and_duplicates(tmp_path, capsys, official):
    root = write_cub(tmp_path / "CUB_200_2011")
    official("cub", 3, 13, 4)
    split = (root / "train_test_split.txt").read_text().splitlines()
    labels = dict(line.split() for line in (root / "image_class_labels.txt").read_text().splitlines())
    (root / "train_test_split.txt").write_text("".join(
        f"{i} {'1' if labels[i] == '3' else s}\n" for i, s in (line.split() for line in split)))  # class 3: no test
    images = (root / "images.txt").read_text().splitlines()
    images[1] = f"2 {images[0].split()[1]}"  # image 2 points at image 1's file
    (root / "images.txt").write_text("\n".join(images) + "\n")
    assert data("check", "cub", "--root", root, "--workers", 1) == 1
    out = capsys.readouterr().out
    assert "problem: 1 classes without a test image (e.g. '003.Bird_3')" in out
    assert "problem: 1 images listed more than once" in out


def test_check_of_an_unknown_name_or_a_bad_override(tmp_path, capsys):
    assert data("check", "imagenet", "--root", tmp_path) == 2
    assert "fgvr data: error: imagenet: no such data set; choose one of aircraft, cars, csv, cub" in \
        capsys.readouterr().err
    assert data("check", "cub", "--root", tmp_path, "img_size=big") == 2
    assert "fgvr data: error: data.img_size: " in capsys.readouterr().err
    assert data("check", "cub", "--root", tmp_path / "nope") == 1
    assert "no such folder" in capsys.readouterr().err


def test_stats_describes_classes_sizes_and_boxes(tmp_path, capsys):
    root = write_cub(tmp_path / "CUB_200_2011")
    out_json = tmp_path / "stats.json"
    assert data("stats", "cub", "--root", root, "--json", out_json, "--workers", 1) == 0
    out = capsys.readouterr().out
    assert out.startswith("cub: 3 classes") and "train: 12 images, 12 with a box" in out
    assert "images per class" in out and "box area / image" in out
    train = json.loads(out_json.read_text())["splits"]["train"]
    assert train["per_class"] == {"min": 4, "p5": 4, "median": 4, "p95": 4, "max": 4, "imbalance": 1.0}
    assert train["width"]["median"] == 48 and train["height"]["median"] == 40
    assert train["box_area_fraction"]["median"] == pytest.approx(24 * 24 / (48 * 40), abs=1e-3)


def test_stats_shows_the_hierarchy(tmp_path, capsys):
    root, _ = WRITERS["nabirds"](tmp_path / "nabirds")
    assert data("stats", "nabirds", "--root", root, "--workers", 1) == 0
    assert "nabirds: 3 classes; above them 3 levels of the hierarchy with 2, 1, 1 nodes" in capsys.readouterr().out


def test_the_data_command_of_the_console_script(tmp_path):
    proc = fgvr("data", "list", cwd=tmp_path)
    assert proc.stdout.splitlines()[0].split() == ["name", "data", "set", "classes", "train", "test", "boxes",
                                                  "download", "data.root", "under", "--root"]
    assert proc.stdout.splitlines()[1].split()[-1] == "CUB_200_2011"
    proc = fgvr("data", "check", "cub", "--root", str(tmp_path / "nope"), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("fgvr data: error: data.root=") and \
        "no such folder" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_list_shows_every_benchmark(capsys):
    assert data("list") == 0
    out = capsys.readouterr().out
    assert all(name in out for name in catalog.BENCHMARKS) and "579184" in out
    assert data("--help") == 0 and "fgvr data download NAME --root DIR" in capsys.readouterr().out
    assert data("check") == 2 and "required: name" in capsys.readouterr().err


def test_train_refuses_a_root_that_is_not_the_whole_data_set(tmp_path, compose):
    """The cheap check, in the loaders `fgvr train`, `eval` and `bench` build before any model."""
    from fgvr.data.dataset import build_loaders

    root = write_cub(tmp_path / "CUB_200_2011")
    cfg = compose("data=cub", f"data.root={root}", "data.num_workers=0").data
    message = (f"data.root={root}: 12 train / 6 test images in 3 classes, not CUB-200-2011's 5994 / 5794 in 200; "
               "point data.root at the complete data set (fgvr data check cub --root DIR says what is wrong) or set "
               "data.check_counts=false to train on these")
    with pytest.raises(DataError) as e:
        build_loaders(cfg, str(tmp_path), seed=0, pin_memory=False)
    assert str(e.value) == message
    cfg.check_counts = False
    assert len(build_loaders(cfg, str(tmp_path), seed=0, pin_memory=False).test.dataset) == 6


def test_quick_check_decodes_a_few_images(tmp_path):
    from fgvr.data.check import quick_check
    from fgvr.data.readers import read_cub

    root = write_cub(tmp_path / "CUB_200_2011")
    splits = read_cub(root)
    Path(splits.train.paths[0]).write_text("<html>an error page saved as an image</html>")
    with pytest.raises(DataError, match="not a decodable image"):
        quick_check("my_cub", str(root), splits)  # not a benchmark with official totals: only images are looked at
    quick_check("my_cub", str(root), splits, decode=False)  # data.skip_bad=true: the loader skips it
