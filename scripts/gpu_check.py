"""The GPU check: what only a GPU shows, measured in one command on one H100/H200 in under 8 minutes
through fgvr's own machinery (the composed configs, engine/session.py's Session and step, `fgvr
bench`, the DDP setup), printed as a summary and written as JSON:

  precision  bf16 and fp32 losses of ViT-B/16 GLSim over the same 50 steps (one seed, the same batches)
             agree: the largest relative difference of a step's loss, against a stated tolerance
  sync       torch.cuda.set_sync_debug_mode("error") around training steps after warm-up raises in none,
             for the plain model, GLSim, the Gabor branch and the methods TransFG, FFVT, IELT and CAL
  ddp        a DDP run with NCCL over the GPUs present, started by torchrun; with one GPU a world of one
             that still joins the NCCL group and wraps the model in DDP (its gradients are all-reduced)
  loader     the train loader's img/s with 16 workers on generated 1000 x 750 JPEGs at 448 px, decoding
             every epoch and from data.cache=decoded
  speed      `fgvr bench` of ViT-B/16 at 224 and 448 px, plain and GLSim, eager and torch.compile: img/s,
             MFU and peak memory (the compiled runs last, the 448 px ones first, as long as time is left)

Each part runs in its own time box (`--budget` seconds for all, the speed part taking what the others
leave); a part that fails or runs out of time records its error and the others go on. The exit code
is 0 only if every part passed.

    python3 scripts/gpu_check.py --out gpu_check.json                   # on the GPU machine
    .venv/bin/python scripts/gpu_check.py --cpu-smoke --out smoke.json  # every part, tiny, on the CPU
    .venv/bin/python scripts/gpu_check.py wheels                        # -> outputs/gpu_wheels/

The CPU smoke runs each part with a 4-block ViT at 32-48 px, 2-3 steps, 2 workers, gloo for NCCL,
and a dispatch-mode trap on host reads (`.item()`, `nonzero`) in place of CUDA's sync debug mode;
it leaves out the compiled runs (inductor takes ~40 s per model on a CPU).

The GPU machines have python3 3.12 with torch, torchvision, timm, OpenCV, NumPy, SciPy and PyYAML, but
no package registry and none of hydra-core, omegaconf and albumentations: `wheels` downloads those and
what they need (WHEELS, the versions of the environment running it; ~8 MiB) into outputs/gpu_wheels/,
which travels with the working tree. wandb and submitit are not needed: the runs log nowhere
(logger=none) and no SLURM job is read. fgvr itself is not installed there: this script puts the
repository on sys.path.

On the day a GPU is lent, after `wheels` here: the device tool's `run` with carry ["outputs/gpu_wheels"],
timeout_s 540 and this command (RUN below; `wheels` prints it), the report and the log coming back in $OUT:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
    --target /tmp/site outputs/gpu_wheels/*.whl || exit 3; export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1; nvidia-smi -L; python3 scripts/gpu_check.py
    --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

(`--parts speed --budget 300` added measures one part again)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fgvr from this checkout, installed or not

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fgvr.runtime.distributed import Dist  # noqa: E402

WHEEL_DIR = REPO / "outputs" / "gpu_wheels"
# What the GPU machines lack of what fgvr imports there: hydra-core, omegaconf, albumentations and the
# packages they need (typing-extensions: pydantic needs a newer one than an image may hold).
WHEELS = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "albumentations", "albucore", "pydantic",
          "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "stringzilla", "simsimd")
COMPILED = ("pydantic-core", "stringzilla", "simsimd")  # wheels built for CPython 3.12 on x86-64 Linux
# The GPU machines' own packages among fgvr's dependencies, with what they need (there, their versions of it).
GPU_IMAGE = ("torch", "torchvision", "timm", "numpy", "scipy", "pyyaml", "opencv-python-headless", "pillow",
             "packaging", "safetensors", "rich", "matplotlib")

RUN = {
    "command": "set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
               "--target /tmp/site outputs/gpu_wheels/*.whl || exit 3; export PYTHONPATH=/tmp/site "
               "PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1; nvidia-smi -L; python3 scripts/gpu_check.py "
               "--out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log",
    "carry": [str(WHEEL_DIR.relative_to(REPO))],
    "timeout_s": 540,
}

PARTS = ("precision", "sync", "ddp", "loader", "speed")
PLAIN = ("selector=none", "head=linear")
GLSIM = ("selector=glsim", "head=aggregator")


@dataclass(frozen=True)
class Scale:
    """How large each part runs: on the GPU, or tiny for the CPU smoke."""

    mode: str  # gpu | cpu-smoke
    device: str  # cuda | cpu
    vit: tuple[str, ...]  # the backbone of every run but CAL's
    cnn: tuple[str, ...]  # CAL's
    synth: tuple[str, ...]  # the generated training set (data=synth) of every part but the loader's
    precision: tuple[int, int, int, float]  # size, batch, steps, the tolerance on a step's relative loss difference
    sync: tuple[int, int, int, int]  # size, batch, warm-up steps, guarded steps
    texture: tuple[str, ...]  # the Gabor branch's settings at this scale
    ddp: tuple[int, int, int]  # size, batch, steps
    loader: tuple[int, int, int, int]  # size, batch, workers, timed batches
    jpegs: tuple[int, int, int, int]  # width, height, distinct images, copies of each
    speed: tuple[tuple[int, tuple[str, ...], bool], ...]  # the bench runs, in order: size, selector and head, compiled
    speed_batch: int
    bench: tuple[str, ...]  # how long `fgvr bench` measures
    boxes: tuple[tuple[str, float], ...]  # seconds for each part but the speed part
    budget: float  # seconds for everything


GPU = Scale(
    mode="gpu", device="cuda",
    vit=("backbone=vit_b16", "backbone.pretrained=false"),
    cnn=("backbone=resnet50", "backbone.pretrained=false"),
    synth=("data.synth.train_per_class=100", "data.synth.test_per_class=10"),
    precision=(224, 32, 50, 0.05), sync=(224, 8, 2, 3), texture=(), ddp=(224, 32, 5),
    loader=(448, 64, 16, 48), jpegs=(1000, 750, 48, 48),
    speed=(*((size, arch, False) for size in (224, 448) for arch in (PLAIN, GLSIM)),  # then compiled, 448 px first
           (448, GLSIM, True), (448, PLAIN, True), (224, GLSIM, True), (224, PLAIN, True)),
    speed_batch=64, bench=("bench.warmup=3", "bench.steps=10", "bench.eval_steps=3"),
    boxes=(("precision", 75), ("sync", 75), ("ddp", 75), ("loader", 75)), budget=450,
)
CPU = Scale(
    mode="cpu-smoke", device="cpu",
    vit=("backbone=vit_micro",),
    cnn=("backbone=resnet_micro",),
    synth=("data.synth.num_classes=4", "data.synth.train_per_class=12", "data.synth.test_per_class=4",
           "data.synth.image_size=48"),
    precision=(32, 8, 3, 0.05), sync=(32, 4, 1, 2), texture=("texture.region_size=16", "texture.kernel_size=7"),
    ddp=(32, 4, 2), loader=(48, 8, 2, 4), jpegs=(160, 120, 10, 4),
    speed=((32, PLAIN, False), (48, GLSIM, False)), speed_batch=8,
    bench=("bench.warmup=1", "bench.steps=2", "bench.eval_steps=1", "data.num_workers=0"),
    boxes=(("precision", 120), ("sync", 120), ("ddp", 120), ("loader", 120)), budget=900,
)


class PartTimeout(Exception):
    """A part ran past its time box."""


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in the main thread once `seconds` have passed."""

    def expire(signum, frame):
        raise PartTimeout(f"ran past its time box of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Context:
    """What the parts share: the scale, the device and a scratch folder (generated data, caches)."""

    scale: Scale
    device: torch.device
    work: Path
    deadline: float  # time.monotonic() by which everything ends

    def overrides(self, *extra: str, size: int, batch: int, synth: bool = True) -> list[str]:
        """A run's overrides: this scale's ViT on its generated set (unless `extra` names other data)."""
        return [*self.scale.vit, f"data.img_size={size}", f"data.batch_size={batch}", f"paths.cache_dir={self.work}",
                f"trainer.device={self.device.type}", "logger=none", *(self.scale.synth if synth else ()), *extra]


def compose(overrides: list[str], config: str = "train"):
    """The real config tree composed as `fgvr train` (or `fgvr bench`) composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fgvr.runtime.config import config_dir, register_schemas

    register_schemas(bench=config == "bench")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return hydra_compose(config, overrides=overrides)


def step_batches(session, count: int) -> list:
    """The first `count` optimiser steps' batches of the session's train loader, epoch after epoch."""
    steps = (batches for epoch in itertools.count() for batches in session.epoch(epoch))
    return list(itertools.islice(steps, count))


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# The parts. Each fills `rec` as it goes (what it measured stays when it fails) and returns its verdict.

def check_precision(ctx: Context, rec: dict) -> bool:
    """The same steps in fp32 and bf16 from the same weights and batches: per-step losses agree."""
    from fgvr.engine.session import Session

    size, batch, steps, tolerance = ctx.scale.precision
    overrides = ctx.overrides(*GLSIM, "backbone.drop_path_rate=0", "head.dropout=0", "data.num_workers=0", size=size,
                              batch=batch)
    rec |= {"config": overrides, "steps": steps, "tolerance": tolerance}
    batches, losses = None, {}
    for precision in ("fp32", "bf16"):
        with Session(compose([*overrides, f"trainer.precision={precision}"]), ctx.device) as session:
            batches = batches or step_batches(session, steps)
            sums = [session.step(b)["loss"] / sum(len(x.labels) for x in b) for b in batches]
            losses[precision] = torch.stack(sums).tolist()
        free_memory()
    fp32, bf16 = (torch.tensor(losses[p], dtype=torch.float64) for p in ("fp32", "bf16"))
    relative = (bf16 - fp32).abs() / fp32.abs()
    rec |= {"loss_fp32": losses["fp32"], "loss_bf16": losses["bf16"], "max_rel_diff": relative.max().item(),
            "mean_rel_diff": relative.mean().item()}
    return bool(torch.isfinite(fp32).all() and torch.isfinite(bf16).all() and relative.max() <= tolerance)


class HostReadTrap(TorchDispatchMode):
    """The CPU's stand-in for CUDA's sync debug mode: fails on the ops that read a tensor's values back
    to the host (on a GPU each is a blocking copy), except while `paused`."""

    READS = ("aten::_local_scalar_dense", "aten::nonzero")  # .item(), bool(), int() of a tensor: the first
    paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS and not self.paused:
            raise RuntimeError(f"host read in a training step: {func._schema.name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_syncs(device: torch.device) -> Iterator[None]:
    """Make a host-device sync raise: CUDA's sync debug mode on a GPU, HostReadTrap on the CPU. The trap
    pauses in the optimiser's step: fgvr's is fused on CUDA, where it reads nothing back, but the CPU's
    foreach one reads its step counts."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    trap = HostReadTrap()
    hooks = [register_optimizer_step_pre_hook(lambda *_: setattr(trap, "paused", True)),
             register_optimizer_step_post_hook(lambda *_: setattr(trap, "paused", False))]
    try:
        with trap:
            yield
    finally:
        for hook in hooks:
            hook.remove()


def sync_configs(scale: Scale) -> dict[str, list[str]]:
    return {"plain": [*PLAIN], "glsim": [*GLSIM], "gabor": ["texture=gabor", *scale.texture],
            "transfg": ["method=transfg"], "ffvt": ["method=ffvt"], "ielt": ["method=ielt"],
            "cal": ["method=cal", *scale.cnn]}


def check_sync(ctx: Context, rec: dict) -> bool:
    """Training steps (the batches already on pinned host memory, as the loader leaves them) with
    every host-device sync made an error, after warm-up steps without."""
    from fgvr.engine.session import Session
    from fgvr.runtime import distributed

    size, batch, warmup, guarded = ctx.scale.sync
    rec |= {"mode": "cuda sync debug mode" if ctx.device.type == "cuda" else "host-read trap (CPU)",
            "warmup": warmup, "steps": guarded, "configs": {}}
    for name, extra in sync_configs(ctx.scale).items():
        run = rec["configs"][name] = {"config": extra, "ok": False}
        began = time.perf_counter()
        try:
            cfg = compose(ctx.overrides(*extra, "data.num_workers=0", size=size, batch=batch))
            with Session(cfg, ctx.device) as session:
                batches = step_batches(session, warmup + guarded)
                for b in batches[:warmup]:
                    session.step(b)
                distributed.synchronize(ctx.device)
                with no_syncs(ctx.device):
                    totals = [session.step(b)["loss"] for b in batches[warmup:]]
                run |= {"ok": True, "loss": torch.stack(totals).sum().item()}
        except PartTimeout:
            raise
        except Exception as e:
            run["error"] = first_line(e)
        run["seconds"] = round(time.perf_counter() - began, 1)
        free_memory()
    return all(r["ok"] for r in rec["configs"].values())


class WorldOfOne(Dist):
    """The one rank of a one-process DDP run: enabled, so that setup() joins a process group and Session
    wraps the model in DDP (on one GPU, NCCL's init and all-reduce still run)."""

    @property
    def enabled(self) -> bool:
        return True


def ddp_worker(scale: Scale, work: Path) -> None:
    """One torchrun rank: joins the group (fgvr's setup: NCCL on CUDA, gloo on the CPU), trains a few
    steps on its shard, evaluates over all ranks, and writes what it saw to work/ddp/rank<r>.json."""
    import torch.distributed as torch_dist

    from fgvr.engine.session import Session
    from fgvr.runtime import distributed

    dist = distributed.from_env()
    dist = WorldOfOne() if dist.world_size == 1 else dist
    device = distributed.setup(dist, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        size, batch, steps = scale.ddp
        ctx = Context(scale, device, work, math.inf)
        cfg = compose(ctx.overrides(*PLAIN, "data.num_workers=0", size=size, batch=batch))
        with Session(cfg, device, dist) as session:
            losses = [session.step(b)["loss"].item() for b in step_batches(session, steps)]
            test = session.evaluate(session.loaders.test, limit=2)
            weights = torch.cat([p.detach().flatten().double().sum()[None] for p in session.model.parameters()])
            ranks = torch.tensor([float(dist.rank + 1)], device=device)
            distributed.all_reduce_(ranks, dist)
            out = {"rank": dist.rank, "world_size": dist.world_size, "backend": str(torch_dist.get_backend()),
                   "device": str(device), "ddp": type(session.ddp).__name__, "losses": losses,
                   "test_images": test["images"], "rank_sum": ranks.item(), "weights": weights.sum().item()}
        (work / "ddp" / f"rank{dist.rank}.json").write_text(json.dumps(out))
    finally:
        distributed.teardown()


def check_ddp(ctx: Context, rec: dict) -> bool:
    """torchrun over the GPUs present (2 processes on the CPU), each running ddp_worker; the ranks agree."""
    procs = torch.cuda.device_count() if ctx.device.type == "cuda" else 2
    work = ctx.work / "ddp"
    work.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               str(Path(__file__).resolve()), "ddp-worker", "--work", str(ctx.work),
               *(["--cpu-smoke"] if ctx.scale.device == "cpu" else [])]
    rec |= {"processes": procs, "command": " ".join(command[1:])}
    # Its own process group, so that a time box ending kills torchrun's workers too.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(ctx.deadline - time.monotonic(), 1))
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob("rank*.json"))]
    rec |= {"returncode": proc.returncode, "ranks": ranks}
    if proc.returncode != 0:
        rec["output_tail"] = output[-3000:]
        raise RuntimeError(f"torchrun exited with {proc.returncode}: {output.strip().splitlines()[-1:]}")
    expected = "nccl" if ctx.device.type == "cuda" else "gloo"
    total = procs * (procs + 1) / 2
    return (len(ranks) == procs and all(r["backend"] == expected and r["ddp"] == "DistributedDataParallel"
                                        and r["rank_sum"] == total and all(map(math.isfinite, r["losses"]))
                                        for r in ranks)
            and len({r["weights"] for r in ranks}) == 1 and len({r["test_images"] for r in ranks}) == 1)


def endless(loader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def write_photos(root: Path, scale: Scale) -> Path:
    """data=folder JPEGs of width x height: `distinct` photo-like images (scripts/bench_baselines.py's),
    each hard-linked `copies` times; decoding one costs what decoding a different one would."""
    from bench_baselines import write_jpegs

    width, height, distinct, copies = scale.jpegs
    originals = write_jpegs(root / "originals", distinct, size=(width, height))
    for path in originals.rglob("*.jpg"):
        folder = root / "data" / path.parent.relative_to(originals)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            os.link(path, folder / f"{path.stem}_{k}.jpg")
    return root / "data"


def check_loader(ctx: Context, rec: dict) -> bool:
    """fgvr's train loader alone (decode, augment, collate, pinning on CUDA), with and without the
    decoded cache: img/s over `timed` batches after its workers' queues are full and drained."""
    from fgvr.data.dataset import build_loaders

    size, batch, workers, timed = ctx.scale.loader
    start = time.perf_counter()
    root = write_photos(ctx.work / "photos", ctx.scale)
    rec |= {"images": ctx.scale.jpegs, "write_s": round(time.perf_counter() - start, 1), "size": size,
            "batch": batch, "timed_batches": timed}
    for cache in ("none", "decoded"):
        cfg = compose(ctx.overrides("data=folder", f"data.root={root}", f"data.num_workers={workers}",
                                    f"data.cache={cache}", "data.check_counts=false", size=size, batch=batch,
                                    synth=False))
        start = time.perf_counter()
        loaders = build_loaders(cfg.data, cfg.paths.cache_dir, cfg.seed, pin_memory=ctx.device.type == "cuda")
        with loaders:
            built = time.perf_counter() - start
            loader = loaders.train
            warmup = loader.num_workers * (loader.prefetch_factor or 0) + 2  # what the workers hold, then some
            stream = endless(loader)
            for _ in range(warmup):
                next(stream)
            start, images = time.perf_counter(), 0
            for _ in range(timed):
                images += len(next(stream).labels)
            rec[cache] = {"img_per_s": round(images / (time.perf_counter() - start), 1), "build_s": round(built, 2),
                          "workers": loader.num_workers, "train_images": len(loader.dataset)}
    return all(rec[c]["img_per_s"] > 0 for c in ("none", "decoded"))


def check_speed(ctx: Context, rec: dict) -> bool:
    """`fgvr bench` of each run (bf16 on CUDA): img/s, MFU, peak memory. Runs that the time box leaves
    no room for are listed as not reached."""
    from fgvr.engine.bench import bench

    rec["runs"] = [{"img_size": size, "selector": arch[0].split("=")[1], "compile": compiled, "error": "not reached"}
                   for size, arch, compiled in ctx.scale.speed]
    for run, (size, arch, compiled) in zip(rec["runs"], ctx.scale.speed):
        del run["error"]
        if compiled:
            torch._dynamo.reset()  # a fresh compile: no earlier run's guards, no sizes marked dynamic
        cfg = compose(ctx.overrides(*arch, *ctx.scale.bench, f"trainer.compile={str(compiled).lower()}",
                                    size=size, batch=ctx.scale.speed_batch), config="bench")
        choices = {"selector": run["selector"], "head": arch[1].split("=")[1]}
        try:
            run["bench"] = bench(cfg, choices)
        except PartTimeout:
            run["error"] = "not finished in the time box"
            raise
        except Exception as e:
            run["error"] = first_line(e)
        free_memory()
    return all(r.get("bench", {}).get("model_train_img_per_s", 0) > 0 for r in rec["runs"])


CHECKS: dict[str, Callable[[Context, dict], bool]] = {
    "precision": check_precision, "sync": check_sync, "ddp": check_ddp, "loader": check_loader, "speed": check_speed}


def run_checks(scale: Scale, parts: list[str], budget: float, work: Path, out: Path | None = None) -> dict:
    """Every part in turn, each in its time box; the speed part gets what the others leave. The report
    goes to `out` after each part, so that a run stopped from outside leaves what it measured."""
    from fgvr.runtime.device import resolve_device
    from fgvr.runtime.tracker import versions, write_json

    start = time.monotonic()
    device = resolve_device(scale.device)
    report = {"mode": scale.mode, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "gpus": torch.cuda.device_count(), "versions": versions(),
              "budget_s": budget, "parts": {}}
    boxes = dict(scale.boxes)
    for name in parts:
        left = budget - (time.monotonic() - start)
        box = min(boxes.get(name, left), left)
        rec = report["parts"][name] = {"status": "skipped", "box_s": round(box)}
        if box < 1:
            rec["error"] = "no time left in the budget"
            continue
        ctx = Context(scale, device, work, time.monotonic() + box)
        print(f"\n=== {name} (time box {box:.0f} s)", flush=True)
        began = time.monotonic()
        try:
            with time_box(box):
                rec["status"] = "passed" if CHECKS[name](ctx, rec) else "failed"
        except PartTimeout as e:
            rec |= {"status": "timeout", "error": str(e)}
        except Exception as e:
            rec |= {"status": "error", "error": first_line(e)}
        rec["seconds"] = round(time.monotonic() - began, 1)
        free_memory()
        report |= {"seconds": round(time.monotonic() - start, 1), "packages": imported_packages(),
                   "passed": all(p["status"] == "passed" for p in report["parts"].values())}
        if out is not None:
            write_json(out, report)
    return report


def imported_packages() -> dict[str, str]:
    """The installed distributions (name: version) of the modules this process imported."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    names = {d for m in list(sys.modules) for d in owners.get(m.partition(".")[0], [])}
    return {re.sub(r"[-_.]+", "-", n).lower(): metadata.version(n) for n in sorted(names) if n != "fgvr"}


def summary(report: dict) -> str:
    """The readable summary printed at the end."""
    lines = [f"GPU check ({report['mode']}) on {report['device']}, torch {report['versions']['torch']}: "
             f"{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s"]
    for name, p in report["parts"].items():
        lines.append(f"  {name:<10}{p['status']:<9}{p.get('seconds', 0):>6.0f} s  {p.get('error', '')}")
        if name == "precision" and "max_rel_diff" in p:
            lines.append(f"{'':12}bf16 vs fp32 over {p['steps']} steps: max relative loss difference "
                         f"{p['max_rel_diff']:.4f} (mean {p['mean_rel_diff']:.4f}, tolerance {p['tolerance']})")
        if name == "sync":
            lines += [f"{'':12}{c:<9}{'no sync' if r['ok'] else r.get('error', '')}" for c, r in p.get("configs",
                                                                                                    {}).items()]
        if name == "ddp" and p.get("ranks"):
            r = p["ranks"][0]
            lines.append(f"{'':12}{len(p['ranks'])} process(es), {r['backend']}, {r['ddp']}, losses "
                         f"{', '.join(f'{x:.4g}' for x in r['losses'])}")
        if name == "loader":
            lines += [f"{'':12}data.cache={c:<8}{p[c]['img_per_s']:>9.1f} img/s, {p[c]['workers']} workers (built in "
                      f"{p[c]['build_s']:.1f} s)" for c in ("none", "decoded") if c in p]
        if name == "speed":
            lines.append(f"{'':12}{'px':>4} {'selector':<9}{'compile':<8}{'img/s model':>12}{'loop':>9}{'MFU %':>7}"
                         f"{'peak MB':>9}{'compile s':>10}")
            for r in p.get("runs", []):
                b = r.get("bench")
                if b:
                    mfu = f"{b['mfu_pct']:>7.1f}" if b["mfu_pct"] is not None else f"{'n/a':>7}"
                    measured = (f"{b['model_train_img_per_s']:>12.1f}{b['train_img_per_s']:>9.1f}{mfu}"
                                f"{b['peak_mem_mb']:>9.0f}{b['compile_s'] or 0:>10.0f}")
                else:
                    measured = f"  {r.get('error', 'not reached')}"
                lines.append(f"{'':12}{r['img_size']:>4} {r['selector']:<9}{str(r['compile']):<8}{measured}")
    return "\n".join(lines)


def download_wheels(folder: Path = WHEEL_DIR) -> list[Path]:
    """WHEELS, at this environment's versions, into `folder` (replacing what it held): the compiled ones
    for CPython 3.12 on x86-64 Linux, the pure-Python ones as any (antlr4's built from its sdist)."""
    from importlib import metadata

    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    pip = [sys.executable, "-m", "pip", "-q"]
    with tempfile.TemporaryDirectory(dir=folder.parent if folder.parent.is_dir() else None) as tmp:
        compiled = [p for p in pins if p.split("==")[0] in COMPILED]
        platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                     for a in ("--platform", p)]
        subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                        "--implementation", "cp", *platforms, "-d", tmp, *compiled], check=True)
        subprocess.run([*pip, "wheel", "--no-deps", "-w", tmp, *(p for p in pins if p not in compiled)], check=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tmp, folder)
    return sorted(folder.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="check", choices=("check", "wheels", "ddp-worker"),
                        help="check: run the parts (default); wheels: download WHEELS; ddp-worker: one rank of ddp")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true", help="every part, tiny, on the CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--budget", type=float, help="seconds for all parts (default: 450 on a GPU)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    scale = CPU if args.cpu_smoke else GPU
    if args.command == "wheels":
        wheels = download_wheels()
        for w in wheels:
            print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
        print(f"{sum(w.stat().st_size for w in wheels) / 2**20:8.2f} MiB in {len(wheels)} wheels, {WHEEL_DIR}")
        print(f"the device tool's run: {json.dumps(RUN)}")
        return 0
    if args.command == "ddp-worker":
        ddp_worker(scale, args.work)
        return 0
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: no part {unknown[0]}; choose from {', '.join(PARTS)}")
    if scale.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; --cpu-smoke runs every part on the CPU")
    if scale.device == "cpu":
        torch.set_num_threads(1)  # tiny models: a second thread buys nothing, and costs much on a busy machine
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        report = run_checks(scale, parts, args.budget or scale.budget, work, args.out)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + summary(report), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
