"""`fgvr predict`: top-k classes and the region the model used, for new images, into CSV or JSON lines."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fgvr.commands.predict import ImageFiles, predict
from fgvr.runtime import checkpoint
from fgvr.runtime.config import PredictConfig
from fgvr.runtime.errors import ConfigError, DataError, FgvrError
from tests.conftest import TINY, fgvr, write_cub

W, H = 48, 40  # the miniature CUB's images (non-square)
# The eval transform at data.img_size=32 and CUB's resize_ratio 1.34: a square resize to 43 px, then
# albumentations' centre crop of 32 px at offset (43 - 32) // 2 = 5.
SIDE, OFFSET = 43, 5


def _train(root: Path, run_dir: Path, *overrides: str) -> Path:
    """A run of the test's tiny ViT on the miniature CUB, trained in-process (as conftest's train_run)."""
    from hydra import compose, initialize_config_dir

    from fgvr.engine.trainer import train
    from fgvr.runtime.config import config_dir, register_schemas
    from fgvr.runtime.tracker import RunInfo

    register_schemas()
    base = [o for o in TINY if not o.startswith("data.synth.")]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*base, "data=cub", f"data.root={root}", "data.check_counts=false",
                                          "data.batch_size=4", "trainer.epochs=1", *overrides])
    run_dir.mkdir(parents=True)
    train(cfg, RunInfo(run_dir, "test", choices={}))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two runs shared by this module's tests: the centre-crop baseline (a known box) and a plain model."""
    tmp = tmp_path_factory.mktemp("predict")
    root = write_cub(tmp / "CUB_200_2011")
    return {"root": root, "center": _train(root, tmp / "center", "selector=center"),
            "plain": _train(root, tmp / "plain")}


@pytest.fixture
def photos(runs, tmp_path) -> Path:
    """The miniature's images/ (real JPEGs in the CUB layout), with a truncated JPEG and a text file
    named .jpg among them, an upper-case suffix and a file that is not an image."""
    folder = tmp_path / "photos"
    shutil.copytree(runs["root"] / "images", folder)
    first = sorted(folder.rglob("*.jpg"))[0]
    data = first.read_bytes()
    (folder / "001.Bird_1" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (folder / "002.Bird_2" / "notes.jpg").write_text("not an image\n")
    first.rename(first.with_suffix(".JPG"))
    (folder / "README.txt").write_text("ignored\n")
    return folder


def _cfg(**kwargs) -> PredictConfig:
    return OmegaConf.structured(PredictConfig(**kwargs))


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_folder_with_broken_files_gives_a_row_per_image_and_fails_after_writing(runs, photos, tmp_path, caplog):
    out = tmp_path / "preds.csv"
    with caplog.at_level(logging.WARNING, logger="fgvr.commands.predict"), \
            pytest.raises(DataError) as failure:
        predict(_cfg(ckpt=str(runs["center"]), input=str(photos), out=str(out), top_k=2, batch_size=4, num_workers=2))
    assert str(failure.value) == ("2 of 20 images failed (unreadable; each logged above, its reason in the error "
                                  f"column); the predictions of the others are in {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "preds.csv"]  # no temporary file left
    with out.open() as f:
        assert f.readline().strip() == "path,class1,prob1,class2,prob2,x1,y1,x2,y2,error"
    rows = _read_csv(out)
    files = sorted(str(p) for p in photos.rglob("*") if p.suffix.lower() == ".jpg")
    assert [r["path"] for r in rows] == files
    broken = {Path(r["path"]).name: r for r in rows if r["error"]}
    assert {name: r["error"] for name, r in broken.items()} == {
        "truncated.jpg": "truncated image file (no end marker)", "notes.jpg": "not a decodable image"}
    assert all(r["class1"] == r["prob1"] == r["x1"] == "" for r in broken.values())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warnings) == sorted(f"{r['path']}: {r['error']}" for r in broken.values())

    classes = checkpoint.load(runs["center"] / "checkpoints" / "last.pt")["classes"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 18
    for r in good:
        assert {r["class1"], r["class2"]} <= set(classes) and r["class1"] != r["class2"]
        p1, p2 = float(r["prob1"]), float(r["prob2"])
        assert 1 >= p1 >= p2 > 0 and p1 + p2 <= 1 + 1e-6
        x1, y1, x2, y2 = (float(r[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
        # selector=center: a square centred on the 32 px input, whose centre (16, 16) maps back to
        # (OFFSET + 16) / SIDE of the image's width and height; the square becomes a W:H rectangle.
        assert (x1 + x2) / 2 == pytest.approx((OFFSET + 16) * W / SIDE, abs=0.01)
        assert (y1 + y2) / 2 == pytest.approx((OFFSET + 16) * H / SIDE, abs=0.01)
        assert (x2 - x1) / (y2 - y1) == pytest.approx(W / H, rel=1e-3)


@pytest.mark.parametrize("size, input_size", [(32, 32), (64, 32)])  # crop_source=original: loaded 2x larger
def test_boxes_map_back_through_the_eval_transform(size, input_size):
    """A box carried forward through the eval transform (as the loaders carry the ground truth) and
    mapped back lands where it started, in the pixels of a non-square image."""
    images = ImageFiles([], size, 1.34)
    box = np.array([[20.0, 10.0, 60.0, 40.0]], np.float32)  # in a 90 x 50 image, inside the centre crop
    out = images.transform(image=np.zeros((50, 90, 3), np.uint8), bboxes=box)
    forward = torch.tensor(out["bboxes"][0], dtype=torch.float32) / size * input_size  # network-input pixels
    back = images.image_boxes(forward[None], torch.tensor([[90.0, 50.0]]), input_size)
    assert back[0].tolist() == pytest.approx(box[0].tolist(), abs=1e-3)


def test_csv_input_jsonl_output_and_tta(runs, tmp_path):
    """A CSV of paths (relative to its folder, or absolute) in, JSON lines out; tta=flip averages in
    the mirror images' logits, so its probabilities differ from tta=none's."""
    images = sorted((runs["root"] / "images").rglob("*.jpg"))[:3]
    table = tmp_path / "lists" / "mine.csv"
    table.parent.mkdir()
    shutil.copy(images[0], table.parent / "a.jpg")
    names = ["a.jpg", str(images[1]), str(images[2])]
    table.write_text("id,path\n" + "".join(f"{i},{n}\n" for i, n in enumerate(names)))
    rows = {}
    for tta in ("none", "flip"):
        out = predict(_cfg(ckpt=str(runs["center"]), input=str(table), out=str(tmp_path / f"{tta}.jsonl"),
                           format="jsonl", tta=tta, top_k=3))
        rows[tta] = [json.loads(line) for line in out.read_text().splitlines()]
    first = rows["none"][0]
    assert list(first) == ["path", "classes", "probs", "box", "error"] and first["error"] is None
    assert [r["path"] for r in rows["none"]] == names
    assert len(first["classes"]) == 3 and sum(first["probs"]) == pytest.approx(1, abs=1e-5)
    assert all(r["box"] == rows["flip"][i]["box"] for i, r in enumerate(rows["none"]))  # the boxes of the images
    assert all(r["probs"] != f["probs"] for r, f in zip(rows["none"], rows["flip"]))


def test_no_region_no_box_and_an_earlier_output_replaced_but_kept_on_ctrl_c(runs, tmp_path, monkeypatch, caplog):
    """A plain model leaves the box columns empty; predicting again replaces its own earlier output,
    and a run stopped halfway leaves that output as it was, with no temporary file."""
    image = sorted((runs["root"] / "images").rglob("*.jpg"))[0]
    monkeypatch.chdir(tmp_path)
    first = predict(_cfg(ckpt=str(runs["plain"]), input=str(image), top_k=1))
    assert first == Path("predictions.csv")
    (row,) = _read_csv(first)
    assert row["path"] == str(image) and row["class1"] and [row[k] for k in ("x1", "y1", "x2", "y2")] == [""] * 4
    with caplog.at_level(logging.WARNING, logger="fgvr.commands.predict"):
        predict(_cfg(ckpt=str(runs["plain"]), input=str(image)))  # its own output: replaced
    assert "replacing predictions.csv (an earlier fgvr predict output)" in caplog.messages
    before = first.read_bytes()
    # top_k defaults to 5, or the class count (3) if fewer
    assert list(_read_csv(first)[0])[:8] == ["path", "class1", "prob1", "class2", "prob2", "class3", "prob3", "x1"]

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("fgvr.commands.predict.forward_tta", interrupted)  # Ctrl-C while the rows are written
    with pytest.raises(KeyboardInterrupt):
        predict(_cfg(ckpt=str(runs["plain"]), input=str(image.parent), top_k=1))
    assert first.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]


def test_bad_inputs_options_and_outputs_fail_in_one_line_before_any_work(runs, tmp_path, monkeypatch):
    ckpt = str(runs["center"])
    image = str(sorted((runs["root"] / "images").rglob("*.jpg"))[0])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    (tmp_path / "list.csv").write_text("file,label\na.jpg,1\n")
    (tmp_path / "notes.txt").write_text("keep me\n")
    cases = [
        (dict(input=str(tmp_path / "nope")), f"input={tmp_path / 'nope'}: no such file or folder"),
        (dict(input=str(tmp_path / "empty")),
         f"input={tmp_path / 'empty'}: no images in that folder or below it (.jpg .jpeg .png .bmp .webp .tif .tiff)"),
        (dict(input=str(tmp_path / "list.csv")),
         f"input={tmp_path / 'list.csv'}: no path column (its header: file, label); name the column of image paths "
         "`path`"),
        (dict(input=str(tmp_path / "notes.txt")),
         f"input={tmp_path / 'notes.txt'}: not an image (.jpg .jpeg .png .bmp .webp .tif .tiff), a folder of them or "
         "a CSV with a path column"),
        (dict(input=image, top_k=4), "top_k=4: the checkpoint has 3 classes; pass top_k=3 or less"),
        (dict(input=image, out=str(tmp_path / "no" / "p.csv")),
         f"out={tmp_path / 'no' / 'p.csv'}: the folder {tmp_path / 'no'} does not exist; create it or give out= "
         "another path"),
        (dict(input=image, out=str(tmp_path / "notes.txt")),
         f"out={tmp_path / 'notes.txt'}: something else is there already (not an earlier output of fgvr predict); "
         "give out= another path"),
        (dict(input=image, top_k=0), "top_k=0: must be >= 1"),
        (dict(input=image, out=str(tmp_path / "empty")),
         f"out={tmp_path / 'empty'}: that is a folder; give out= a file path, e.g. "
         f"{tmp_path / 'empty' / 'predictions.csv'}"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as error:
            predict(_cfg(ckpt=ckpt, **kwargs))
        assert str(error.value) == message
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"

    def walk_into_a_locked_folder(top, onerror):  # as os.walk does for a folder it may not list (tests run as root)
        yield str(top), ["locked"], []
        onerror(PermissionError(13, "Permission denied", str(top / "locked")))

    monkeypatch.setattr("fgvr.commands.predict.os.walk", walk_into_a_locked_folder)
    with pytest.raises(ConfigError) as error:
        predict(_cfg(ckpt=ckpt, input=str(tmp_path / "empty")))
    assert str(error.value) == (f"input={tmp_path / 'empty'}: cannot read {tmp_path / 'empty' / 'locked'} (Permission "
                                "denied); fix its permissions or predict on another folder")
    assert not list(tmp_path.glob("*.csv.tmp*")) and not (tmp_path / "no").exists()


def test_checkpoints_that_cannot_predict(runs, tmp_path):
    """selector=oracle needs ground-truth boxes; a file that is not an fgvr checkpoint, or whose
    weights do not fit its config, is refused by the checkpoint's loader in one line."""
    image = str(sorted((runs["root"] / "images").rglob("*.jpg"))[0])
    state = checkpoint.load(runs["center"] / "checkpoints" / "last.pt")
    state["config"]["selector"] = {"_target_": "fgvr.models.selectors.OracleSelector"}  # its modules: as center's
    checkpoint.atomic_save(state, tmp_path / "oracle.pt")
    with pytest.raises(ConfigError) as error:
        predict(_cfg(ckpt=str(tmp_path / "oracle.pt"), input=image, out=str(tmp_path / "p.csv"), top_k=2))
    assert str(error.value) == (f"ckpt={tmp_path / 'oracle.pt'}: its selector=oracle crops each image's ground-truth "
                                "box, which new images do not have; predict with a run of another selector")
    del state["model"]["head.fc.weight"]
    state["config"]["selector"] = {"_target_": "fgvr.models.selectors.CenterSelector"}
    checkpoint.atomic_save(state, tmp_path / "other.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "bare.pt")
    for name, message in [("other.pt", "its weights do not fit the model its config builds"),
                          ("bare.pt", "not a checkpoint of fgvr train (no model, config, classes, epoch, step")]:
        with pytest.raises(FgvrError) as error:
            predict(_cfg(ckpt=str(tmp_path / name), input=image, out=str(tmp_path / "p.csv"), top_k=2))
        assert str(error.value).startswith(f"{tmp_path / name}: {message}") and "\n" not in str(error.value)
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow  # three `fgvr predict` subprocesses (~20 s); predict() itself is tested in-process above
def test_predict_command_exit_codes(runs, photos, tmp_path):
    proc = fgvr("predict", f"ckpt={runs['center']}", f"input={photos}", "top_k=2", cwd=tmp_path, check=False)
    out = tmp_path / "predictions.csv"
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "fgvr predict: error: 2 of 20 images failed (unreadable; each logged above, its reason in the error column); "
        "the predictions of the others are in predictions.csv")
    assert len(_read_csv(out)) == 20 and sum(1 for r in _read_csv(out) if r["error"]) == 2
    image = sorted(photos.rglob("*.jpg"))[-1]
    fgvr("predict", f"ckpt={runs['center']}", f"input={image}", "format=jsonl", "tta=flip", "top_k=3", cwd=tmp_path)
    assert json.loads((tmp_path / "predictions.jsonl").read_text())["error"] is None
    for args, message in [([f"input={tmp_path / 'nope'}"], f"input={tmp_path / 'nope'}: no such file or folder"),
                          ([f"input={image}", "top_k=9"], "top_k=9: the checkpoint has 3 classes; pass top_k=3 or "
                                                          "less")]:
        proc = fgvr("predict", f"ckpt={runs['center']}", *args, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == f"fgvr predict: error: {message}", proc.stderr
