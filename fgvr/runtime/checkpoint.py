"""Checkpoints: written atomically, read without running code.

A checkpoint holds tensors and plain Python values only (dicts, lists, tuples, str, numbers,
None), so `torch.load(weights_only=True)` reads it: a crafted file handed to `ckpt=`, `resume=`
or `backbone.checkpoint=` cannot execute anything. Checkpoints written before this format kept
NumPy's RNG state as an array; they load through the same restricted reader with NumPy's array
reconstruction allowed, and nothing else."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fgvr.runtime.errors import FgvrError, first_few, first_line
from fgvr.runtime.files import atomic_write, load_weights_only, unsafe_global, write_bytes_atomic

# What a checkpoint of fgvr train holds besides the weights; a file without these is not one.
REQUIRED = ("model", "config", "classes", "epoch", "step")


def atomic_save(obj: dict, path: str | Path) -> None:
    """torch.save to a temporary name, renamed into place; a failed write removes it."""
    atomic_write(path, lambda f: torch.save(obj, f), size_hint=tensor_bytes(obj))


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a nested dict/list: about the size of its torch.save file."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """A state dict as safetensors (tensors only: loading it runs no code), written atomically."""
    from safetensors.torch import save

    write_bytes_atomic(path, save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, metadata))


def _numpy_array_globals() -> list:
    """What unpickling a NumPy array needs (checkpoints written before RNG states were tensors)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load(path: str | Path) -> dict:
    """An fgvr checkpoint, read with torch's weights-only unpickler."""
    path = Path(path)
    if not path.is_file():
        raise FgvrError(f"{path}: checkpoint not found")
    try:
        state = load_weights_only(path, _numpy_array_globals())
    except pickle.UnpicklingError as e:
        found = unsafe_global(e)
        if found is None:
            reason = re.search(r"WeightsUnpickler error: \s*(.+)", str(e))
            raise FgvrError(f"{path}: not a readable checkpoint (not only tensors and plain values"
                            f"{': ' + reason.group(1).strip() if reason else ''})") from None
        raise FgvrError(f"{path}: refused to load: it holds pickled objects other than tensors and plain values "
                        f"({found}), which could run code; fgvr reads only checkpoints written by fgvr "
                        "train") from None
    except Exception as e:
        raise FgvrError(f"{path}: not a readable checkpoint ({first_line(e, typed=True)})") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        keys = f"{len(state)} entries: {first_few(list(state))}" if isinstance(state, dict) else type(state).__name__
        raise FgvrError(f"{path}: not a checkpoint of fgvr train (no {', '.join(missing)}; it holds {keys}); "
                        "pass a run dir or its checkpoints/last.pt, or load bare backbone weights with "
                        "backbone.checkpoint=")
    return state


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path, config: dict) -> None:
    """load_state_dict, or one line saying which keys and shapes differ and what the checkpoint
    was trained with."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        differ = weights_diff(model.state_dict(), weights)
        raise FgvrError(f"{path}: its weights do not fit the model its config builds ({differ}); it was trained "
                        f"with {describe(config)}") from None


def weights_diff(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], shown: int = 3) -> str:
    """'missing a, b (+3 more); unexpected c; shape of d: 8x4 in the file, 16x4 in the model'."""
    parts = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and tuple(expected[k].shape) != tuple(given[k].shape)]
    if missing:
        parts.append(f"missing {first_few(missing, shown)}")
    if unexpected:
        parts.append(f"unexpected {first_few(unexpected, shown)}")
    for k in shapes[:shown]:
        parts.append(f"shape of {k}: {'x'.join(map(str, given[k].shape))} in the file, "
                     f"{'x'.join(map(str, expected[k].shape))} in the model")
    return "; ".join(parts) or "values the model refused"


def describe(config: dict) -> str:
    """'backbone=vit_micro selector=GLSimSelector ... img_size=64': what a run was trained with."""
    def target(section: str) -> str:
        node = config.get(section) or {}
        return str(node.get("_target_", "none")).rsplit(".", 1)[-1] if isinstance(node, dict) else "none"

    data = config.get("data") or {}
    return (f"backbone={(config.get('backbone') or {}).get('name')} selector={target('selector')} "
            f"texture={target('texture')} head={target('head')} data={data.get('name')} "
            f"img_size={data.get('img_size')}")


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (the weights-only reader loads them)."""
    numpy = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)), "pos": numpy["state"]["pos"],
                       "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                             numpy["gauss"]))
    else:  # a checkpoint from before: NumPy's legacy tuple
        np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
