"""The run session: what a training process builds once from a composed config (loaders, the
wrapped model, optimiser, scaler, EMA, autocast) and the training step that `fgvr train` and
`fgvr bench` share."""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import time
from collections import defaultdict
from typing import Iterator

import torch
from omegaconf import DictConfig
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from fgvr.data.dataset import Batch, build_loaders, require_boxes
from fgvr.engine.evaluate import evaluate
from fgvr.engine.optim import build_optimizer, build_scheduler, optimizer_step, scaled_lr
from fgvr.models.model import build_model, mixes, source_scale
from fgvr.runtime import checkpoint, distributed
from fgvr.runtime.device import autocast_dtype, seed_everything, to_device
from fgvr.runtime.distributed import Dist
from fgvr.runtime.errors import ConfigError

log = logging.getLogger(__name__)


class Session:
    """What one training process works with, built once from a composed train config: the loaders
    (this rank's shards), the model (channels_last for CNNs on CUDA, wrapped for DDP, compiled),
    the optimiser with its LR schedule, the AMP scaler and autocast, the EMA, batch mixing
    (mixup / cutmix) and the training step. `fgvr train` loops over `epoch` and `step`; `fgvr bench`
    times the same `step`.

    Built in the same order on every rank: the same split, sample order and initial weights; then
    each rank seeds its own dropout and crops. `with Session(...)` ends the loaders' workers."""

    def __init__(self, cfg: DictConfig, device: torch.device, dist: Dist = Dist()):
        t = cfg.trainer
        self.cfg, self.device, self.dist = cfg, device, dist
        self.amp = autocast_dtype(t.precision, device)
        seed_everything(cfg.seed, t.deterministic)
        self.loaders = build_loaders(cfg.data, cfg.paths.cache_dir, cfg.seed, pin_memory=device.type == "cuda",
                                     scale=source_scale(cfg), rank=dist.rank, world_size=dist.world_size,
                                     yield_cores=device.type == "cpu")
        try:
            self._build(cfg, device, dist)
        except BaseException:
            self.loaders.close()
            raise

    def _build(self, cfg: DictConfig, device: torch.device, dist: Dist) -> None:
        t = cfg.trainer
        self.num_classes = len(self.loaders.classes)
        model = build_model(cfg, self.num_classes).to(device)
        require_boxes(model, self.loaders, cfg.data.name)
        seed_everything(cfg.seed + 1_000_003 * dist.rank, t.deterministic)
        self.channels_last = device.type == "cuda" and not model.backbone.is_transformer
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.params_m = sum(p.numel() for p in model.parameters()) / 1e6

        batches = len(self.loaders.train)
        if t.limit_train_batches is not None:
            batches = min(t.limit_train_batches, batches)
        if batches < t.accum_steps:
            raise ConfigError(f"trainer.accum_steps={t.accum_steps} is more than the {batches} batches of an epoch; "
                              "lower it or data.batch_size")
        self.accum_steps = t.accum_steps
        self.mixup = build_mixup(cfg, self.num_classes, len(self.loaders.train.sampler))
        self.steps_per_epoch = batches // t.accum_steps
        self.step_batch = cfg.data.batch_size * dist.world_size * t.accum_steps  # images an optimiser step sees
        self.lr = scaled_lr(cfg.optim, self.step_batch, cfg.data.batch_size)
        self.optimizer = build_optimizer(self.model, cfg.optim, device, self.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps=self.steps_per_epoch * t.epochs)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.grad_clip = t.grad_clip
        self.ddp = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None) \
            if dist.enabled else self.model
        self.ema = ModelEmaV3(self.model, decay=t.ema_decay) if t.ema_decay else None  # after DDP's broadcast
        self.forward = torch.compile(self.ddp) if t.compile else self.ddp
        self.eval_model = self.ema.module if self.ema is not None else self.model
        self.steps = 0  # optimiser steps taken, a checkpoint's included
        self.compile_s: float | None = None  # the first step's time, compilation included (trainer.compile)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.loaders.close()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "step": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """What state_dict saved, as a checkpoint read back (its path, `loaded_from`, named in errors)."""
        checkpoint.load_weights(self.model, state["model"], state["loaded_from"], state["config"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.steps = state["step"]

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def epoch(self, epoch: int, position: int = 0) -> Iterator[list[Batch]]:
        """The optimiser steps of `epoch` left after its first `position` samples (over all ranks),
        each as its accum_steps micro-batches; fewer if the shard ends first (a run resumed with
        more processes than it began with). The loader's workers start here, not in the first step."""
        self.loaders.train.sampler.set_epoch(epoch, position)
        return _steps(iter(self.loaders.train), self.steps_per_epoch - position // self.step_batch, self.accum_steps)

    def step(self, batches: list[Batch], timer: StepTimer | None = None) -> dict[str, torch.Tensor]:
        """One optimiser step over `batches` (micro-batches whose gradients add up; under DDP they
        are averaged over the ranks on the last one only): each batch mixed (mixup / cutmix, on the
        device, before the forward), then clip, step, schedule, EMA. Returns sums over the batches'
        images, on the device, without a sync: "loss", "correct" (against the labels, not the mix)
        and, for a model with more than one loss term (a method's), each term as "loss_<name>"."""
        mark = timer.mark if timer is not None else lambda phase: None
        compiling = self.forward is not self.ddp and self.compile_s is None
        start = time.perf_counter()
        mark("start")
        totals: dict[str, torch.Tensor] = {}
        for k, batch in enumerate(batches):
            images, labels = to_device(batch.images, batch.labels, self.device, self.channels_last)
            boxes = batch.boxes.to(self.device, non_blocking=True)  # ground truth, read by selector=oracle only
            targets = labels
            if self.mixup is not None and len(labels) % 2 == 0:  # not a batch data.skip_bad left odd
                images, targets = self.mixup(images.float(), labels)  # the model normalises 0-255 floats too
            last = k == len(batches) - 1
            with self.ddp.no_sync() if self.dist.enabled and not last else contextlib.nullcontext():
                with self.autocast():
                    logits, extras = self.forward(images, boxes, targets)
                    terms = extras["losses"]
                    loss = sum(terms.values())
                mark("forward")
                self.scaler.scale(loss / len(batches)).backward()
                mark("backward")
            n = len(labels)
            sums = {"loss": loss * n, "correct": (logits.argmax(-1) == labels).sum()}
            if len(terms) > 1:
                sums |= {f"loss_{name}": term * n for name, term in terms.items()}
            for name, value in sums.items():
                totals[name] = totals.get(name, 0) + value.detach().float()
        optimizer_step(self.optimizer, self.scaler, self.model, self.grad_clip)
        self.steps += 1
        self.scheduler.step_update(self.steps)
        if self.ema is not None:
            self.ema.update(self.model, step=self.steps)
        mark("optimizer")
        if compiling:  # the first step compiled the model: one sync, once
            distributed.synchronize(self.device)
            self.compile_s = time.perf_counter() - start
            log.info("torch.compile: the first step took %.1f s, compilation included", self.compile_s)
        return totals

    def evaluate(self, loader, limit: int | None = None) -> dict[str, float]:
        """engine/evaluate.py's evaluation of the weights the run reports (the EMA ones with ema_decay),
        with the run's test-time augmentation (eval.tta)."""
        return evaluate(self.eval_model, loader, self.device, self.amp, limit, self.channels_last, self.dist,
                        self.cfg.eval.tta)


def build_mixup(cfg: DictConfig, num_classes: int, train_images: int) -> Mixup | None:
    """timm's Mixup from data.augment (None when it does not mix), one lambda per batch, each image
    mixed with its mirror in the batch. Its targets are the mix of one-hot labels without smoothing:
    the model's cross-entropy applies trainer.label_smoothing to them (F.cross_entropy's smoothing of
    class probabilities is timm's smoothing of the mix, term for term), once, and the terms that read
    the classes of an image (TransFG's contrastive loss) read the mix itself. `train_images`: this
    process's training images an epoch, which make one batch when fewer than data.batch_size."""
    augment = cfg.data.augment
    if not mixes(augment):
        return None
    batch = min(cfg.data.batch_size, train_images)
    if batch % 2:
        why = f"data.batch_size={batch}: make it even" if batch == cfg.data.batch_size else \
            f"this process's {train_images} training images make one batch: train on an even number"
        raise ConfigError(f"data.augment.mixup/cutmix mix each image with another of its batch, which needs an even "
                          f"batch; {why}")
    return Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mix_prob,
                 switch_prob=augment.mix_switch_prob, mode="batch", label_smoothing=0.0, num_classes=num_classes)


def _steps(batches: Iterator[Batch], steps: int, accum_steps: int) -> Iterator[list[Batch]]:
    for _ in range(steps):
        group = list(itertools.islice(batches, accum_steps))
        if len(group) < accum_steps:
            return
        yield group


class StepTimer:
    """Marks the phase boundaries of steps without synchronising: CUDA events on a GPU, the host
    clock elsewhere. `phases_ms()` waits for the device once and gives the median over steps of
    each phase's time in a step (summed over a step's micro-batches)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[list[tuple[str, object]]] = []

    def mark(self, phase: str) -> None:
        if phase == "start":
            self.steps.append([])
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
            step = defaultdict(float)
            for (_, a), (phase, b) in zip(marks, marks[1:]):
                step[phase] += a.elapsed_time(b) if self.cuda else 1e3 * (b - a)
            for phase, ms in step.items():
                times[phase].append(ms)
        return {phase: statistics.median(ms) for phase, ms in times.items()}
