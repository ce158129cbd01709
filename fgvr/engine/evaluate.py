"""Evaluation: the loop (`evaluate`, over all ranks' shards) and a trained run rebuilt from its
checkpoint (`load_run`), for `fgvr eval` and `fgvr viz`. The checkpoint is read weights-only
(runtime/checkpoint.py); a run dir means its checkpoints/last.pt, the model results.json's test_acc
came from."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fgvr.data.dataset import Loaders, build_loaders, require_boxes
from fgvr.models.model import FGVRModel, build_model, settings, source_scale
from fgvr.models.selectors import localisation, token_localisation
from fgvr.runtime import checkpoint, distributed
from fgvr.runtime.config import Tta, upgrade, with_defaults
from fgvr.runtime.device import resolve_device, to_device
from fgvr.runtime.distributed import Dist
from fgvr.runtime.errors import ConfigError, DataError
from fgvr.runtime.rundir import checkpoint_in


def forward_tta(model: nn.Module, images: torch.Tensor, truth: torch.Tensor | None, tta: Tta | str = Tta.none
                ) -> tuple[torch.Tensor, dict]:
    """The model's (logits, extras) for evaluation. tta="flip": the logits are the mean of the
    images' and of their mirror images' (the ground-truth boxes, as fractions, mirrored with them);
    the extras (boxes, scores, tokens) stay those of the images as they are."""
    logits, extras = model(images, truth)
    if Tta(tta) is Tta.flip:
        mirrored = None
        if truth is not None:
            x1, y1, x2, y2 = truth.unbind(-1)
            mirrored = torch.stack([1 - x2, y1, 1 - x1, y2], -1)
        logits = (logits + model(images.flip(-1), mirrored)[0]) / 2
    return logits, extras


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: torch.dtype | None,
             limit: int | None = None, channels_last: bool = False, dist: Dist = Dist(),
             tta: Tta | str = Tta.none) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%), img/s, the images evaluated and those skipped as
    unreadable (data.skip_bad) and, on data with boxes, how well the model's
    regions localise: for a selector's crop (a method's crop, or the box around its tokens), the
    mean IoU with the ground-truth box (`crop_iou`) and the % of crops that contain its centre
    (`crop_hit`); for the texture branch's best region, the same as `region_iou` and
    `region_hit`; for a method's selected tokens, the % whose patch centre lies in the box
    (`token_hit`). Summed over all ranks' shards, so the
    numbers are over the whole split. `tta`: as forward_tta. One host-device sync."""
    model.eval()
    totals = torch.zeros(13, device=device)  # loss, top-1, top-5 sums, (IoU sum, hits, boxes) x 2, tokens x 2, images
    n, skipped, start = 0, 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        images, labels = to_device(batch.images, batch.labels, device, channels_last)
        fractions = batch.boxes.to(device, non_blocking=True)  # the ground truth, as fractions of the image
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits, extras = forward_tta(model, images, fractions, tta)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        truth = fractions * model.input_size
        local = [localisation(boxes.float(), truth) if boxes is not None else torch.zeros(3, device=device)
                 for boxes in (extras.get("boxes"), extras["regions"][:, 0] if "regions" in extras else None)]
        tokens = token_localisation(extras["token_boxes"].float(), truth) if "token_boxes" in extras \
            else torch.zeros(2, device=device)
        totals[:11] += torch.cat([torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                               (top[:, 0] == labels).sum(), (top == labels[:, None]).any(-1).sum()]),
                                  *local, tokens])
        n += len(labels)
        skipped += batch.skipped
    totals[11:] = torch.tensor([n, skipped])  # counted on the host: a tensor a batch would be a copy per batch
    loss, top1, top5, *local, token_hits, tokens, images, skipped = distributed.all_reduce_(totals, dist).tolist()
    elapsed = time.perf_counter() - start
    n = max(images, 1)
    out = {"loss": loss / n, "acc": 100 * top1 / n, "top5": 100 * top5 / n, "img_per_s": images / elapsed,
           "images": int(images), "skipped": int(skipped)}
    for name, (iou, hits, boxed) in (("crop", local[:3]), ("region", local[3:])):
        if boxed:
            out |= {f"{name}_iou": iou / boxed, f"{name}_hit": 100 * hits / boxed}
    if tokens:
        out["token_hit"] = 100 * token_hits / tokens
    return out


def checkpoint_path(ckpt: str) -> Path:
    path = checkpoint_in(ckpt)
    if not path.is_file():
        in_run_dir = path != Path(ckpt).expanduser()
        raise ConfigError(f"ckpt={ckpt}: " + ("no checkpoints/last.pt in that run dir" if in_run_dir
                                              else "no such file or run dir"))
    return path


@dataclass
class LoadedRun:
    """A trained run rebuilt from its checkpoint: weights loaded, data as it was trained on."""

    path: Path  # the checkpoint
    state: dict
    cfg: DictConfig  # the run's config
    model: FGVRModel  # in eval mode, on `device`
    loaders: Loaders
    device: torch.device


def load_config(ckpt: str) -> tuple[Path, dict, DictConfig]:
    """(the checkpoint's path, its state, the run's config in today's keys) for rebuilding its model."""
    path = checkpoint_path(ckpt)
    state = checkpoint.load(path)
    run_cfg = OmegaConf.create(with_defaults(upgrade(state["config"])))  # an older fgvr's in today's keys
    run_cfg.backbone.pretrained = False  # the weights come from the checkpoint, not the hub
    run_cfg.backbone.checkpoint = None
    texture, selector = run_cfg.get("texture") or {}, run_cfg.get("selector") or {}
    if texture.get("_target_") and "crop_source" not in texture and selector.get("_target_"):
        # Runs made before texture.crop_source: the branch cut its regions where the selector did.
        texture.crop_source, texture.source_scale = settings(selector, "crop_source", "source_scale")
    return path, state, run_cfg


def load_model(path: Path, state: dict, run_cfg: DictConfig, device: torch.device) -> FGVRModel:
    """The run's model with its trained weights (its EMA weights if it had them), in eval mode on `device`."""
    model = build_model(run_cfg, len(state["classes"])).to(device)
    weights = state["model"]
    if state.get("ema"):  # the run evaluated its EMA weights, and so does this
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    checkpoint.load_weights(model, weights, path, state["config"])
    return model.eval()


def load_run(ckpt: str, device: str = "auto", data_root: str | None = None, batch_size: int | None = None,
             skip_bad: bool = False) -> LoadedRun:
    """Rebuild a run's model (load_model) and loaders from a checkpoint."""
    path, state, run_cfg = load_config(ckpt)
    if data_root is not None:
        run_cfg.data.root = data_root
    if batch_size is not None:
        run_cfg.data.eval_batch_size = batch_size
    if skip_bad:
        run_cfg.data.skip_bad = True

    dev = resolve_device(device, "device")
    loaders = build_loaders(run_cfg.data, run_cfg.paths.cache_dir, run_cfg.seed, pin_memory=dev.type == "cuda",
                            scale=source_scale(run_cfg), yield_cores=dev.type == "cpu")
    if loaders.classes != state["classes"]:
        raise DataError(f"data.root={run_cfg.data.root}: its classes differ from the {len(state['classes'])} "
                        f"the checkpoint was trained on; pass data_root= for the right data set")
    model = load_model(path, state, run_cfg, dev)
    require_boxes(model, loaders, run_cfg.data.name)
    return LoadedRun(path, state, run_cfg, model, loaders, dev)


def check_split(split: str) -> None:
    if split not in ("test", "val"):
        raise ConfigError(f"split={split}: choose test or val")


def split_loader(run: LoadedRun, split: str):
    loader = run.loaders.test if split == "test" else run.loaders.val
    if loader is None:
        raise ConfigError("split=val: the run had no val split (data.val_fraction=0); use split=test")
    return loader
