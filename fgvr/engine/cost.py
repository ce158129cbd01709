"""What a model costs: forward FLOPs of each stage, and the selector's and the texture branch's
shares of a training step.

Measured once, at the end of a run, on one training batch (so the training loop itself never
synchronises for it); results.json keeps it under `cost`."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from fgvr.models.model import FGVRModel


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts its CUDA attention kernels but not the CPU one: count that with the same formula.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def stage_flops(model: FGVRModel, image: torch.Tensor, truth: torch.Tensor | None = None) -> dict[str, float]:
    """Forward GFLOPs per image of each stage (matmuls, convolutions and fused attention, as torch counts them)."""

    def count(fn: Callable):
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            out = fn()
        return out, counter.get_total_flops() / 1e9

    model.eval()
    with torch.no_grad():
        source, x = model.prepare(image)
        if model.method is not None:
            return _method_flops(model, x)
        tokens, flops = count(lambda: model.first_pass(x))
        out = {"first_pass": flops}
        crop_feat = texture_feat = boxes = None
        if model.selector is not None:
            selection, out["selection"] = count(lambda: model.selector(tokens, x.shape[-2:], truth))
            crop_tokens, out["second_pass"] = count(lambda: model.second_pass(source, selection.boxes))
            crop_feat, boxes = crop_tokens.pooled, selection.boxes
        if model.texture is not None:
            (texture_feat, _), out["texture"] = count(lambda: model.texture_pass(image, tokens, x.shape[-2:], boxes))
        _, out["head"] = count(lambda: model.classify(tokens.pooled, crop_feat, texture_feat))
    out["total"] = sum(out.values())
    return {k: round(v, 6) for k, v in out.items()}


def _method_flops(model: FGVRModel, x: torch.Tensor) -> dict[str, float]:
    """A method's forward GFLOPs per image by the stages it marks (Method.stage); the rest, the
    backbone's blocks, as `encoder`."""
    method = model.method
    method.stage_flops = {}
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        method.flop_counter = counter
        try:
            method(model.backbone, x)
        finally:
            method.flop_counter = None
    stages = {k: v / 1e9 for k, v in method.stage_flops.items()}
    out = {"encoder": counter.get_total_flops() / 1e9 - sum(stages.values()), **stages}
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
                 reps: int = 5, truth: torch.Tensor | None = None) -> dict:
    """Stage FLOPs, the time of a training step (forward + backward) on this batch, of the
    selection alone (the selector's call on the first pass's tokens), of the crop of its boxes
    (the second pass's input) and of the texture branch
    alone (its regions, filters and statistics, forward + backward, on the first pass's tokens).
    `truth`: the batch's ground-truth boxes (fractions of the image), for selector=oracle.
    Leaves no gradients behind. The model runs in eval mode (no state changes), so a method's FLOPs
    and step are its test-time forward's: for CAL the raw and crop passes, not its training
    forward's raw, crop and drop passes (about 1.5x the FLOPs)."""
    device = images.device
    autocast = lambda: torch.autocast(device.type, dtype=amp, enabled=amp is not None)  # noqa: E731
    truth = truth if truth is not None else images.new_full((len(images), 4), float("nan"), dtype=torch.float32)
    cost: dict = {"gflops_per_image": stage_flops(model, images[:1], truth[:1]), "batch_size": len(images)}
    model.eval()  # no dropout, and batch-norm statistics stay as trained

    def step(_) -> None:
        with autocast():
            logits, _ = model(images, truth)
            F.cross_entropy(logits.float(), labels).backward()

    cost["step_ms"] = round(_median_ms(step, device, reps), 3)

    def first_pass():
        with torch.no_grad(), autocast():
            source, x = model.prepare(images)
            return source, model.first_pass(x), x.shape[-2:]

    if model.selector is not None:
        def select(arg) -> None:
            _, tokens, hw = arg
            with autocast():
                model.selector(tokens, hw, truth)

        def crop_inputs():  # the crop source and the selector's boxes
            source, tokens, hw = first_pass()
            with torch.no_grad(), autocast():
                return source, model.selector(tokens, hw, truth).boxes

        def crop(arg) -> None:
            with autocast():
                model.crops(*arg)

        cost["select_ms"] = round(_median_ms(select, device, reps, setup=first_pass), 4)
        cost["select_share_pct"] = round(100 * cost["select_ms"] / cost["step_ms"], 4)
        cost["crop_ms"] = round(_median_ms(crop, device, reps, setup=crop_inputs), 4)
        cost["crop_share_pct"] = round(100 * cost["crop_ms"] / cost["step_ms"], 4)
    if model.texture is not None:
        def texture_inputs():  # the first pass's tokens, and the selector's boxes for regions=glsim
            _, tokens, hw = first_pass()
            with torch.no_grad(), autocast():
                boxes = model.selector(tokens, hw, truth).boxes if model.selector is not None else None
            return tokens, hw, boxes

        def texture(arg) -> None:
            with autocast():
                feat, _ = model.texture_pass(images, *arg)
            feat.float().sum().backward()

        cost["texture_ms"] = round(_median_ms(texture, device, reps, setup=texture_inputs), 4)
        cost["texture_share_pct"] = round(100 * cost["texture_ms"] / cost["step_ms"], 4)
    model.zero_grad(set_to_none=True)
    return cost
