"""A run's files: metrics.jsonl (one JSON object per event) and results.json, mirrored to W&B.

The run dir is the source of truth; W&B only mirrors it, so logger=none loses nothing but the
web view."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgvr.runtime.config import instantiate
from fgvr.runtime.errors import FgvrError, first_line
from fgvr.runtime.files import write_error, write_text_atomic
from fgvr.runtime.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """Where a run lives and what Hydra chose for it."""

    dir: Path
    name: str  # display name: experiment name + overrides
    group: str | None = None  # the sweep, for multiruns
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option
    hydra_files: dict[str, str] = field(default_factory=dict)  # .hydra/'s overrides.yaml and hydra.yaml, as text


def run_info(name: str) -> RunInfo:
    """The current Hydra job's run: its dir (created), display name (`name` and the overrides),
    sweep group and config choices."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    choices = {k: v for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra")}
    overrides = [o for o in hc.overrides.task if not o.startswith(("hydra.", "+experiment=", "experiment="))]
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    files = {"overrides.yaml": OmegaConf.to_yaml(hc.overrides.task), "hydra.yaml": OmegaConf.to_yaml({"hydra": hc})}
    return RunInfo(run_dir, " ".join([name, *overrides]), group, choices, files)


def is_run_dir(path: Path) -> bool:
    """A run's folder: Hydra's .hydra/ or the results.json every run ends with."""
    run = RunDir(path)
    return run.hydra.is_dir() or run.results.is_file()


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_events(path: str | Path) -> list[dict]:
    """The events of a metrics.jsonl; a line cut short by a kill is left out."""
    events = []
    for line in Path(path).read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def flatten(d: dict, sep: str = "/", prefix: str = "") -> dict:
    """{"cost": {"step_ms": 1}} -> {"cost/step_ms": 1} (an empty section leaves no key)."""
    out = {}
    for k, v in d.items():
        out |= flatten(v, sep, f"{prefix}{k}{sep}") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def wandb_mode(requested: str | None) -> str:
    """online when credentials exist, else offline (announced once); never a login prompt."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    log.info("W&B: no credentials (WANDB_API_KEY or `wandb login`), logging offline; "
             "upload later with `wandb sync <run dir>/wandb/offline-run-*`")
    return "offline"


# Seconds wandb.init may spend reaching the W&B server (wandb-core retries within them) before the run
# goes on offline; wandb adds at most 10 s of grace should its service not answer, so ~30 s at worst.
INIT_TIMEOUT = 20.0


def start_logger(logger_cfg, run_dir: Path, run_id: str | None, **kwargs: Any):
    """The logger a run dir is mirrored to, logger._target_ called with the run dir, the run id to
    continue (None: a new run) and `kwargs` (name, group, config, ...); None for logger=none."""
    if not logger_cfg.get("_target_"):
        return None
    return instantiate("logger", logger_cfg, _partial_=True, supplied=("run_dir", "run_id", *kwargs))(
        run_dir, run_id, **kwargs)


def init_wandb(run_dir: Path, run_id: str | None, *, project: str, entity: str | None, tags: list[str],
               mode: str | None, **kwargs: Any):
    """wandb.init for a run dir (logger=wandb): its W&B files inside it, the run `run_id` continued if
    given (else a new run), the mode chosen by wandb_mode, W&B's own console output off. A W&B server
    that cannot be reached (or refuses the key) within INIT_TIMEOUT s costs one warning: the run logs
    offline."""
    from urllib.parse import urlparse

    import wandb

    def init(mode: str, **settings: Any):
        return wandb.init(project=project, entity=entity, tags=tags, dir=str(run_dir), id=run_id,
                          resume="allow" if run_id else None, mode=mode,
                          settings=wandb.Settings(console="off", silent=True, **settings), **kwargs)

    mode = wandb_mode(mode)
    if mode != "online":
        return init(mode)
    try:
        return init(mode, init_timeout=INIT_TIMEOUT)
    except (wandb.errors.CommError, TimeoutError) as e:  # TimeoutError: wandb's service did not answer at all
        error = e
    host = urlparse(wandb.setup().settings.base_url).netloc  # the one tried: WANDB_BASE_URL, `wandb login --host`, ...
    # The failed attempt leaves its run half-started in wandb's service (its id "in use"): end the service;
    # the offline run starts a new one.
    wandb.teardown()
    run = init("offline")
    text = first_line(error)
    reason = text.rsplit(": ", 1)[-1][:100]  # wandb-core's last cause: "connection refused", "no such host", ...
    reason = "timed out" if reason == "context deadline exceeded" else reason  # Go's words for it
    what = (f"{host} refused the API key" if isinstance(error, wandb.errors.AuthenticationError)
            else f"could not reach {host} within {INIT_TIMEOUT:g} s")
    log.warning("W&B: %s (%s); logging offline to %s; upload later with `wandb sync %s`",
                what, reason, run.settings.sync_dir, run.settings.sync_dir)
    return run


class RunLogger:
    """Appends events to metrics.jsonl and mirrors them to the logger the config names (logger=wandb: W&B).

    `enabled=False` (ranks other than 0 of a multi-process run) writes nothing."""

    def __init__(self, run: RunInfo, logger_cfg, config: dict, wandb_id: str | None = None,
                 resume_step: int | None = None, enabled: bool = True):
        self.run, self.enabled = run, enabled
        self.metrics = self.wandb = None
        if not enabled:
            return
        path = RunDir(run.dir).metrics
        if resume_step is not None and path.is_file():
            # Events after the checkpoint come from work the resumed run redoes: drop them.
            kept = [e for e in read_events(path) if e["step"] <= resume_step and e.get("split") != "test"]
            write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))
        self.metrics = open(path, "a", buffering=1)
        self.wandb = start_logger(logger_cfg, run.dir, wandb_id, name=run.name, group=run.group, config=config)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(self, **event: Any) -> None:
        """A metrics event: step, epoch, split (train | val | test) and its numbers."""
        if not self.enabled:
            return
        event = {k: _clean(v) for k, v in event.items()}
        self._append(event)
        if self.wandb is not None:
            values = {f"{event['split']}/{k}": v for k, v in event.items()
                      if k not in ("split", "step") and isinstance(v, (int, float)) and v is not None}
            self.wandb.log(values, step=event["step"])

    def event(self, name: str, **fields: Any) -> None:
        """A line in metrics.jsonl that marks what happened to the run (interrupted, resumed)."""
        if self.enabled:
            self._append({"event": name, **fields})

    def _append(self, event: dict) -> None:
        try:
            self.metrics.write(json.dumps(event) + "\n")
        except OSError as e:
            raise write_error(Path(self.metrics.name), e) from None

    def preempting(self) -> None:
        """Tell W&B the run stops to be resumed, not that it crashed."""
        if self.wandb is not None:
            self.wandb.mark_preempting()

    def finish(self, results: dict | None) -> None:
        """Write results.json (unless None: a failed re-evaluation keeps the one there) and close the
        files and the W&B run. A results.json that cannot be written (a full disk) is an error only
        for a run that finished; a failed run's own error is the one that matters."""
        if not self.enabled:
            return
        error = None
        if results is not None:
            try:
                write_json(RunDir(self.run.dir).results, results)
            except FgvrError as e:
                error = e
                log.error("%s", e)
        try:
            self.metrics.close()
        except OSError as e:  # the last lines did not fit: results.json above is what counts
            log.error("%s", write_error(Path(self.metrics.name), e))
        if self.wandb is not None:
            if results is not None:
                self.wandb.summary.update({k: v for k, v in flatten(results).items()
                                           if isinstance(v, (int, float, str))})
            # results=None: a re-evaluation that failed leaves the finished run as it was, in W&B too
            self.wandb.finish(exit_code=0 if results is None or results.get("status") == "finished" else 1)
        if error is not None and results["status"] == "finished":
            raise error


def git_sha() -> str | None:
    """The commit of the fgvr checkout (with '-dirty' if it has local changes), if any."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def slurm_job_id() -> str | None:
    """The SLURM job this process runs in, as squeue names it: 1234, or 1234_5 for an array task."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def versions() -> dict[str, str | None]:
    import timm
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}
