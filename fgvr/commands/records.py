"""Runs as records: every source of runs (run dirs here; W&B in wandb_runs.py) gives the same
`Record`, the run's flat config and results, so `fgvr table` never depends on where runs came from."""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fgvr.runtime.config import upgrade, with_defaults
from fgvr.runtime.errors import DataError
from fgvr.runtime.rundir import RunDir
from fgvr.runtime.tracker import flatten, is_run_dir


@dataclass
class Record:
    source: str  # where the run is: its run dir, or its W&B page
    # results.json's (finished, failed, interrupted); "no results" or "unreadable" without one; from W&B
    # also running, crashed, killed, or "no summary" (finished without fgvr's results)
    status: str
    config: dict[str, Any]  # flat: {"optim.lr": 0.01, ...}
    results: dict[str, Any]  # flat results.json: {"test_acc": 90.1, "cost.gflops_per_image.total": 17.6, ...}
    # when the run ended, in seconds since the epoch: results.json's ended_at (its file's time for runs
    # from before it), or W&B's last heartbeat; None if unknown
    ended: float | None = None

    def __post_init__(self) -> None:
        if "selector" in self.results:  # fgvr's results; runs from before methods (or tta) had none
            self.results.setdefault("method", "none")
            # How the test figures were made: a re-evaluation (resume=evaluate) may have changed it.
            self.config["eval.tta"] = self.results.setdefault("tta", "none")

    def get(self, key: str) -> Any:
        """A results field (selector, dataset, test_acc, ...) or else a config key (data.img_size, ...)."""
        return self.results[key] if key in self.results else self.config.get(key)


def run_dirs(paths: list[str]) -> list[Path]:
    """Run dirs named by `paths`: run dirs, sweep dirs (searched below) and glob patterns."""
    found: list[Path] = []
    for pattern in paths:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(Path(m).exists() for m in matches):
            raise DataError(f"{pattern}: no such run dir or sweep dir")
        for match in map(Path, matches):
            if is_run_dir(match):
                found.append(match)
                continue
            for root, dirs, _ in os.walk(match):
                dirs.sort(key=_natural)  # job 2 before job 10
                if is_run_dir(Path(root)):
                    found.append(Path(root))
                    dirs.clear()  # a run dir holds no other run
    return list(dict.fromkeys(p.resolve() for p in found))


def _natural(name: str) -> list:
    """Sort key: runs of digits compare as numbers (2 before 10, 2_vit before 10_cal)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def read_run_dir(path: Path) -> Record:
    run = RunDir(path)
    config_file = run.config
    try:
        config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else {}
        config = flatten(with_defaults(upgrade(config)), ".")  # an older fgvr's keys as today's, added ones at their defaults
    except Exception as e:  # yaml's and OmegaConf's errors
        raise DataError(f"{config_file}: not a readable config ({type(e).__name__}); restore or remove it") from None
    try:
        results = json.loads(run.results.read_text())
    except FileNotFoundError:
        return Record(str(path), "no results", config, {})
    except json.JSONDecodeError:
        return Record(str(path), "unreadable", config, {})
    ended = results.get("ended_at") or run.results.stat().st_mtime  # runs before ended_at: the file's time
    return Record(str(path), results.get("status", "no results"), config, flatten(results, "."), ended)
