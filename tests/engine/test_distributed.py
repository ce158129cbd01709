"""Several processes, one run: sharding, learning-rate scaling and DDP with gloo on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
import torch
from omegaconf import OmegaConf

from fgvr.commands.eval import evaluate_checkpoint
from fgvr.data.dataset import EpochSampler
from fgvr.engine.optim import scaled_lr
from fgvr.runtime import checkpoint, distributed
from fgvr.runtime.config import EvalConfig
from fgvr.runtime.errors import ConfigError
from fgvr.runtime.tracker import read_events
from tests.conftest import FGVR, TINY


def _keys(sampler: EpochSampler) -> list[int]:
    return [i for i, _ in sampler]


@pytest.mark.parametrize("n", [10, 11])
def test_training_shards_are_the_single_process_order_dealt_out(n):
    whole = EpochSampler(n, shuffle=True, seed=3, pad=True)
    shards = [EpochSampler(n, shuffle=True, seed=3, rank=r, world_size=2, pad=True) for r in range(2)]
    for s in (whole, *shards):
        s.set_epoch(5)
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)  # padded: every rank runs the same number of steps
    dealt = [x for pair in zip(*map(_keys, shards)) for x in pair]
    assert dealt[:n] == _keys(whole) and set(dealt) == set(range(n))


def test_resumed_shards_continue_where_they_stopped():
    full = [EpochSampler(20, shuffle=True, seed=0, rank=r, world_size=2, pad=True) for r in range(2)]
    tail = [EpochSampler(20, shuffle=True, seed=0, rank=r, world_size=2, pad=True) for r in range(2)]
    for a, b in zip(full, tail):
        a.set_epoch(1)
        b.set_epoch(1, start=8)  # 2 steps of 2 per rank done
        assert _keys(b) == _keys(a)[4:]


def test_evaluation_shards_count_every_image_once():
    shards = [EpochSampler(11, shuffle=False, rank=r, world_size=3) for r in range(3)]
    keys = [k for s in shards for k in _keys(s)]
    assert sorted(keys) == list(range(11)) and [len(s) for s in shards] == [4, 4, 3]


def test_learning_rate_scaling():
    cfg = OmegaConf.create({"lr": 0.01, "lr_scale": "none", "lr_batch_size": None})
    assert scaled_lr(cfg, step_batch=64, batch_size=16) == 0.01
    cfg.lr_scale = "linear"
    assert scaled_lr(cfg, 64, 16) == pytest.approx(0.04)
    cfg.lr_scale, cfg.lr_batch_size = "sqrt", 256
    assert scaled_lr(cfg, 64, 16) == pytest.approx(0.005)


def test_cpus_are_shared_between_the_ranks_of_a_machine(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.cpus_per_process() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})  # pinned by SLURM: its own set
    assert distributed.cpus_per_process() == 3


def test_devices_are_refused_inside_a_multi_task_job(monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(ConfigError, match=r"trainer.devices=2: this process is already one of 4 ranks"):
        distributed.launch_local(print, (), 2)


def test_two_processes_train_like_one_with_their_combined_batch(train_run, tmp_path):
    """DDP over 2 gloo processes with 16 images each per step learns what one process learns with
    32; the test accuracy is over the whole test set, and one set of run files is written."""
    single, single_dir = train_run("data.batch_size=32", "trainer.deterministic=true", run_dir=tmp_path / "one")
    ddp, ddp_dir = train_run("trainer.devices=2", "trainer.deterministic=true", run_dir=tmp_path / "two")
    assert ddp["status"] == "finished" and ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["steps"] == single["steps"]
    assert ddp["test_acc"] == pytest.approx(single["test_acc"]) and ddp["test_loss"] == pytest.approx(
        single["test_loss"], rel=1e-4)
    one = checkpoint.load(single_dir / "checkpoints" / "last.pt")["model"]
    two = checkpoint.load(ddp_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)

    test = [e for e in read_events(ddp_dir / "metrics.jsonl") if e.get("split") == "test"]
    assert len(test) == 1  # rank 0 alone writes
    assert sorted(p.name for p in ddp_dir.iterdir()) == sorted(p.name for p in single_dir.iterdir())
    again = evaluate_checkpoint(EvalConfig(ckpt=str(ddp_dir), device="cpu"))
    assert again["acc"] == ddp["test_acc"] and again["images"] == 32  # not one rank's 16


@pytest.mark.slow
def test_two_processes_stop_on_a_signal_and_resume(train_run, tmp_path, stray_signals):
    """SIGUSR2 to the launching process reaches both workers; they stop at the same step, rank 0
    saves, and the resumed run ends where an uninterrupted 2-process run ends."""
    args = ("trainer.devices=2", "trainer.deterministic=true", "trainer.epochs=4", "trainer.log_every=1",
            "data.synth.train_per_class=80")  # 9 steps an epoch
    whole, _ = train_run(*args, run_dir=tmp_path / "whole")
    run_dir = tmp_path / "cut"
    sent, done = threading.Event(), threading.Event()

    def signal_at_step_3():  # the workers are other processes: this process learns their step from metrics.jsonl
        metrics = run_dir / "metrics.jsonl"
        while not done.is_set():
            if metrics.exists() and any(e.get("step", 0) >= 3 for e in read_events(metrics)):
                os.kill(os.getpid(), signal.SIGUSR2)  # one that lands after the run is caught by stray_signals
                sent.set()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=signal_at_step_3, daemon=True)
    thread.start()
    try:
        stopped, _ = train_run(*args, run_dir=run_dir)
    finally:
        done.set()
        thread.join()
    assert sent.is_set() and stray_signals == []  # it reached the run, not the test's guard
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGUSR2" and stopped["steps"] >= 3
    assert stopped["steps"] < 9 and checkpoint.load(run_dir / "checkpoints" / "last.pt")["position"] == 32 * stopped[
        "steps"]  # mid-epoch
    resumed, _ = train_run(*args, run_dir=run_dir)
    assert (resumed["test_acc"], resumed["steps"]) == (whole["test_acc"], whole["steps"])
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    ["selector=glsim", "head=aggregator"],
    ["texture=gabor", "texture.region_size=16", "selector=random", "texture.fusion=token"],
    ["backbone=resnet50", "backbone.name=test_resnet", "backbone.pretrained=false", "selector=glsim"],
    ["trainer.ema_decay=0.9", "trainer.accum_steps=2", "selector=rollout"],
    ["method=transfg", "method.overlap_stride=6"],
    ["method=ffvt", "trainer.precision=bf16"],
    ["method=ielt", "method.update_warm=0", "trainer.ema_decay=0.9"],
    ["method=cal", "backbone=resnet_micro", "trainer.precision=bf16"],
], ids=["glsim", "gabor", "cnn", "ema-accum-rollout", "transfg", "ffvt-bf16", "ielt-ema", "cal-bf16"])
def test_every_method_trains_over_two_processes(train_run, method):
    """DDP needs every parameter to get a gradient and every buffer to be broadcastable (else a
    rank fails); each step takes both ranks' 16 images, and the test set is evaluated over the
    two ranks' shards, each image once."""
    results, run_dir = train_run("trainer.devices=2", *method)
    accum = 2 if "trainer.accum_steps=2" in method else 1
    assert results["status"] == "finished" and results["world_size"] == 2
    assert results["steps"] == 2 * (44 // 16 // accum)  # 2 epochs; 88 train images, 44 a rank, 16 a batch
    assert results["test_images"] == 32 and results["test_loss"] > 0
    evals = [e["split"] for e in read_events(run_dir / "metrics.jsonl") if e.get("split", "train") != "train"]
    assert evals == ["val", "val", "test"]  # rank 0 alone writes
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())
    assert (state["ema"] is not None) == ("trainer.ema_decay=0.9" in method)


def test_torchrun_ranks_form_one_run(tmp_path):
    """The documented torchrun usage: each rank composes the config, all share hydra.run.dir."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(FGVR.with_name("torchrun")), "--nproc_per_node", "2", "-m", "fgvr.cli", "train",
                           *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["world_size"] == 2
    assert results["steps"] == 2 * 2 and results["test_images"] == 32  # 32 images a step; each test image once
    assert (run_dir / "train.log").read_text().count("test acc") == 1  # rank 0 alone logs
