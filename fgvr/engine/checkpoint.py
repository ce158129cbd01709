"""Checkpoints: written to a temporary name and renamed, so a kill never leaves half a file."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgvr.errors import FgvrError


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """A state dict as safetensors (tensors only: loading it runs no code), written atomically;
    the temporary file is removed if the write fails."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FgvrError(f"{path}: checkpoint not found")
    try:
        # Our own files: they hold RNG states and the config, which weights_only cannot load.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise FgvrError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
