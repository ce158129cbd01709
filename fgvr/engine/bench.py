"""`fgvr bench [overrides]`: how fast the run that `fgvr train` would make with the same
overrides trains and evaluates, and where a training step's time goes.

Each measurement follows `bench.warmup` untimed steps:
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
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from fgvr.data.dataset import DataWait, build_loaders
from fgvr.engine.cost import measure_cost
from fgvr.engine.evaluate import evaluate
from fgvr.engine.optim import build_optimizer, optimizer_step
from fgvr.engine.session import autocast_dtype, peak_mem_mb, resolve_device, seed_everything, to_device
from fgvr.models.model import build_model, source_scale
from fgvr.runtime import distributed
from fgvr.runtime.config import BenchConfig, check_values
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


class StepTimer:
    """Marks the phase boundaries of steps without synchronising: CUDA events on a GPU, the host
    clock elsewhere. `phases_ms()` waits for the device once and gives each phase's median."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda, self.enabled = device.type == "cuda", enabled
        self.steps: list[list[tuple[str, object]]] = []

    def start(self) -> None:
        if self.enabled:
            self.steps.append([])
            self.mark("start")

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.cuda:
            point = torch.cuda.Event(enable_timing=True)
            point.record()
        else:
            point = time.perf_counter()
        self.steps[-1].append((phase, point))

    def phases_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        times = defaultdict(list)
        for marks in self.steps:
            for (_, a), (phase, b) in zip(marks, marks[1:]):
                times[phase].append(a.elapsed_time(b) if self.cuda else 1e3 * (b - a))
        return {phase: statistics.median(ms) for phase, ms in times.items()}


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
    amp = autocast_dtype(t.precision, device)
    seed_everything(cfg.seed, t.deterministic)
    loaders = build_loaders(cfg.data, cfg.paths.cache_dir, cfg.seed, pin_memory=device.type == "cuda",
                            scale=source_scale(cfg))
    num_classes = len(loaders.classes)
    model = build_model(cfg, num_classes).to(device)
    channels_last = device.type == "cuda" and not model.backbone.is_transformer
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, device, cfg.optim.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    forward = torch.compile(model) if t.compile else model
    autocast = lambda: torch.autocast(device.type, dtype=amp, enabled=amp is not None)  # noqa: E731

    untimed = StepTimer(device, enabled=False)

    def train_step(images: torch.Tensor, labels: torch.Tensor, truth: torch.Tensor,
                   timer: StepTimer = untimed) -> None:
        """One step as the trainer takes it (without accumulation)."""
        timer.start()
        with autocast():
            logits, _ = forward(images, truth)
            loss = criterion(logits.float(), labels)
        timer.mark("forward")
        scaler.scale(loss).backward()
        timer.mark("backward")
        optimizer_step(optimizer, scaler, model, t.grad_clip)
        timer.mark("optimizer")

    def timed(fn, steps: int) -> float:
        """Seconds for `steps` calls of fn, the device drained before and after."""
        distributed.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        distributed.synchronize(device)
        return time.perf_counter() - start

    bs, size = cfg.data.batch_size, round(cfg.data.img_size * model.source_scale)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, num_classes, (bs,), device=device)
    truth = torch.full((bs, 4), float("nan"), device=device)  # no boxes: selector=oracle takes whole images
    eval_images = images[torch.arange(cfg.data.eval_batch_size or 2 * bs, device=device) % bs]  # the loaders' batch
    out: dict = {
        "backbone": cfg.backbone.name, **{g: choices.get(g, "none") for g in ("selector", "texture", "head")},
        "dataset": cfg.data.name, "img_size": cfg.data.img_size, "batch_size": bs, "eval_batch_size": len(eval_images),
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp],
        "compile": t.compile, "grad_checkpointing": t.grad_checkpointing,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "workers": loaders.train.num_workers,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # The model alone. With torch.compile the first call compiles: its time less a step's.
    model.train()
    first = timed(lambda: train_step(images, labels, truth), 1)
    timed(lambda: train_step(images, labels, truth), b.warmup - 1)
    timer = StepTimer(device)
    seconds = timed(lambda: train_step(images, labels, truth, timer), b.steps)
    phases = timer.phases_ms()
    out["model_train_img_per_s"] = bs * b.steps / seconds
    out["compile_s"] = round(first - seconds / b.steps, 2) if t.compile else None

    # The whole loop: the same steps from the train loader, epoch after epoch.
    def epochs():
        for epoch in itertools.count():
            loaders.train.sampler.set_epoch(epoch)
            yield from loaders.train

    def loop_step() -> None:
        batch = next(batches)
        train_step(*to_device(batch.images, batch.labels, device, channels_last), batch.boxes.to(device))

    batches = iter(waited := DataWait(epochs()))
    timed(loop_step, b.warmup)
    waited.seconds = 0.0
    seconds = timed(loop_step, b.steps)
    out["train_img_per_s"] = bs * b.steps / seconds
    out["data_wait_pct"] = 100 * waited.seconds / seconds
    peak = peak_mem_mb(device)  # the training peak, before evaluation's own allocations

    # Evaluation: a device-resident batch, then the test loader (its workers warmed up first).
    model.eval()

    def eval_step() -> None:
        with torch.no_grad(), autocast():
            model(eval_images, truth[:1].expand(len(eval_images), 4))

    timed(eval_step, b.warmup)
    out["model_eval_img_per_s"] = len(eval_images) * b.eval_steps / timed(eval_step, b.eval_steps)
    evaluate(model, loaders.test, device, amp, b.warmup, channels_last)
    out["eval_img_per_s"] = evaluate(model, loaders.test, device, amp, b.eval_steps, channels_last)["img_per_s"]

    # The data pipeline alone.
    batches = iter(epochs())
    timed(lambda: next(batches), b.warmup)
    out["data_img_per_s"] = bs * b.steps / timed(lambda: next(batches), b.steps)

    # Costs: FLOPs per stage, and the selection + crop timed apart (cost.py), within the forward.
    cost = measure_cost(model, images, labels, amp, reps=3, truth=truth)
    select_crop = cost.get("select_ms", 0.0) + cost.get("crop_ms", 0.0)
    step_ms = sum(phases.values())
    out["step_ms"] = {
        "data_wait": 1e3 * waited.seconds / b.steps, "forward": phases["forward"] - select_crop,
        "select_crop": select_crop, "backward": phases["backward"], "optimizer": phases["optimizer"],
        "model_step": step_ms, "loop_step": 1e3 * bs / out["train_img_per_s"],
    }
    out["select_crop_pct"] = 100 * select_crop / step_ms if model.selector is not None else None
    out["texture_pct"] = 100 * cost["texture_ms"] / step_ms if "texture_ms" in cost else None
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
    if isinstance(value, float):
        return round(value, 4 if abs(value) < 10 else 1)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def format_table(r: dict) -> str:
    """The short summary `fgvr bench` prints."""
    s = r["step_ms"]
    mfu = f"MFU {r['mfu_pct']:.1f} % of {r['peak_tflops']:g} TFLOP/s" if r["mfu_pct"] is not None else \
        "MFU n/a (no known peak: bench.peak_tflops=...)"
    lines = [
        f"fgvr bench: {r['backbone']}, selector={r['selector']} texture={r['texture']} head={r['head']} | "
        f"{r['dataset']}, {r['img_size']} px, batch {r['batch_size']}, {r['precision']} on {r['device']} "
        f"({r['threads']} threads, "
        f"{r['workers']} loader workers){' | compiled in %.1f s' % r['compile_s'] if r['compile_s'] else ''}",
        f"  {'':<24}{'img/s':>9}{'ms/batch':>10}",
        *(f"  {name:<24}{rate:>9.1f}{1e3 * batch / rate:>10.1f}" for name, rate, batch in (
            ("train, whole loop", r["train_img_per_s"], r["batch_size"]),
            ("train, model alone", r["model_train_img_per_s"], r["batch_size"]),
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

