import errno
import json
import logging
import os
import signal

import pytest
from omegaconf import OmegaConf

from fgvr.runtime import checkpoint
from fgvr.runtime.errors import FgvrError
from fgvr.runtime.files import atomic_write
from fgvr.runtime.tracker import RunInfo, RunLogger, read_events, wandb_mode, write_json


def test_wandb_mode_never_prompts(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with caplog.at_level(logging.INFO):
        assert wandb_mode(None) == "offline"
    assert len(caplog.records) == 1 and "logging offline" in caplog.text
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(None) == "offline"


def test_resumed_run_continues_the_same_wandb_run(train_run):
    _, run_dir = train_run("trainer.epochs=1", "logger=wandb")
    last = run_dir / "checkpoints" / "last.pt"
    first_id = checkpoint.load(last)["wandb_id"]
    train_run("trainer.epochs=2", "logger=wandb")
    assert checkpoint.load(last)["wandb_id"] == first_id and checkpoint.load(last)["epoch"] == 2
    # Every launch wrote offline-run-<time>-<id>[-n]/run-<id>.wandb for the same id.
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files and {f.stem.removeprefix("run-") for f in files} == {first_id}


def test_a_run_stopped_by_a_signal_continues_its_wandb_run(train_run, monkeypatch, stray_signals):
    """SIGUSR2 in the middle of an epoch: the run saves, tells W&B it is preempting, and the
    relaunch continues the same W&B run from that step. (A run without its handler would leave the
    signal to stray_signals, not to the default action that ends the pytest process.)"""
    log = RunLogger.log

    def log_then_signal(self, **event):  # inside the training loop: the run's handler is installed
        log(self, **event)
        if event.get("split") == "train" and event["step"] == 2:
            signal.raise_signal(signal.SIGUSR2)

    monkeypatch.setattr(RunLogger, "log", log_then_signal)
    args = ("logger=wandb", "trainer.log_every=1", "data.synth.train_per_class=80")
    stopped, run_dir = train_run(*args)
    monkeypatch.setattr(RunLogger, "log", log)
    assert stray_signals == []
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGUSR2" and stopped["steps"] == 2
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 2 and state["position"] == 2 * 16  # at the step the signal came in
    resumed, _ = train_run(*args)
    assert resumed["status"] == "finished" and resumed["steps"] == 2 * 18  # 288 train images: 18 steps an epoch
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.stem.removeprefix("run-") for f in files} == {state["wandb_id"]}
    assert [e["event"] for e in read_events(run_dir / "metrics.jsonl") if "event" in e] == ["interrupted", "resumed"]


def test_other_ranks_write_nothing(tmp_path):
    wandb = OmegaConf.create({"_target_": "fgvr.runtime.tracker.init_wandb"})
    logger = RunLogger(RunInfo(tmp_path, "x"), wandb, {}, enabled=False)
    logger.log(step=1, split="train", loss=1.0)
    logger.event("resumed", step=1)
    logger.finish({"status": "finished"})
    assert list(tmp_path.iterdir()) == [] and logger.wandb_id is None


def test_resume_drops_events_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    events = [{"step": s, "split": sp} for s, sp in [(5, "train"), (10, "val"), (15, "train"), (10, "test")]]
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"step": 20, "spl')  # cut by a kill
    assert len(read_events(path)) == 4
    logger = RunLogger(RunInfo(tmp_path, "x"), OmegaConf.create({"_target_": None}), {}, resume_step=10)
    logger.log(step=11, split="train", loss=float("nan"))
    logger.finish({"status": "finished"})
    assert read_events(path) == events[:2] + [{"step": 11, "split": "train", "loss": None}]
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "finished"}


def _fail(error: BaseException):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("where", ["write", "interrupt", "fsync", "replace"])
def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch, where):
    """A write that fails half-way (a full disk), is interrupted (Ctrl-C), or fails to sync or to
    rename: the file keeps its old bytes, which a reader sees throughout, and no temporary file is left."""
    path = tmp_path / "results.json"
    write_json(path, {"status": "running", "test_acc": None})
    old = path.read_bytes()
    new = json.dumps({"status": "finished", "test_acc": 50.0}).encode()
    seen = []

    def write(f):
        f.write(new[: len(new) // 2])
        f.flush()
        seen.append(path.read_bytes())  # a reader in the middle of the write
        if where == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        if where == "interrupt":
            raise KeyboardInterrupt
        f.write(new[len(new) // 2:])

    if where in ("fsync", "replace"):
        monkeypatch.setattr(os, where, _fail(OSError(errno.EIO, "Input/output error")))
    expected = (KeyboardInterrupt, None) if where == "interrupt" else \
        (FgvrError, "no space left on the device" if where == "write" else "cannot write")
    with pytest.raises(expected[0], match=expected[1]):
        atomic_write(path, write)
    monkeypatch.undo()
    assert seen == [old] and path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_json(path, {"a": 2})  # and the next write goes through
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["results.json"]
