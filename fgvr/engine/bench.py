"""`fgvr bench [overrides]`: how fast the run that `fgvr train` would make with the same
overrides trains and evaluates, and where a training step's time goes.

The training steps are the trainer's own (engine/session.py: Session.step, accumulation, EMA
and the compiled model included), so the bench measures what `fgvr train` runs. Each
measurement follows `bench.warmup` untimed steps:
- model: training steps on one batch resident on the device (the model alone), split into
  forward / backward / optimizer, with the selection and crop timed on their own;
- loop: the same steps fed by the real train loader (decode, augment, collate, host-to-device
  copy), and the share of the time spent waiting for it;
- eval: evaluation batches, on a device-resident batch and from the test loader;
- data: the train loader alone, no model.
Then peak memory, achieved FLOP/s and, on a GPU with a known peak, model FLOPs utilisation.
On CUDA the phases of a step are timed with CUDA events, so no timed loop waits for the device
before its end; on the CPU the work is done when each call returns and the host clock times it."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from fgvr.data.dataset import Batch, DataWait
from fgvr.engine.cost import measure_cost
from fgvr.engine.session import Session, StepTimer
from fgvr.runtime import distributed
from fgvr.runtime.config import BenchConfig, check_values
from fgvr.runtime.device import peak_mem_mb, resolve_device
from fgvr.runtime.errors import ConfigError
from fgvr.runtime.tracker import write_json

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: (bf16/fp16 tensor cores, fp32 without
# TF32). Matched against torch.cuda.get_device_name in this order; bench.peak_tflops overrides.
PEAK_TFLOPS = (
    ("H200", (989.0, 67.0)),
    ("H100 PCIe", (756.0, 51.0)),
    ("H100 NVL", (835.0, 60.0)),
    ("H100", (989.0, 67.0)),  # SXM
    ("A100", (312.0, 19.5)),
    ("L40S", (362.0, 91.6)),
)


def peak_tflops(device: torch.device, amp: torch.dtype | None, override: float | None) -> float | None:
    """The device's dense peak for the run's precision, or None where it is not known (CPUs)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((p for key, p in PEAK_TFLOPS if key in name), None)
    return None if peaks is None else peaks[0 if amp is not None else 1]


def bench(cfg: DictConfig, choices: dict[str, str] | None = None) -> dict:
    """Measure the composed run (see the module docstring); prints a table and returns the
    numbers (also written to bench.out if set). `choices`: Hydra's group choices, for the record."""
    check_values(cfg, BenchConfig)
    choices = choices or {}
    t, b = cfg.trainer, cfg.bench
    if t.devices > 1:
        raise ConfigError("trainer.devices: fgvr bench measures one process; drop trainer.devices (img/s scale "
                          "with the processes of a DDP run as long as the data keeps up)")
    device = resolve_device(t.device)
    with Session(cfg, device) as session:
        return _measure(session, cfg, b, choices)


def _measure(session: Session, cfg: DictConfig, b: DictConfig, choices: dict[str, str]) -> dict:
    device, model, amp = session.device, session.model, session.amp

    def timed(fn, steps: int) -> float:
        """Seconds for `steps` calls of fn, the device drained before and after."""
        distributed.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        distributed.synchronize(device)
        return time.perf_counter() - start

    bs, size = cfg.data.batch_size, round(cfg.data.img_size * model.source_scale)
    step_images = bs * session.accum_steps  # a step's images: its accum_steps micro-batches
    fmt = torch.channels_last if session.channels_last else torch.contiguous_format
    images = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, session.num_classes, (bs,), device=device)
    truth = torch.full((bs, 4), float("nan"), device=device)  # no boxes: selector=oracle takes whole images
    resident = [Batch(images, labels, truth, 0)] * session.accum_steps
    eval_images = images[torch.arange(session.loaders.test.batch_size, device=device) % bs]  # the loaders' batch
    out: dict = {
        "backbone": cfg.backbone.name,
        **{g: choices.get(g, "none") for g in ("method", "selector", "texture", "head")},
        "dataset": cfg.data.name, "img_size": cfg.data.img_size, "batch_size": bs,
        "accum_steps": session.accum_steps, "eval_batch_size": len(eval_images),
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp],
        "compile": cfg.trainer.compile, "grad_checkpointing": cfg.trainer.grad_checkpointing,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "workers": session.loaders.train.num_workers,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # The model alone: the trainer's step on a device-resident batch (a compiled model compiles in the first).
    model.train()
    timed(lambda: session.step(resident), b.warmup)
    timer = StepTimer(device)
    seconds = timed(lambda: session.step(resident, timer), b.steps)
    phases = timer.phases_ms()
    out["model_train_img_per_s"] = step_images * b.steps / seconds
    out["compile_s"] = round(session.compile_s, 2) if session.compile_s is not None else None

    # The whole loop: the same steps from the train loader, epoch after epoch.
    def epochs():
        for epoch in itertools.count():
            yield from session.epoch(epoch)

    batches = iter(waited := DataWait(epochs()))
    timed(lambda: session.step(next(batches)), b.warmup)
    waited.seconds = 0.0
    seconds = timed(lambda: session.step(next(batches)), b.steps)
    out["train_img_per_s"] = step_images * b.steps / seconds
    out["data_wait_pct"] = 100 * waited.seconds / seconds
    peak = peak_mem_mb(device)  # the training peak, before evaluation's own allocations

    # Evaluation: a device-resident batch, then the test loader (its workers warmed up first).
    model.eval()

    def eval_step() -> None:
        with torch.no_grad(), session.autocast():
            session.eval_model(eval_images, truth[:1].expand(len(eval_images), 4))

    timed(eval_step, b.warmup)
    out["model_eval_img_per_s"] = len(eval_images) * b.eval_steps / timed(eval_step, b.eval_steps)
    session.evaluate(session.loaders.test, b.warmup)
    out["eval_img_per_s"] = session.evaluate(session.loaders.test, b.eval_steps)["img_per_s"]

    # The data pipeline alone.
    def loader_batches():
        for epoch in itertools.count():
            session.loaders.train.sampler.set_epoch(epoch)
            yield from session.loaders.train

    data = iter(loader_batches())
    timed(lambda: next(data), b.warmup)
    out["data_img_per_s"] = bs * b.steps / timed(lambda: next(data), b.steps)

    # Costs: FLOPs per stage, and the selection + crop timed apart (cost.py), within the forward.
    cost = measure_cost(model, images, labels, amp, reps=3, truth=truth)
    select_crop = cost.get("select_ms", 0.0) + cost.get("crop_ms", 0.0)
    step_ms = sum(phases.values())
    out["step_ms"] = {
        "data_wait": 1e3 * waited.seconds / b.steps, "forward": phases["forward"] - select_crop * session.accum_steps,
        "select_crop": select_crop * session.accum_steps, "backward": phases["backward"],
        "optimizer": phases["optimizer"], "model_step": step_ms, "loop_step": 1e3 * step_images / out["train_img_per_s"],
    }
    out["select_crop_pct"] = 100 * out["step_ms"]["select_crop"] / step_ms if model.selector is not None else None
    out["texture_pct"] = 100 * cost["texture_ms"] * session.accum_steps / step_ms if "texture_ms" in cost else None
    out["gflops_per_image"] = cost["gflops_per_image"]
    out["train_tflops"] = 3 * cost["gflops_per_image"]["total"] * out["model_train_img_per_s"] / 1e3
    out["peak_tflops"] = peak_tflops(device, amp, b.peak_tflops)
    out["mfu_pct"] = 100 * out["train_tflops"] / out["peak_tflops"] if out["peak_tflops"] else None
    out["peak_mem_mb"] = round(peak, 1)
    out = _rounded(out)
    print(format_table(out))
    if b.out:
        write_json(Path(b.out), out)
    return out


def _rounded(value):
    """4 decimals (1 from 10 up); 3 significant digits under 0.01, so a small stage's FLOPs stay visible."""
    if isinstance(value, float):
        return float(f"{value:.3g}") if abs(value) < 0.01 else round(value, 4 if abs(value) < 10 else 1)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def format_table(r: dict) -> str:
    """The short summary `fgvr bench` prints."""
    s = r["step_ms"]
    mfu = f"MFU {r['mfu_pct']:.1f} % of {r['peak_tflops']:g} TFLOP/s" if r["mfu_pct"] is not None else \
        "MFU n/a (no known peak: bench.peak_tflops=...)"
    lines = [
        f"fgvr bench: {r['backbone']}, method={r['method']} selector={r['selector']} texture={r['texture']} "
        f"head={r['head']} | "
        f"{r['dataset']}, {r['img_size']} px, batch {r['batch_size']}"
        f"{' x %d accumulated' % r['accum_steps'] if r['accum_steps'] > 1 else ''}, {r['precision']} on {r['device']} "
        f"({r['threads']} threads, "
        f"{r['workers']} loader workers){' | compiled in %.1f s' % r['compile_s'] if r['compile_s'] else ''}",
        f"  {'':<24}{'img/s':>9}{'ms/step':>10}",  # train: an optimiser step; eval: a batch
        *(f"  {name:<24}{rate:>9.1f}{1e3 * batch / rate:>10.1f}" for name, rate, batch in (
            ("train, whole loop", r["train_img_per_s"], r["batch_size"] * r["accum_steps"]),
            ("train, model alone", r["model_train_img_per_s"], r["batch_size"] * r["accum_steps"]),
            ("eval, whole loop", r["eval_img_per_s"], r["eval_batch_size"]),
            ("eval, model alone", r["model_eval_img_per_s"], r["eval_batch_size"]),
            ("data pipeline alone", r["data_img_per_s"], r["batch_size"]))),
        f"  step (ms): data wait {s['data_wait']:.1f} | forward {s['forward']:.1f} | selector+crop "
        f"{s['select_crop']:.2f} | backward {s['backward']:.1f} | optimizer {s['optimizer']:.1f}"
        f"  (data wait {r['data_wait_pct']:.1f} % of the loop)",
        f"  {r['gflops_per_image']['total']:.2f} GFLOPs/image forward | {r['train_tflops']:.3f} TFLOP/s | {mfu} | "
        f"peak memory {r['peak_mem_mb']:.0f} MB",
    ]
    return "\n".join(lines)

