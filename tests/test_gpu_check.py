"""scripts/gpu_check.py: every part on the CPU (--cpu-smoke), what the GPU run needs beyond the GPU
machine's own packages, the sync trap that stands in for CUDA's sync debug mode, and failure isolation."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from importlib import metadata

import pytest
import torch
from packaging.requirements import Requirement

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def requirements_closure(roots) -> set[str]:
    """The distributions `roots` need on CPython 3.12 on Linux, themselves included, as installed here."""
    seen, todo = set(), [_name(Requirement(r).name) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"python_version": "3.12", "extra": ""}):
                todo.append(_name(req.name))
    return seen


def test_the_wheels_are_what_fgvr_needs_beyond_the_gpu_machines_packages(gpu_check):
    """fgvr's dependencies but those of commands the check does not run (wandb, the SLURM launcher, the
    Optuna sweeper, viz's Grad-CAM, export's ONNX packages), with everything they need: each is the GPU
    machine's or needed by one of its packages, or a carried wheel; and every wheel is needed
    (typing-extensions is carried anyway, for pydantic's minimum)."""
    unused = ("wandb", "hydra-submitit-launcher", "hydra-optuna-sweeper", "grad-cam", "onnx", "onnxscript",
              "onnxruntime")
    roots = [r for r in metadata.requires("fgvr") if Requirement(r).marker is None  # not the dev extra
             and _name(Requirement(r).name) not in unused]
    needed = requirements_closure(roots)
    present = requirements_closure(gpu_check.GPU_IMAGE)
    wheels = {_name(w) for w in gpu_check.WHEELS}
    assert needed - present <= wheels <= needed
    assert {"wandb", "submitit"}.isdisjoint(wheels) and set(gpu_check.COMPILED) <= wheels


def test_the_gpu_run_is_the_documented_command_over_the_issues_configurations(gpu_check):
    run = gpu_check.RUN
    assert len(run["command"]) < 2000 and run["command"] in " ".join(gpu_check.__doc__.split())
    assert run["carry"] == ["outputs/gpu_wheels"] and "outputs/gpu_wheels/*.whl" in run["command"]
    assert "scripts/gpu_check.py --out $OUT/" in run["command"] and run["timeout_s"] <= 600
    gpu = gpu_check.GPU  # the issue's runs: ViT-B/16, 224 and 448 px, plain and GLSim, eager and compiled
    assert gpu.vit == ("backbone=vit_b16", "backbone.pretrained=false") and gpu.precision[:3] == (224, 32, 50)
    assert {(size, arch[0], compiled) for size, arch, compiled in gpu.speed} == {
        (size, selector, compiled) for size in (224, 448) for selector in ("selector=none", "selector=glsim")
        for compiled in (False, True)}
    assert gpu.loader[0] == 448 and gpu.loader[2] == 16 and gpu.jpegs[:2] == (1000, 750)
    assert gpu.budget <= 450  # under 8 minutes with the imports and the wheels' install


def test_a_host_read_inside_a_step_fails_the_cpu_sync_trap(gpu_check):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)  # reads its step counts on the host
    x = torch.ones(4, 3)
    with gpu_check.no_syncs(torch.device("cpu")):
        model(x).square().sum().backward()
        optimizer.step()  # left to CUDA's fused optimiser, which reads nothing back
        for read in (lambda: model(x).sum().item(), lambda: torch.nonzero(x), lambda: bool(x.any())):
            with pytest.raises(RuntimeError, match="host read in a training step"):
                read()
    assert x.sum().item() == 12  # the trap ends with the block


def test_a_failing_part_is_recorded_and_the_others_go_on(gpu_check, monkeypatch, tmp_path):
    def boom(ctx, rec):
        rec["measured"] = 1
        raise ValueError("planted\nsecond line")

    def stuck(ctx, rec):
        time.sleep(30)

    monkeypatch.setattr(gpu_check, "CHECKS", {"precision": boom, "sync": stuck, "ddp": lambda ctx, rec: False,
                                              "loader": lambda ctx, rec: True})
    scale = dataclasses.replace(gpu_check.CPU, boxes=(("sync", 1.5),))
    start = time.monotonic()
    report = gpu_check.run_checks(scale, ["precision", "sync", "ddp", "loader"], 60, tmp_path, tmp_path / "r.json")
    assert time.monotonic() - start < 10
    parts = report["parts"]
    assert parts["precision"]["status"] == "error" and parts["precision"]["error"] == "ValueError: planted"
    assert parts["precision"]["measured"] == 1  # what it measured before it failed stays
    assert parts["sync"]["status"] == "timeout" and parts["ddp"]["status"] == "failed"
    assert parts["loader"]["status"] == "passed" and not report["passed"]
    assert json.loads((tmp_path / "r.json").read_text())["parts"] == parts


def test_a_sync_in_one_method_fails_its_row_only(gpu_check, monkeypatch, tmp_path):
    from fgvr.engine.session import Session

    step = Session.step

    def syncing(self, batches, timer=None):
        totals = step(self, batches, timer)
        if self.model.selector is not None:
            totals["loss"].item()
        return totals

    monkeypatch.setattr(Session, "step", syncing)
    monkeypatch.setattr(gpu_check, "sync_configs", lambda scale: {"plain": [*gpu_check.PLAIN],
                                                                 "glsim": [*gpu_check.GLSIM]})
    ctx = gpu_check.Context(gpu_check.CPU, torch.device("cpu"), tmp_path, math.inf)
    rec = {}
    assert not gpu_check.check_sync(ctx, rec)
    assert rec["configs"]["plain"]["ok"] and not rec["configs"]["glsim"]["ok"]
    assert rec["configs"]["glsim"]["error"] == "RuntimeError: host read in a training step: aten::_local_scalar_dense"


def test_one_process_still_joins_a_process_group_and_trains_under_ddp(gpu_check, monkeypatch, tmp_path):
    """One GPU: torchrun's world of one still runs NCCL's init and DDP's all-reduce (gloo here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(key, str(value))
    (tmp_path / "ddp").mkdir()
    gpu_check.ddp_worker(gpu_check.CPU, tmp_path)
    rank = json.loads((tmp_path / "ddp" / "rank0.json").read_text())
    assert rank["world_size"] == 1 and rank["backend"] == "gloo" and rank["ddp"] == "DistributedDataParallel"
    assert rank["rank_sum"] == 1 and len(rank["losses"]) == 2 and not torch.distributed.is_initialized()


def test_cpu_smoke_runs_every_part_from_real_steps(tmp_path, gpu_check):
    """The whole check, tiny, as the GPU machine would run it: no wandb or submitit there (blocked
    here), nothing imported that is neither the machine's nor a carried wheel."""
    blocked = tmp_path / "blocked"
    for name in ("wandb", "submitit"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--work",
                           str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GPU check (cpu-smoke) on cpu" in proc.stdout and "PASSED" in proc.stdout
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert report["passed"] and list(parts) == list(gpu_check.PARTS)
    assert all(p["status"] == "passed" and p["seconds"] > 0 for p in parts.values())

    p = parts["precision"]  # two precisions, the same steps
    fp32, bf16 = p["loss_fp32"], p["loss_bf16"]
    assert len(fp32) == len(bf16) == p["steps"] == 3 and all(map(math.isfinite, fp32 + bf16))
    assert fp32 != bf16 and p["max_rel_diff"] == pytest.approx(max(abs(b - f) / f for f, b in zip(fp32, bf16)))

    s = parts["sync"]
    assert set(s["configs"]) == {"plain", "glsim", "gabor", "transfg", "ffvt", "ielt", "cal"}
    assert all(c["ok"] and math.isfinite(c["loss"]) for c in s["configs"].values())

    d = parts["ddp"]  # two gloo processes in one DDP run
    assert d["processes"] == 2 and [r["rank"] for r in d["ranks"]] == [0, 1]
    for r in d["ranks"]:
        assert r["world_size"] == 2 and r["backend"] == "gloo" and r["ddp"] == "DistributedDataParallel"
        assert r["rank_sum"] == 3 and len(r["losses"]) == 2 and r["test_images"] > 0
    assert d["ranks"][0]["weights"] == d["ranks"][1]["weights"] and d["ranks"][0]["losses"] != d["ranks"][1]["losses"]

    ld = parts["loader"]
    assert ld["none"]["img_per_s"] > 0 and ld["decoded"]["img_per_s"] > 0
    assert ld["none"]["train_images"] == ld["decoded"]["train_images"] > 0

    runs = parts["speed"]["runs"]
    assert [(r["img_size"], r["selector"]) for r in runs] == [(32, "none"), (48, "glsim")]
    for r in runs:
        b = r["bench"]
        assert (b["img_size"], b["selector"]) == (r["img_size"], r["selector"])
        assert b["model_train_img_per_s"] > 0 and b["peak_mem_mb"] > 0 and b["mfu_pct"] is None  # no peak on a CPU

    packages = report["packages"]  # what ran, with its versions
    assert {"torch", "hydra-core", "albumentations", "pydantic-core"} <= set(packages)
    assert not {"wandb", "submitit"} & set(packages)
