"""The training loop, in one file. `_fit` reads top to bottom: build the session (engine/
session.py: loaders, model, optimiser, the step), resume where a checkpoint left off, then each
epoch's steps (`_train_epoch`: data, forward, loss, backward, clip, step, schedule, log), a val
evaluation and last.pt; at the end the test evaluation and results. Features are flags in
`cfg.trainer`, not callbacks. `train` around it decides whether a launch may write its run dir.

A run dir holds everything: `.hydra/` (the resolved config), `metrics.jsonl`, `checkpoints/
{last,best}.pt` and, at the end, `results.json`. Relaunching with the same run dir resumes
from `checkpoints/last.pt` (resume=auto). last.pt is written after every epoch and, when the
job is told to stop (SIGUSR2 before a SLURM time limit, SIGTERM), at the next step boundary;
a resume is exact: model, optimizer, scheduler, step, RNG states and the position in the
epoch's sample order. With several processes (runtime/distributed.py) each rank trains on its
shard of every batch and rank 0 writes the files."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fgvr.data.dataset import DataWait
from fgvr.engine.cost import measure_cost
from fgvr.engine.progress import EpochProgress
from fgvr.engine.session import Session
from fgvr.runtime import checkpoint, distributed
from fgvr.runtime.config import TrainConfig, Tta, check_values, resumable, upgrade
from fgvr.runtime.device import peak_mem_mb, resolve_device, to_device
from fgvr.runtime.distributed import AnyRank
from fgvr.runtime.errors import ConfigError, FgvrError, first_line
from fgvr.runtime.preemption import Interrupted, StopOnSignal
from fgvr.runtime.rundir import RunDir, checkpoint_in
from fgvr.runtime.tracker import RunInfo, RunLogger, git_sha, slurm_job_id, versions, write_json

log = logging.getLogger(__name__)

# What a checkpoint needs beyond fgvr's checkpoint.REQUIRED to resume a run from it.
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "position", "best", "rng", "num_classes")
# What resume=evaluate measures again; the rest of results.json stays as the training run wrote it.
EVALUATED = ("tta", "test_acc", "test_top5", "test_loss", "test_images", "eval_img_per_s", "crop_iou", "crop_hit",
             "region_iou", "region_hit", "token_hit",
             "cost", "cost_error", "backbone_weights", "backbone_weights_error")


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config containers."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b, key = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, key + ".")
        elif a != b:
            out.append(key)
    return out


def has_key(config: dict, key: str) -> bool:
    """Whether a nested config container holds the dotted `key`."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def find_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint a launch into `run_dir` starts from (None: from scratch), as `resume` says."""
    last = RunDir(run_dir).last
    if resume == "auto":
        return last if last.is_file() else None
    if resume == "evaluate":
        if not last.is_file():
            raise ConfigError(f"resume=evaluate: {run_dir} holds no checkpoints/last.pt to evaluate")
        return last
    if resume == "never":
        if last.is_file():
            raise ConfigError(f"{last} exists: this run dir already holds a run; resume=auto continues it, "
                              "or give a new hydra.run.dir")
        return None
    path = checkpoint_in(resume)
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no checkpoint there; use auto, never, evaluate, a run dir or a .pt file")
    # A run dir that has its own last.pt by now (a relaunch, a requeued job) goes on from it, never back to
    # where it started; _admit checks that it did start from `path`.
    return last if last.is_file() else path


def train(cfg: DictConfig, run: RunInfo) -> dict:
    """Train (or resume) the run that `cfg` describes in `run.dir`; returns results.json's content.

    The run dir is locked while this process (rank 0 of a multi-process run) writes it. With
    trainer.devices=N > 1 the run is one DDP run in N new processes on this machine."""
    rundir, main = RunDir(run.dir), distributed.from_env().is_main
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{missing[0]} is required: pass {missing[0]}=... on the command line")
        check_values(cfg, TrainConfig)
        with rundir.locked() if main else contextlib.nullcontext():
            if cfg.trainer.devices > 1:
                cfg = cfg.copy()
                OmegaConf.resolve(cfg)  # the workers have no Hydra context to resolve it in
                distributed.launch_local(_train, (cfg, run), cfg.trainer.devices, _logging_config())
                results = rundir.read_results()
                if results is None:
                    raise FgvrError(f"{rundir.results}: the run's processes ended without writing it")
                return results
            return _train(cfg, run)
    except (FgvrError, KeyboardInterrupt) as e:
        if main and rundir.path.is_dir() and not any(rundir.path.iterdir()):  # refused before it wrote anything
            if run.group is None:
                rundir.discard_if_empty()
            else:  # a sweep's job: a record, so that the sweep's summary counts it
                write_json(rundir.results, {"status": "failed", "error": first_line(e, typed=True)})
        raise


def _logging_config() -> dict | None:
    """Hydra's job logging (the console), for processes that start afresh."""
    from hydra.core.hydra_config import HydraConfig

    return OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True) if HydraConfig.initialized() else None


def _admit(cfg: DictConfig, config: dict, rundir: RunDir) -> tuple[dict | None, dict | None, bool]:
    """(the checkpoint to resume from, the dir's results.json, whether it is a finished run to keep as
    it is) for a launch into `rundir`, or a ConfigError saying why this launch may not write there.
    Writes nothing."""
    t = cfg.trainer
    ckpt_path = find_checkpoint(cfg.resume, rundir.path)
    previous = rundir.read_results()
    finished = previous is not None and previous.get("status") == "finished"
    if ckpt_path is None:
        if finished:
            raise ConfigError(f"{rundir.path} holds a finished run (results.json) but not its checkpoints/last.pt; "
                              "give this run another hydra.run.dir")
        return None, previous, False
    state = checkpoint.load(ckpt_path)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise FgvrError(f"{ckpt_path}: not a checkpoint to resume from (no {', '.join(missing)}); fgvr eval "
                        "evaluates it, resume= takes checkpoints/last.pt of a run")
    state["loaded_from"] = ckpt_path
    if cfg.resume not in ("auto", "never", "evaluate"):  # resume=<another run's checkpoint>
        source = checkpoint_in(cfg.resume).resolve()
        if ckpt_path.resolve() == source:  # a new run from it: its checkpoints say so
            state["started_from"] = str(source)
        elif state.get("started_from") != str(source):  # the dir's own last.pt, of a run that began elsewhere
            raise ConfigError(f"resume={cfg.resume}: {rundir.path} already holds a run that did not start from that "
                              "checkpoint; resume=auto continues it, or give a new hydra.run.dir")
    trained = upgrade(state["config"])  # an older fgvr's keys (optim.name, logger.name, data.format) as today's
    diff = config_diff(trained, config)
    newer = [k for k in diff if not has_key(trained, k)]  # options added to fgvr since the run began
    if newer:
        log.warning("%s predates the options %s: the run goes on with their values now", ckpt_path,
                    ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in newer))
    changed = [k for k in diff if k not in newer and not resumable(k)]
    if changed:
        raise ConfigError(f"{ckpt_path} was trained with other settings ({', '.join(changed)}); resume with "
                          "the same config, or start a new run with another hydra.run.dir")
    finished = finished and state["epoch"] >= t.epochs
    if finished and "data.root" in diff:
        raise ConfigError(f"{rundir.path} holds a finished run trained on data.root={state['config']['data']['root']}; "
                          f"to evaluate it on other data: fgvr eval ckpt={rundir.path} data_root={cfg.data.root}")
    if cfg.resume == "evaluate" and not finished:
        raise ConfigError(f"resume=evaluate: {rundir.path} holds no finished run (epoch {state['epoch']} of "
                          f"{t.epochs}); resume=auto goes on training it")
    return state, previous, finished and cfg.resume != "evaluate"


def _train(cfg: DictConfig, run: RunInfo) -> dict:
    start_time = time.time()
    dist = distributed.from_env()
    distributed.quiet_logging(dist)
    t = cfg.trainer
    rundir = RunDir(run.dir)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    state, previous, finished = _admit(cfg, config, rundir)
    if finished:
        log.info("%s: this run finished before (test acc %.2f %%); nothing to do, results.json kept "
                 "(resume=evaluate evaluates it again)", run.dir, previous.get("test_acc") or math.nan)
        return previous
    evaluating = cfg.resume == "evaluate"
    if dist.is_main and not evaluating:  # the config stays the one the run was trained with
        rundir.write_config(cfg, run.hydra_files)

    results: dict = {
        "status": "running", "dataset": cfg.data.name, "backbone": cfg.backbone.name,
        "backbone_config": run.choices.get("backbone"), "selector": run.choices.get("selector", "none"),
        "texture": run.choices.get("texture", "none"), "head": run.choices.get("head"),
        "method": run.choices.get("method", "none"), "seed": cfg.seed,
        "img_size": cfg.data.img_size, "epochs": t.epochs, "world_size": dist.world_size, "run_dir": str(run.dir),
        "slurm_job_id": slurm_job_id(), "git_sha": git_sha(), "versions": versions(),
    }
    if evaluating:  # what evaluation does not measure stays as the training run wrote it
        results = previous | {"status": "running"}
    with rundir.logging_to_file() if dist.is_main else contextlib.nullcontext():
        # A re-evaluation keeps the earlier test events: if it fails, they are still the run's record.
        tracker = RunLogger(run, cfg.logger, config, wandb_id=state.get("wandb_id") if state else None,
                            resume_step=state["step"] if state and not evaluating else None, enabled=dist.is_main)
        if state is not None and state["config"]["data"]["root"] != cfg.data.root:
            log.warning("data.root changed from %s to %s: the run goes on with the data there",
                        state["config"]["data"]["root"], cfg.data.root)
            tracker.event("data_root_changed", step=state["step"], old=state["config"]["data"]["root"],
                          new=cfg.data.root)
        try:
            device = distributed.setup(dist, resolve_device(t.device))
            with StopOnSignal() as stop, Session(cfg, device, dist) as session:
                measured = _fit(cfg, run, config, state, tracker, session, stop)
            results = _reevaluated(results, measured) if evaluating else results | measured
            results["status"] = "finished"
        except Interrupted as e:
            results |= {"status": "interrupted", "signal": signal.Signals(e.signum).name, "steps": e.step}
            tracker.event("interrupted", step=e.step, signal=results["signal"])
            tracker.preempting()
        except BaseException as e:
            results |= {"status": "failed", "error": first_line(e, typed=True)}
            raise
        finally:
            if evaluating:
                results["evaluated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            else:
                results["wall_time_s"] = round(time.time() - start_time + (state or {}).get("wall_time_s", 0.0), 2)
                results["ended_at"] = round(time.time(), 3)  # which of two runs of one seed is the newer (tables)
            try:
                tracker.finish(None if evaluating and results["status"] != "finished" else results)
            finally:
                distributed.teardown()
    return results


@dataclass
class Position:
    """Where training stands: epochs done, samples of the current epoch already trained on (over
    all ranks), and the best val accuracy so far. The step count is the session's."""

    epoch: int = 0
    samples: int = 0
    best: dict = field(default_factory=lambda: {"acc": -math.inf, "epoch": None})


def _fit(cfg: DictConfig, run: RunInfo, config: dict, state: dict | None, tracker: RunLogger, session: Session,
         stop: StopOnSignal) -> dict:
    """The run itself: epochs of training steps, each followed by a val evaluation and last.pt, then
    the test evaluation and diagnostics."""
    t, dist = cfg.trainer, session.dist
    _describe(cfg, session)
    at = _resume(session, state, tracker) if state is not None else Position()
    meta = {"config": config, "num_classes": session.num_classes, "classes": session.loaders.classes,
            "wandb_id": tracker.wandb_id, "run_name": run.name, "run_group": run.group,
            "started_from": (state or {}).get("started_from")}
    wall_time_s, fit_start, any_rank = (state or {}).get("wall_time_s", 0.0), time.time(), AnyRank(dist)

    def save(name: str) -> None:
        rng = distributed.gather(checkpoint.rng_state(), dist)  # a collective: every rank calls save
        if dist.is_main:
            checkpoint.atomic_save(session.state_dict() | meta | {
                "epoch": at.epoch, "position": at.samples, "best": at.best, "rng": rng,
                "wall_time_s": time.time() - fit_start + wall_time_s}, RunDir(run.dir).checkpoints / f"{name}.pt")

    def stop_here() -> None:
        """At a step boundary: if any rank was told to stop, save last.pt here and stop."""
        if any_rank(stop.requested is not None):
            got = signal.Signals(stop.requested).name if stop.requested else "a stop signal on another rank"
            log.warning("received %s: saving checkpoints/last.pt at step %d, then stopping", got, session.steps)
            save("last")
            raise Interrupted(stop.requested or signal.SIGTERM, session.steps)

    epochs, skipped = [], {"train": 0, "val": 0}
    while at.epoch < t.epochs:
        epochs.append(_train_epoch(session, at, tracker, stop_here))
        skipped["train"] = max(skipped["train"], epochs[-1].skipped)  # images, not their count over epochs
        at.epoch, at.samples = at.epoch + 1, 0
        if session.loaders.val is not None and (at.epoch % t.eval_every == 0 or at.epoch == t.epochs):
            val = session.evaluate(session.loaders.val, t.limit_eval_batches)
            tracker.log(step=session.steps, epoch=at.epoch, split="val", **val)
            skipped["val"] = val["skipped"]
            if val["acc"] > at.best["acc"]:
                at.best = {"acc": val["acc"], "epoch": at.epoch}
                save("best")
            log.info("epoch %d | val acc %.2f%% (best %.2f%% at epoch %d) | loss %.4f", at.epoch, val["acc"],
                     at.best["acc"], at.best["epoch"], val["loss"])
        stop_here()  # saves last.pt itself when it stops
        save("last")

    test = session.evaluate(session.loaders.test, t.limit_eval_batches)
    tracker.log(step=session.steps, epoch=at.epoch, split="test", **test)
    skipped = {split: n + session.loaders.missing[split]  # and the files not found
               for split, n in (skipped | {"test": test["skipped"]}).items()}
    log.info("test acc %.2f%% (top-5 %.2f%%) on %d images | %s", test["acc"], test["top5"], test["images"], run.dir)
    if any(skipped.values()):
        log.warning("skipped unreadable images (data.skip_bad=true): %s",
                    ", ".join(f"{n} {split}" for split, n in skipped.items()))
    # Diagnostics: the run has its result; an error here is recorded beside it, never fails it.
    diagnostics: dict = {"cost": None, "cost_error": None, "backbone_weights": None, "backbone_weights_error": None}
    if dist.is_main:  # one process's model on one batch: the other ranks need not wait for it
        diagnostics |= _diagnose("cost", lambda: _cost(session))
        if t.export_backbone:
            diagnostics |= _diagnose("backbone_weights", lambda: _export_backbone(session.eval_model, cfg, config,
                                                                                  run.dir))
    return _results(session, at, test, epochs, skipped) | diagnostics


@dataclass
class EpochStats:
    images: int  # over all ranks
    seconds: float
    data_wait_s: float  # of this rank's loop
    skipped: int  # unreadable images, over all ranks


def _train_epoch(session: Session, at: Position, tracker: RunLogger, stop_here: Callable[[], None]) -> EpochStats:
    """The steps of epoch at.epoch from at.samples on. Every trainer.log_every steps a train event
    (the only host-device sync of training); after every step, stop_here."""
    t, dist = session.cfg.trainer, session.dist
    session.model.train()
    window: dict[str, torch.Tensor] = {}  # sums since the last train event: loss, hits, each loss term
    images = logged = skipped = 0
    start = tick = time.perf_counter()
    data = DataWait(session.epoch(at.epoch, at.samples))  # adds up the time the loop waits for data
    with EpochProgress(f"epoch {at.epoch + 1}/{t.epochs}", session.steps_per_epoch, at.samples // session.step_batch,
                       enabled=None if dist.is_main else False) as progress:
        for batches in data:
            for name, value in session.step(batches).items():
                window[name] = window.get(name, 0) + value
            images += sum(len(b.labels) for b in batches)
            skipped += sum(b.skipped for b in batches)
            at.samples += session.step_batch
            progress.advance()
            if session.steps % t.log_every == 0:
                sums = dict(zip([*window, "images"], distributed.all_reduce_(
                    torch.stack([*window.values(), torch.tensor(float(images - logged), device=session.device)]), dist
                ).tolist()))
                n, hits = sums.pop("images"), sums.pop("correct")
                now = time.perf_counter()
                event = dict(step=session.steps, epoch=at.epoch + 1, split="train",
                             **{k: v / n for k, v in sums.items()},  # the loss (and each of its terms)
                             acc=100 * hits / n, lr=session.optimizer.param_groups[0]["lr"], img_per_s=n / (now - tick))
                tracker.log(**event)
                progress.show(event)
                if not progress.live:
                    log.info("epoch %d step %d | loss %.4f | acc %.1f%% | lr %.2e | %.0f img/s", at.epoch + 1,
                             session.steps, event["loss"], event["acc"], event["lr"], event["img_per_s"])
                window.clear()
                logged, tick = images, now
            stop_here()
    if dist.enabled:  # once an epoch, beside the val evaluation's own sync
        skipped = int(distributed.all_reduce_(torch.tensor([skipped], device=session.device), dist).item())
    return EpochStats(images * dist.world_size, time.perf_counter() - start, data.seconds, skipped)


def _describe(cfg: DictConfig, session: Session) -> None:
    """What the run trains, on what, in one log line (and the lr scaling, if any)."""
    loaders, dist = session.loaders, session.dist
    log.info("%s: %d classes, %d train / %d val / %d test images | %s, %.1f M params | %s, %s | %d images a step%s",
             cfg.data.name, session.num_classes, len(loaders.train.dataset),
             len(loaders.val.dataset) if loaders.val else 0, len(loaders.test.dataset), cfg.backbone.name,
             session.params_m, session.device, session.amp or torch.float32, session.step_batch,
             f" over {dist.world_size} processes" if dist.enabled else "")
    if session.lr != cfg.optim.lr:
        log.info("lr %.3g (optim.lr %.3g scaled %s to a step batch of %d)", session.lr, cfg.optim.lr,
                 cfg.optim.lr_scale.name, session.step_batch)


def _resume(session: Session, state: dict, tracker: RunLogger) -> Position:
    """The session as the checkpoint left it (weights, optimiser, schedule, scaler, EMA, RNG) and
    where training stood."""
    dist, epochs = session.dist, session.cfg.trainer.epochs
    if state["num_classes"] != session.num_classes:
        raise FgvrError(f"checkpoint has {state['num_classes']} classes, the data set {session.num_classes}")
    session.load_state_dict(state)
    if len(state["rng"]) == dist.world_size:
        checkpoint.set_rng_state(state["rng"][dist.rank])
    else:
        log.warning("the checkpoint was written by %d processes, this run has %d: random streams start afresh",
                    len(state["rng"]), dist.world_size)
    at = Position(state["epoch"], state["position"], state["best"])
    if at.epoch < epochs:
        log.info("resumed from %s at step %d (epoch %d%s)", state["loaded_from"], session.steps, at.epoch + 1,
                 f", {at.samples} samples in" if at.samples else "")
        tracker.event("resumed", step=session.steps, epoch=at.epoch + 1, position=at.samples,
                      slurm_job_id=slurm_job_id())
    else:  # trained to the end (resume=evaluate, or a run that stopped before its test evaluation)
        log.info("%s: trained to the end (step %d); evaluating it", state["loaded_from"], session.steps)
        tracker.event("evaluating", step=session.steps, slurm_job_id=slurm_job_id())
    return at


def _results(session: Session, at: Position, test: dict, epochs: list[EpochStats], skipped: dict) -> dict:
    """What results.json says of the training and the test evaluation."""
    timed = epochs[1:] or epochs  # the first epoch pays for worker start-up and warm-up
    seconds = sum(e.seconds for e in timed)
    return {
        "num_classes": session.num_classes, "best_val_acc": at.best["acc"] if at.best["epoch"] else None,
        "best_epoch": at.best["epoch"], "tta": Tta(session.cfg.eval.tta).value,
        "test_acc": test["acc"], "test_top5": test["top5"], "test_loss": test["loss"],
        "train_img_per_s": sum(e.images for e in timed) / seconds if timed else None,
        "data_wait_pct": 100 * sum(e.data_wait_s for e in timed) / seconds if timed else None,
        "compile_s": session.compile_s, "eval_img_per_s": test["img_per_s"],
        "peak_mem_mb": round(peak_mem_mb(session.device), 1), "params_m": round(session.params_m, 3),
        "steps": session.steps, "test_images": test["images"], "skipped_images": skipped,
        "crop_iou": test.get("crop_iou"), "crop_hit": test.get("crop_hit"), "region_iou": test.get("region_iou"),
        "region_hit": test.get("region_hit"), "token_hit": test.get("token_hit"),
    }


def _reevaluated(results: dict, measured: dict) -> dict:
    """A finished run's results with what a new evaluation measured: the test figures and cost;
    the training figures (and the train and val images skipped) stay as training left them."""
    skipped = results.get("skipped_images")
    skipped = skipped if isinstance(skipped, dict) else {}  # runs before per-split counts kept one number
    return results | {k: v for k, v in measured.items() if k in EVALUATED} | {
        "skipped_images": skipped | {"test": measured["skipped_images"]["test"]}}


def _diagnose(name: str, measure) -> dict:
    """{name: what `measure()` returns, name_error: None}, or {name: None, name_error: the error in one line}."""
    try:
        return {name: measure(), f"{name}_error": None}
    except Exception as e:
        message = first_line(e, typed=True)
        log.error("%s failed after the test evaluation (the run's results stand): %s", name, message)
        return {name: None, f"{name}_error": message}


def _cost(session: Session) -> dict:
    """FLOPs and time of one training step (engine/cost.py), on the first train batch."""
    batch = next(iter(session.loaders.train))
    images, labels = to_device(batch.images, batch.labels, session.device, session.channels_last)
    cost = measure_cost(session.model, images, labels, session.amp, truth=batch.boxes.to(session.device))
    log.info("cost: %.3f GFLOPs/image forward | step %.1f ms%s%s", cost["gflops_per_image"]["total"], cost["step_ms"],
             f" | selection {cost['select_ms']:.3f} ms ({cost['select_share_pct']:.3f} % of a step)"
             if "select_ms" in cost else "",
             f" | texture {cost['texture_ms']:.1f} ms ({cost['texture_share_pct']:.1f} %)"
             if "texture_ms" in cost else "")
    return cost


def _export_backbone(model: nn.Module, cfg: DictConfig, config: dict, run_dir: Path) -> str:
    """<run dir>/backbone.safetensors: the backbone's weights in timm's format, for backbone.checkpoint=."""
    path = RunDir(run_dir).backbone
    checkpoint.save_weights(model.backbone.model.state_dict(), path,
                            {"timm_model": cfg.backbone.name, "img_size": str(cfg.data.img_size),
                             "kwargs": json.dumps(config["backbone"]["kwargs"]), "dataset": cfg.data.name})
    log.info("backbone weights in timm's format (for backbone.checkpoint=): %s", path)
    return str(path)
