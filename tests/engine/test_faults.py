"""Faults and hostile files: each ends in one line, runs no code, and keeps the run's record."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fgvr.commands.eval import evaluate_checkpoint
from fgvr.data.dataset import ImageDataset
from fgvr.data.readers import read_cub
from fgvr.data.transforms import eval_transform
from fgvr.runtime import checkpoint
from fgvr.runtime.config import EvalConfig
from fgvr.runtime.errors import ConfigError, DataError, FgvrError
from fgvr.runtime.rundir import RunDir
from tests.conftest import TINY, fgvr


class Planted:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path, wrap: bool = True) -> Path:
    payload = {"model": {}, "config": Planted(marker), "classes": [], "epoch": 0, "step": 0} if wrap \
        else Planted(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("wrap", [True, False])
def test_a_planted_pickle_never_runs_as_a_checkpoint(train_run, tmp_path, wrap):
    from fgvr.commands.viz import visualise
    from fgvr.runtime.config import VizConfig

    marker = tmp_path / "pwned"
    bad = plant(tmp_path / "evil" / "checkpoints" / "last.pt", marker, wrap)
    (tmp_path / "evil" / "results.json").write_text("{}")  # looks like a run dir
    for load in (lambda: checkpoint.load(bad),
                 lambda: evaluate_checkpoint(EvalConfig(ckpt=str(bad.parent.parent))),
                 lambda: visualise(VizConfig(ckpt=str(bad), n=1)),
                 lambda: train_run("trainer.epochs=1", f"resume={bad}")):
        with pytest.raises(FgvrError, match="refused to load: it holds pickled objects"):
            load()
        assert not marker.exists()


def test_a_planted_pickle_never_runs_as_backbone_weights(train_run, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "weights.pth"
    torch.save({"patch_embed.proj.weight": Planted(marker)}, bad)
    with pytest.raises(ConfigError) as error:
        train_run("trainer.epochs=1", f"backbone.checkpoint={bad}")
    assert "refused: it holds pickled objects" in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_a_planted_pickle_never_runs_from_the_command_line(tmp_path):
    marker = tmp_path / "pwned"
    bad = plant(tmp_path / "x.pt", marker)
    proc = fgvr("eval", f"ckpt={bad}", f"out={tmp_path / 'e.json'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "refused to load" in proc.stderr
    assert not marker.exists()


def test_checkpoints_are_weights_only_files(train_run):
    _, run_dir = train_run("trainer.epochs=1", "trainer.ema_decay=0.9")
    state = torch.load(RunDir(run_dir).last, weights_only=True)  # no allow-list: tensors and plain values only
    assert state["epoch"] == 1 and isinstance(state["rng"][0]["numpy"]["key"], torch.Tensor)


def test_checkpoints_of_the_previous_format_still_load_and_resume(train_run, tmp_path):
    """Before weights-only checkpoints, NumPy's RNG state was stored as an array."""
    _, run_dir = train_run("trainer.epochs=1")
    state = torch.load(RunDir(run_dir).last, weights_only=True)
    np.random.seed(7)
    expected = np.random.random(3)
    np.random.seed(7)
    state["rng"] = [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}]
    torch.save(state, RunDir(run_dir).last)
    np.random.seed(0)
    checkpoint.set_rng_state(checkpoint.load(RunDir(run_dir).last)["rng"][0])
    assert np.allclose(np.random.random(3), expected)
    results, _ = train_run("trainer.epochs=2")  # resumes from it
    assert results["status"] == "finished" and results["steps"] == 10


def test_rng_state_round_trips():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = checkpoint.rng_state()
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


def test_eval_of_weights_that_do_not_fit_their_config(train_run, tmp_path):
    _, run_dir = train_run("trainer.epochs=1")
    state = checkpoint.load(RunDir(run_dir).last)
    state["config"]["backbone"]["kwargs"]["embed_dim"] = 48  # as if trained with a narrower model
    state["ema"] = None
    torch.save(state, RunDir(run_dir).last)
    with pytest.raises(FgvrError) as error:
        evaluate_checkpoint(EvalConfig(ckpt=str(run_dir)))
    message = str(error.value)
    assert "\n" not in message and "its weights do not fit the model its config builds" in message
    assert "shape of " in message and "in the file" in message and "backbone=vit_tiny_patch16_224" in message
    bare = tmp_path / "bare.pt"
    torch.save(state["model"], bare)
    with pytest.raises(FgvrError, match=r"not a checkpoint of fgvr train \(no model, config, classes, epoch, step; "
                       r"it holds 56 entries: backbone"):
        checkpoint.load(bare)


def test_backbone_weights_that_do_not_fit(train_run, tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "other.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}, weights,
              metadata={"timm_model": "x", "img_size": "9"})
    with pytest.raises(ConfigError) as error:
        train_run("trainer.epochs=1", f"backbone.checkpoint={weights}")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"backbone.checkpoint={weights}: its tensors do not match")
    assert "size mismatch" in message and "saved from timm model x at img_size 9" in message


def test_disk_full_while_saving_a_checkpoint(train_run, tmp_path, monkeypatch):
    """ENOSPC while writing last.pt: one line with the path and the space needed, no temporary
    file left, the previous last.pt intact, results.json `failed`."""
    _, run_dir = train_run("trainer.epochs=1")
    previous = RunDir(run_dir).last.read_bytes()
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f.name).name.startswith(".last.pt"):  # the end of epoch 2 meets a full disk
            f.write(b"partial")
            try:  # as torch reports it: a RuntimeError while handling the OSError
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2060608") from None
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(FgvrError) as error:
        train_run("trainer.epochs=2")
    assert str(error.value).startswith(f"{RunDir(run_dir).last}: no space left on the device (about ")
    assert "MB needed" in str(error.value) and "\n" not in str(error.value)
    assert not [p for p in run_dir.rglob(".*tmp*")]
    assert RunDir(run_dir).last.read_bytes() == previous  # still the run of epoch 1, and resumable
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "no space left" in results["error"]


def test_a_failing_cost_measurement_never_fails_a_finished_run(train_run, monkeypatch):
    from fgvr.engine import trainer

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "measure_cost", out_of_memory)
    results, run_dir = train_run("trainer.epochs=1")
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["status"] == "finished" and saved["test_acc"] == results["test_acc"] is not None
    assert saved["cost"] is None and saved["cost_error"].startswith("OutOfMemoryError: CUDA out of memory")


def test_a_truncated_test_image_is_skipped_and_not_counted(train_run, cub_root):
    test_images = [line.split()[0] for line in (cub_root / "train_test_split.txt").read_text().splitlines()
                   if line.split()[1] == "0"]
    paths = dict(line.split() for line in (cub_root / "images.txt").read_text().splitlines())
    bad = cub_root / "images" / paths[test_images[0]]
    bad.write_bytes(bad.read_bytes()[:200])
    data = ["data=cub", f"data.root={cub_root}", "data.batch_size=4", "trainer.epochs=1"]
    with pytest.raises(DataError, match=f"{bad}: truncated image"):  # without skip_bad: after training
        train_run(*data)
    results, _ = train_run(*data, "data.skip_bad=true")  # the same run dir: switched on to evaluate it
    assert results["status"] == "finished" and results["steps"] == 2  # no training again
    assert results["test_images"] == len(test_images) - 1
    assert results["skipped_images"] == {"train": 0, "val": 0, "test": 1}


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 not a jpeg at all \xff\xd9"])
def test_a_bad_train_image_in_a_worker_ends_in_one_line_within_seconds(tmp_path, cub_root, content):
    images = sorted((cub_root / "images").rglob("*.jpg"))
    images[1].write_bytes(content)
    start = time.perf_counter()
    proc = fgvr("train", *[o for o in TINY if not o.startswith(("data.synth", "data.num_workers"))], "data=cub",
                f"data.root={cub_root}", "data.check_counts=false", "data.num_workers=1", "data.batch_size=4",
                f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    took = time.perf_counter() - start
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert str(images[1]) in proc.stderr and "Exception ignored" not in proc.stderr
    assert took < 25  # no 30 s wait for the workers at exit
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and str(images[1]) in results["error"]


def test_backbone_weights_of_another_model_are_not_loaded_silently(train_run, tmp_path):
    """timm drops the classifier and then loads non-strictly: a file of another model would load
    nothing and train from scratch without a word."""
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    with pytest.raises(ConfigError) as error:
        train_run("trainer.epochs=1", f"backbone.checkpoint={weights}")
    assert str(error.value).startswith(f"backbone.checkpoint={weights}: its tensors do not match the model (missing ")


def test_boxes_outside_their_image_are_clipped_or_unknown(train_run, cub_root):
    """A box past the image's edge (an image smaller than its box) or of negative size is not an error:
    the part inside the image, or no box."""
    from PIL import Image

    paths = dict(line.split() for line in (cub_root / "images.txt").read_text().splitlines())
    Image.new("RGB", (16, 16), (200, 30, 30)).save(cub_root / "images" / paths["1"])  # its box is 8..24
    boxes = (cub_root / "bounding_boxes.txt").read_text().splitlines()
    boxes[1] = "2 8.0 8.0 -5 -5"
    (cub_root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    results, _ = train_run("data=cub", f"data.root={cub_root}", "data.batch_size=4", "trainer.epochs=1")
    assert results["status"] == "finished" and results["test_images"] == 6
    splits = read_cub(cub_root)
    boxes = {Path(records.paths[i]).name: ImageDataset(records, eval_transform(32, 1.0))[i][2]
             for records in (splits.train, splits.test) for i in range(len(records))}
    clipped, negative = boxes[Path(paths["1"]).name], boxes[Path(paths["2"]).name]
    assert clipped.tolist() == [0.5, 0.5, 1.0, 1.0]  # 8..16 of a 16 px image: the part inside
    assert torch.isnan(negative).all()  # no box


def test_ctrl_c_saves_at_the_step_and_ends_in_one_line(tmp_path):
    """Ctrl-C (SIGINT, also to the loader workers) stops like a preemption: last.pt at the step in
    flight, results.json `interrupted`, one line, exit 130; the relaunch resumes."""
    from tests.engine.test_trainer import _reached, _stop

    run_dir = tmp_path / "run"
    args = ["train", *TINY, "trainer.epochs=4", "trainer.log_every=1", "data.synth.train_per_class=40",
            "data.num_workers=1", f"hydra.run.dir={run_dir}"]
    code, out = _stop(args, tmp_path, signal.SIGINT, ready=lambda: _reached(run_dir, 3))
    assert code == 130 and "Traceback" not in out and "Error executing job" not in out, out
    assert out.strip().splitlines()[-1].startswith(f"fgvr train: error: {run_dir}: stopped by SIGINT at step ")
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGINT"
    assert checkpoint.load(RunDir(run_dir).last)["step"] == stopped["steps"] >= 3
    fgvr(*args, cwd=tmp_path)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    from fgvr.runtime import files

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    monkeypatch.setattr(files, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(FgvrError) as error:
        files.write_text_atomic(tmp_path / "eval_test.json", "{}")
    assert str(error.value) == f"{tmp_path / 'eval_test.json'}: cannot write (Read-only file system)"
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(FgvrError, match="cannot write into this run dir \\(Read-only file system\\)"):
        with RunDir(tmp_path).locked():
            pass
