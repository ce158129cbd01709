"""`fgvr eval ckpt=<run dir or .pt>`: rebuild a run's model and data from its checkpoint and
evaluate it. A run dir means its checkpoints/last.pt, the model results.json's test_acc came from."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from fgvr.config import EvalConfig
from fgvr.data.dataset import build_loaders
from fgvr.engine import checkpoint
from fgvr.engine.trainer import autocast_dtype, evaluate, resolve_device
from fgvr.errors import ConfigError, DataError
from fgvr.models.model import build_model, source_scale
from fgvr.tracking.run import write_json

log = logging.getLogger(__name__)


def checkpoint_path(ckpt: str) -> Path:
    path = Path(ckpt)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
        if not path.is_file():
            raise ConfigError(f"ckpt={ckpt}: no checkpoints/last.pt in that run dir")
    elif not path.is_file():
        raise ConfigError(f"ckpt={ckpt}: no such file or run dir")
    return path


def evaluate_checkpoint(cfg: EvalConfig) -> dict:
    """Evaluate on cfg.split; writes eval_<split>.json into the checkpoint's run dir."""
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split={cfg.split}: choose test or val")
    path = checkpoint_path(cfg.ckpt)
    state = checkpoint.load(path)
    run_cfg = OmegaConf.create(state["config"])
    run_cfg.backbone.pretrained = False  # the weights come from the checkpoint, not the hub
    run_cfg.backbone.checkpoint = None
    if cfg.data_root is not None:
        run_cfg.data.root = cfg.data_root
    if cfg.batch_size is not None:
        run_cfg.data.eval_batch_size = cfg.batch_size

    device = resolve_device(cfg.device)
    loaders = build_loaders(run_cfg.data, run_cfg.paths.cache_dir, run_cfg.seed, pin_memory=device.type == "cuda",
                            scale=source_scale(run_cfg))
    if loaders.classes != state["classes"]:
        raise DataError(f"data.root={run_cfg.data.root}: its classes differ from the {len(state['classes'])} "
                        f"the checkpoint was trained on; pass data_root= for the right data set")
    loader = loaders.test if cfg.split == "test" else loaders.val
    if loader is None:
        raise ConfigError("split=val: the run had no val split (data.val_fraction=0); use split=test")

    model = build_model(run_cfg, len(state["classes"])).to(device)
    weights = state["model"]
    if state.get("ema"):  # the run evaluated its EMA weights, and so does this
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    model.load_state_dict(weights)
    amp = autocast_dtype(run_cfg.trainer.precision, device)
    metrics = evaluate(model, loader, device, amp)
    result = {"checkpoint": str(path), "split": cfg.split, "epoch": state["epoch"], "step": state["step"],
              **metrics, "num_images": len(loader.dataset)}
    write_json(path.parent.parent / f"eval_{cfg.split}.json", result)
    log.info("%s acc %.2f%% (top-5 %.2f%%) on %d images | %s at epoch %d", cfg.split, metrics["acc"],
             metrics["top5"], len(loader.dataset), path, state["epoch"])
    return result
