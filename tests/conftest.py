"""Shared fixtures. Tests are hermetic: no network, no hub downloads, data made here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.update(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", WANDB_SILENT="true")

REPO = Path(__file__).resolve().parents[1]
FGVR = Path(sys.executable).with_name("fgvr")  # the console script of the venv running the tests

# A run that finishes in seconds on 2 cores: the 4-block ViT at 32 px on a 4-class synthetic set.
TINY = [
    "backbone=vit_micro", "data.img_size=32", "data.batch_size=16", "data.num_workers=0",
    "data.synth.num_classes=4", "data.synth.train_per_class=24", "data.synth.test_per_class=8",
    "data.synth.image_size=48", "trainer.epochs=2", "trainer.log_every=2", "optim.warmup_steps=2",
]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """Generated data sets go to a per-session cache (also for `fgvr` subprocesses)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["FGVR_CACHE_DIR"] = str(path)
    return path


def fgvr(*args: str, cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `fgvr` console script as a user would."""
    proc = subprocess.run([str(FGVR), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fgvr {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny steps (`pytestmark = pytest.mark.usefixtures("one_thread")`): one thread runs them
    as fast as two, and does not slow tenfold when other processes hold the cores (the threads' barriers spin)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose():
    """Compose the real train config with overrides, as `fgvr train` would (no run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fgvr.runtime.config import config_dir, register_schemas

    register_schemas()

    def _compose(*overrides: str, config_name: str = "train"):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides))

    return _compose


@pytest.fixture
def train_run(compose, tmp_path):
    """Train in-process on a composed config; returns (results, run dir)."""
    from fgvr.engine.trainer import train
    from fgvr.runtime.tracker import RunInfo

    def _train(*overrides: str, run_dir: Path | None = None, choices: dict | None = None):
        on_files = any(o.startswith("data=") and o != "data=synth" for o in overrides)  # a miniature benchmark
        base = [o for o in TINY if not o.startswith("data.synth.")] + ["data.check_counts=false"] if on_files else TINY
        cfg = compose(*base, *overrides)
        run = RunInfo(run_dir or tmp_path / "run", "test", choices=choices or {})
        run.dir.mkdir(parents=True, exist_ok=True)
        return train(cfg, run), run.dir

    return _train


def write_cub(root: Path, num_classes: int = 3, per_class: int = 6, size: int = 40) -> Path:
    """A miniature CUB-200-2011 folder: the official files, 1-based ids, boxes, and the image
    modes real CUB has (a few grayscale JPEGs). Each class has its own colour, so it is learnable."""
    import numpy as np

    from fgvr.data.synth import write_cub as write_layout

    rng = np.random.default_rng(0)

    def images():
        for c in range(1, num_classes + 1):
            for j in range(per_class):
                pixels = rng.integers(0, 60, (size, size + 8, 3), dtype=np.uint8)
                pixels[8:32, 8:32, c % 3] = 230
                if ((c - 1) * per_class + j + 1) % 5 == 0:  # every fifth image grey
                    pixels = (pixels @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
                yield c - 1, f"Bird_{c}_{j:04d}.jpg", pixels, j % 3 != 0, (8.0, 8.0, 24.0, 24.0)

    return write_layout(root, [f"{c:03d}.Bird_{c}" for c in range(1, num_classes + 1)], images(), quality=90)


@pytest.fixture
def cub_root(tmp_path) -> Path:
    return write_cub(tmp_path / "CUB_200_2011")


@pytest.fixture
def stray_signals():
    """For a test that signals its own process: a SIGUSR2 or SIGTERM that lands while no run's
    handler is installed is recorded here (the test asserts there was none) instead of ending the
    whole pytest run, as their default action would."""
    import signal

    stray: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: stray.append(signum))
                for s in (signal.SIGUSR2, signal.SIGTERM)}
    yield stray
    for s, handler in previous.items():
        signal.signal(s, handler)
