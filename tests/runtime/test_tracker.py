import json
import logging
import os
import signal
import threading
import time

from omegaconf import OmegaConf

from fgvr.runtime import checkpoint
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


def test_a_run_stopped_by_a_signal_continues_its_wandb_run(train_run, tmp_path):
    """SIGUSR2 in the middle of an epoch: the run saves, tells W&B it is preempting, and the
    relaunch continues the same W&B run from that step."""
    run_dir = tmp_path / "run"

    def signal_at_step_2():
        metrics = run_dir / "metrics.jsonl"
        while not metrics.exists() or not any(e.get("step", 0) >= 2 for e in read_events(metrics)):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR2)

    threading.Thread(target=signal_at_step_2, daemon=True).start()
    stopped, _ = train_run("logger=wandb", "trainer.log_every=1", "data.synth.train_per_class=80", run_dir=run_dir)
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGUSR2"
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == stopped["steps"] and state["position"] > 0
    resumed, _ = train_run("logger=wandb", "trainer.log_every=1", "data.synth.train_per_class=80", run_dir=run_dir)
    assert resumed["status"] == "finished"
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.stem.removeprefix("run-") for f in files} == {state["wandb_id"]}


def test_other_ranks_write_nothing(tmp_path):
    logger = RunLogger(RunInfo(tmp_path, "x"), OmegaConf.create({"name": "wandb"}), {}, enabled=False)
    logger.log(step=1, split="train", loss=1.0)
    logger.event("resumed", step=1)
    logger.finish({"status": "finished"})
    assert list(tmp_path.iterdir()) == [] and logger.wandb_id is None


def test_resume_drops_events_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    events = [{"step": s, "split": sp} for s, sp in [(5, "train"), (10, "val"), (15, "train"), (10, "test")]]
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"step": 20, "spl')  # cut by a kill
    assert len(read_events(path)) == 4
    logger = RunLogger(RunInfo(tmp_path, "x"), OmegaConf.create({"name": "none"}), {}, resume_step=10)
    logger.log(step=11, split="train", loss=float("nan"))
    logger.finish({"status": "finished"})
    assert read_events(path) == events[:2] + [{"step": 11, "split": "train", "loss": None}]
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "finished"}


def test_write_json_is_atomic(tmp_path):
    write_json(tmp_path / "r.json", {"a": 1})
    write_json(tmp_path / "r.json", {"a": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
