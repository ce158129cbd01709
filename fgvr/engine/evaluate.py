"""`fgvr eval ckpt=<run dir or .pt>`: rebuild a run's model and data from its checkpoint and
evaluate it. A run dir means its checkpoints/last.pt, the model results.json's test_acc came from.

The checkpoint is read weights-only (engine/checkpoint.py). Outputs go next to the run they read
(eval_<split>.json, viz/) when the checkpoint is part of a run dir, and otherwise only to out=."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from fgvr.config import EvalConfig, check_values
from fgvr.data.dataset import Loaders, build_loaders, require_boxes
from fgvr.engine import checkpoint
from fgvr.engine.trainer import autocast_dtype, evaluate, resolve_device
from fgvr.errors import ConfigError, DataError
from fgvr.models.model import FGVRModel, build_model, source_scale
from fgvr.rundir import RunDir, checkpoint_in
from fgvr.tracking.run import is_run_dir, write_json

log = logging.getLogger(__name__)


def checkpoint_path(ckpt: str) -> Path:
    path = checkpoint_in(ckpt)
    if not path.is_file():
        in_run_dir = path != Path(ckpt).expanduser()
        raise ConfigError(f"ckpt={ckpt}: " + ("no checkpoints/last.pt in that run dir" if in_run_dir
                                              else "no such file or run dir"))
    return path


def run_dir_of(checkpoint: Path) -> RunDir | None:
    """The run dir a checkpoint belongs to (<run dir>/checkpoints/<name>.pt), or None for a loose file."""
    folder = checkpoint.parent.parent
    return RunDir(folder) if checkpoint.parent.name == "checkpoints" and is_run_dir(folder) else None


def output_path(ckpt: Path, out: str | None, default: Callable[[RunDir], Path],
                replaceable: Callable[[Path], bool]) -> Path:
    """Where eval/viz write: `out` if given, else `default(the checkpoint's run dir)` unless a process
    is writing that run dir (a run still training). A loose checkpoint needs `out`. Something already
    there is replaced only if `replaceable` says it is an earlier output of the same kind."""
    run = run_dir_of(ckpt)
    if not out and run is None:
        raise ConfigError(f"ckpt={ckpt} is not inside a run dir (<run dir>/checkpoints/*.pt); say where to write "
                          "with out=PATH")
    if not out:
        run.ensure_idle("or write elsewhere with out=PATH")
    path = Path(out).expanduser() if out else default(run)
    if path.exists() and not replaceable(path):
        raise ConfigError(f"{'out=' if out else ''}{path}: something else is there already (not an earlier "
                          "output of this command); give out= another path")
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


def load_run(ckpt: str, device: str = "auto", data_root: str | None = None, batch_size: int | None = None,
             skip_bad: bool = False) -> LoadedRun:
    """Rebuild a run's model (its EMA weights if it had them) and loaders from a checkpoint."""
    path = checkpoint_path(ckpt)
    state = checkpoint.load(path)
    run_cfg = OmegaConf.create(state["config"])
    run_cfg.backbone.pretrained = False  # the weights come from the checkpoint, not the hub
    run_cfg.backbone.checkpoint = None
    texture, selector = run_cfg.get("texture") or {}, run_cfg.get("selector") or {}
    if texture.get("_target_") and "crop_source" not in texture:
        # Runs made before texture.crop_source: the branch cut its regions where the selector did.
        texture.crop_source = selector.get("crop_source", "input") if selector.get("_target_") else "input"
        texture.source_scale = selector.get("source_scale", 2.0)
    if data_root is not None:
        run_cfg.data.root = data_root
    if batch_size is not None:
        run_cfg.data.eval_batch_size = batch_size
    if skip_bad:
        run_cfg.data.skip_bad = True

    dev = resolve_device(device)
    loaders = build_loaders(run_cfg.data, run_cfg.paths.cache_dir, run_cfg.seed, pin_memory=dev.type == "cuda",
                            scale=source_scale(run_cfg))
    if loaders.classes != state["classes"]:
        raise DataError(f"data.root={run_cfg.data.root}: its classes differ from the {len(state['classes'])} "
                        f"the checkpoint was trained on; pass data_root= for the right data set")
    model = build_model(run_cfg, len(state["classes"])).to(dev)
    require_boxes(model, loaders, run_cfg.data.name)
    weights = state["model"]
    if state.get("ema"):  # the run evaluated its EMA weights, and so does this
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    checkpoint.load_weights(model, weights, path, state["config"])
    return LoadedRun(path, state, run_cfg, model.eval(), loaders, dev)


def check_split(split: str) -> None:
    if split not in ("test", "val"):
        raise ConfigError(f"split={split}: choose test or val")


def split_loader(run: LoadedRun, split: str):
    loader = run.loaders.test if split == "test" else run.loaders.val
    if loader is None:
        raise ConfigError("split=val: the run had no val split (data.val_fraction=0); use split=test")
    return loader


def _is_evaluation(path: Path) -> bool:
    """Whether a file holds what evaluate_checkpoint writes."""
    try:
        return path.is_file() and {"checkpoint", "split", "acc"} <= json.loads(path.read_text()).keys()
    except (OSError, ValueError, AttributeError):
        return False


def evaluate_checkpoint(cfg: EvalConfig) -> dict:
    """Evaluate on cfg.split; writes eval_<split>.json into the checkpoint's run dir (or to out=)."""
    check_values(cfg, EvalConfig)
    check_split(cfg.split)
    out = output_path(checkpoint_path(cfg.ckpt), cfg.out, lambda run: run.eval_file(cfg.split), _is_evaluation)
    run = load_run(cfg.ckpt, cfg.device, cfg.data_root, cfg.batch_size, cfg.skip_bad)
    with run.loaders:  # their workers end here, not at exit
        metrics = evaluate(run.model, split_loader(run, cfg.split), run.device,
                           autocast_dtype(run.cfg.trainer.precision, run.device))
    metrics["skipped"] += run.loaders.missing[cfg.split]  # and the files not found
    result = {"checkpoint": str(run.path), "split": cfg.split, "epoch": run.state["epoch"],
              "step": run.state["step"], "data_root": run.cfg.data.root, **metrics}
    if out.exists():
        log.warning("replacing %s (an earlier evaluation)", out)
    write_json(out, result)
    log.info("%s acc %.2f%% (top-5 %.2f%%) on %d images%s | %s at epoch %d -> %s", cfg.split, metrics["acc"],
             metrics["top5"], metrics["images"], f", {metrics['skipped']} skipped" if metrics["skipped"] else "",
             run.path, run.state["epoch"], out)
    return result
