"""The end of a multirun: how many runs finished, failed or stopped, and where each one is.

`SweepSummary` is a Hydra callback (configs/train.yaml, hydra.callbacks) and works with every
launcher: the basic one, submitit's local one and SLURM. A run's status comes from its
results.json; a run dir without one belongs to a job that is still running or was killed
before it could write it (a SLURM job over its memory, a node failure)."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback

from fgvr.runtime.rundir import RunDir
from fgvr.runtime.tracker import is_run_dir

log = logging.getLogger("fgvr")


@dataclass
class RunStatus:
    dir: Path
    status: str  # finished | failed | interrupted | no results
    overrides: str  # the run's own overrides, e.g. "selector=glsim seed=1"
    detail: str  # best val and test accuracy, the error, or where to look


def run_status(run_dir: Path) -> RunStatus:
    run, overrides = RunDir(run_dir), ""
    if (run.hydra / "overrides.yaml").is_file():
        from omegaconf import OmegaConf

        overrides = " ".join(o for o in OmegaConf.load(run.hydra / "overrides.yaml") if not o.startswith("hydra."))
    try:
        results = json.loads(run.results.read_text())
    except (OSError, json.JSONDecodeError):
        return RunStatus(run_dir, "no results", overrides, "still running, or it died before it could write "
                         "results.json: see its train.log and the sweep's .submitit/ logs")
    status = results.get("status", "no results")
    val = results.get("best_val_acc")
    detail = {"finished": (f"best val acc {val:.2f} % | " if val is not None else "")
                          + f"test acc {results.get('test_acc', float('nan')):.2f} %",
              "interrupted": f"stopped by {results.get('signal')} at step {results.get('steps')}; resumes from "
                             "checkpoints/last.pt when relaunched"}.get(status, results.get("error", ""))
    return RunStatus(run_dir, status, overrides, detail)


def sweep_runs(sweep_dir: Path) -> list[RunStatus]:
    """Every run dir of a sweep (sub-dirs with a .hydra/ or results.json), in job order."""
    dirs = [d for d in Path(sweep_dir).iterdir()
            if d.is_dir() and is_run_dir(d)]
    return [run_status(d) for d in sorted(dirs, key=lambda d: (len(d.name), d.name))]  # 0, 1, ..., 10


def format_summary(sweep_dir: Path, runs: list[RunStatus]) -> str:
    counts = Counter(r.status for r in runs)
    head = f"sweep {sweep_dir}: {len(runs)} runs, " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    width = max((len(r.overrides) for r in runs), default=0)
    lines = [f"  {r.status:<11} {r.overrides:<{width}}  {r.dir}  {r.detail}" for r in runs]
    return "\n".join([head, *lines])


class SearchCheck(Callback):
    """Before a multirun launches anything: a search by hydra/sweeper=optuna maximises best_val_acc,
    which a run without a val split does not have. Hydra turns a callback's exception into a warning,
    so this one ends the command itself, in one line (exit 2)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        if "optuna" in config.hydra.sweeper._target_ and config.data.val_fraction == 0:
            print("fgvr train: error: hydra/sweeper=optuna maximises best_val_acc, and data.val_fraction=0 leaves "
                  "no val split (the test split never decides a search); set data.val_fraction=0.1", file=sys.stderr)
            sys.exit(2)


class SweepSummary(Callback):
    """Logs the sweep's summary when a multirun ends. The cli prints it too when the launcher
    gives up on a failed job (`last_sweep_dir`)."""

    last_sweep_dir: Path | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        SweepSummary.last_sweep_dir = Path(config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            log.info(format_summary(sweep_dir, sweep_runs(sweep_dir)))
