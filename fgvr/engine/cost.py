"""What a model costs: forward FLOPs of each stage and the selector's share of a training step.

Measured once, at the end of a run, on one training batch (so the training loop itself never
synchronises for it); results.json keeps it under `cost`."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fgvr.models.model import FGVRModel


def stage_flops(model: FGVRModel, image: torch.Tensor) -> dict[str, float]:
    """Forward GFLOPs per image of each stage (matmuls and convolutions, as torch counts them)."""

    def count(fn: Callable):
        with FlopCounterMode(display=False) as counter:
            out = fn()
        return out, counter.get_total_flops() / 1e9

    model.eval()
    with torch.no_grad():
        source, x = model.prepare(image)
        tokens, flops = count(lambda: model.first_pass(x))
        out = {"first_pass": flops}
        crop_feat = None
        if model.selector is not None:
            selection, out["selection"] = count(lambda: model.selector(tokens, x.shape[-2:]))
            crop_tokens, out["second_pass"] = count(lambda: model.second_pass(source, selection.boxes))
            crop_feat = crop_tokens.pooled
        _, out["head"] = count(lambda: model.head(tokens.pooled, crop_feat))
    out["total"] = sum(out.values())
    return {k: round(v, 6) for k, v in out.items()}


def _median_ms(fn: Callable, device: torch.device, reps: int, setup: Callable = lambda: None) -> float:
    """Median wall time of fn(setup()) over reps after one warm-up, synchronising around fn only."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps + 1):
        arg = setup()
        sync()
        start = time.perf_counter()
        fn(arg)
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def measure_cost(model: FGVRModel, images: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None,
                 reps: int = 5) -> dict:
    """Stage FLOPs, the time of a training step (forward + backward) on this batch, and of the
    selection alone (the selector's call on the first pass's tokens). Leaves no gradients behind."""
    device = images.device
    autocast = lambda: torch.autocast(device.type, dtype=amp, enabled=amp is not None)  # noqa: E731
    cost: dict = {"gflops_per_image": stage_flops(model, images[:1]), "batch_size": len(images)}
    model.eval()  # no dropout, and batch-norm statistics stay as trained

    def step(_) -> None:
        with autocast():
            logits, _ = model(images)
            F.cross_entropy(logits.float(), labels).backward()

    cost["step_ms"] = round(_median_ms(step, device, reps), 3)
    model.zero_grad(set_to_none=True)
    if model.selector is not None:
        def first_pass():
            with torch.no_grad(), autocast():
                _, x = model.prepare(images)
                return model.first_pass(x), x.shape[-2:]

        def select(arg) -> None:
            tokens, hw = arg
            with autocast():
                model.selector(tokens, hw)

        cost["select_ms"] = round(_median_ms(select, device, reps, setup=first_pass), 4)
        cost["select_share_pct"] = round(100 * cost["select_ms"] / cost["step_ms"], 4)
    return cost
