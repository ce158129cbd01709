"""`fgvr viz` of a run logged to W&B: the figures go to a new W&B run (job_type viz) in the run's
group, never into the run's own W&B run, whose state (finished, failed) stays as it ended. Offline
(tests/conftest.py), with what wandb.init receives recorded."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import wandb
from omegaconf import OmegaConf

from fgvr.commands.viz import _to_wandb


@pytest.fixture
def inits(monkeypatch) -> list[dict]:
    """The keyword arguments of every wandb.init, which still runs (offline)."""
    calls, real = [], wandb.init

    def init(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    return calls


def loaded_run(run_dir, group: str | None = None):
    """What load_run gives for a run dir of `fgvr train ... logger=wandb` whose W&B run is orig1234."""
    cfg = OmegaConf.create({"name": "cub", "logger": {"_target_": "fgvr.runtime.tracker.init_wandb", "project": "fgvr",
                                                      "entity": None, "mode": None, "tags": ["paper"]}})
    state = {"wandb_id": "orig1234", "run_name": "cub selector=glsim seed=1", "run_group": group}
    return SimpleNamespace(path=run_dir / "checkpoints" / "last.pt", state=state, cfg=cfg)


def figure_rows(tmp_path) -> list:
    cv2.imwrite(str(tmp_path / "test_000.png"), np.zeros((8, 8, 3), np.uint8))
    return [(tmp_path / "test_000.png", "a", "b", False)]


def test_viz_logs_to_a_new_wandb_run_never_resuming_the_original(tmp_path, inits):
    run = loaded_run(tmp_path / "run")
    _to_wandb(run, figure_rows(tmp_path), "test", tmp_path / "run" / "viz")
    (kwargs,) = inits
    assert kwargs["id"] is None and kwargs["resume"] is None  # a new run: the original's is left as it ended
    assert kwargs["group"] == "orig1234" and kwargs["job_type"] == "viz" and kwargs["tags"] == ["paper"]
    assert kwargs["name"] == "cub selector=glsim seed=1-viz"  # as `fgvr train` named the original, and -viz
    (log,) = (tmp_path / "run" / "viz" / "wandb").glob("offline-run-*/run-*.wandb")
    assert log.stem != "run-orig1234"  # the original's id gets no new file


def test_viz_of_a_sweep_run_joins_the_sweep_group(tmp_path, inits):
    _to_wandb(loaded_run(tmp_path / "3", group="table4"), figure_rows(tmp_path), "val", tmp_path)
    assert inits[0]["group"] == "table4" and inits[0]["id"] is None
