"""`fgvr eval ckpt=<run dir or .pt>`: rebuild a run's model and data from its checkpoint and
evaluate it (engine/evaluate.py). Outputs go next to the run they read (eval_<split>.json, viz/)
when the checkpoint is part of a run dir, and otherwise only to out=."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from fgvr.engine.evaluate import check_split, checkpoint_path, evaluate, load_run, split_loader
from fgvr.runtime.config import EvalConfig, Tta, check_values
from fgvr.runtime.device import autocast_dtype
from fgvr.runtime.errors import ConfigError
from fgvr.runtime.rundir import RunDir
from fgvr.runtime.tracker import is_run_dir, write_json

log = logging.getLogger(__name__)


def run_dir_of(checkpoint: Path) -> RunDir | None:
    """The run dir a checkpoint belongs to (<run dir>/checkpoints/<name>.pt), or None for a loose file."""
    run = RunDir(checkpoint.parent.parent)
    return run if run.checkpoints == checkpoint.parent and is_run_dir(run.path) else None


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
    tta = Tta(cfg.tta if cfg.tta is not None else run.cfg.eval.tta)
    with run.loaders:  # their workers end here, not at exit
        metrics = evaluate(run.model, split_loader(run, cfg.split), run.device,
                           autocast_dtype(run.cfg.trainer.precision, run.device), tta=tta)
    metrics["skipped"] += run.loaders.missing[cfg.split]  # and the files not found
    result = {"checkpoint": str(run.path), "split": cfg.split, "epoch": run.state["epoch"],
              "step": run.state["step"], "data_root": run.cfg.data.root, "tta": tta.value, **metrics}
    if out.exists():
        log.warning("replacing %s (an earlier evaluation)", out)
    write_json(out, result)
    log.info("%s acc %.2f%% (top-5 %.2f%%) on %d images%s%s | %s at epoch %d -> %s", cfg.split, metrics["acc"],
             metrics["top5"], metrics["images"], " with tta=flip" if tta is Tta.flip else "",
             f", {metrics['skipped']} skipped" if metrics["skipped"] else "",
             run.path, run.state["epoch"], out)
    return result
