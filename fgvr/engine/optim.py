"""Optimiser (no weight decay on norms, biases, position embeddings, tokens) and LR schedule."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from fgvr.runtime.config import LrScale, OptimName


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
    rule = LrScale(cfg.lr_scale) if not isinstance(cfg.lr_scale, LrScale) else cfg.lr_scale
    ratio = step_batch / (cfg.lr_batch_size or batch_size)
    return cfg.lr * {LrScale.none: 1.0, LrScale.linear: ratio, LrScale.sqrt: ratio**0.5}[rule]


def build_optimizer(model: nn.Module, cfg, device: torch.device, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    name = OptimName(cfg.name) if not isinstance(cfg.name, OptimName) else cfg.name
    if name is OptimName.sgd:
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=False, **fast)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), **fast)


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
