"""Optimiser (no weight decay on norms, biases, position embeddings, tokens) and LR schedule."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from fgvr.runtime.config import LrScale, instantiate, target_arguments

# Keys of the optim config that are not the optimiser class's arguments: fgvr's (lr is scaled first,
# weight_decay goes to one of two parameter groups) and the schedule's.
NOT_ARGUMENTS = ("lr", "weight_decay", "warmup_steps", "warmup_lr", "min_lr", "lr_scale", "lr_batch_size")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and 1-d params (norms, biases) plus the model's
    `no_weight_decay()` names (position embeddings, class/register tokens) without decay."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(cfg, step_batch: int, batch_size: int) -> float:
    """optim.lr for a step of `step_batch` images: as given (optim.lr_scale=none), or scaled
    linearly or by the square root from optim.lr_batch_size, the batch the lr was chosen for
    (default: `batch_size`, i.e. data.batch_size in one process without accumulation)."""
    rule = LrScale(cfg.lr_scale)
    ratio = step_batch / (cfg.lr_batch_size or batch_size)
    return cfg.lr * {LrScale.none: 1.0, LrScale.linear: ratio, LrScale.sqrt: ratio**0.5}[rule]


def build_optimizer(model: nn.Module, cfg, device: torch.device, lr: float) -> torch.optim.Optimizer:
    """optim._target_ over param_groups at `lr` (scaled_lr's), with the config's other arguments that
    are set (momentum, betas); fused on CUDA and foreach elsewhere, where the class has them."""
    arguments = {k: v for k, v in cfg.items() if k not in NOT_ARGUMENTS and v is not None}
    make = instantiate("optim", arguments, _partial_=True,
                       supplied=("params", "lr", "weight_decay", "fused", "foreach"))
    takes = target_arguments(make.func)
    fast = next(({k: True} for k in (("fused", "foreach") if device.type == "cuda" else ("foreach",)) if k in takes),
                {})
    return make(param_groups(model, cfg.weight_decay), lr=lr, **fast)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, model: nn.Module,
                   grad_clip: float | None) -> None:
    """Clip the gradients' norm (if set), step through the AMP scaler, and clear the gradients."""
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> CosineLRScheduler:
    """Per-step linear warm-up from warmup_lr, then cosine to min_lr at the last step."""
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=cfg.min_lr,
                             warmup_t=cfg.warmup_steps, warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
