"""The device a process runs on: which one, its autocast precision, seeding, batches moved onto
it, and its peak memory."""

from __future__ import annotations

import os
import random
import resource

import numpy as np
import torch

from fgvr.runtime.config import Precision
from fgvr.runtime.errors import ConfigError


def resolve_device(spec: str, key: str = "trainer.device") -> torch.device:
    """`spec` (auto | cpu | cuda | cuda:N) as a device; `key` names the setting in errors."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"{key}={spec}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={spec}: CUDA is not available here; use {key}=cpu or auto")
    return device


def autocast_dtype(precision: Precision | str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32."""
    precision = Precision(precision)
    if precision is Precision.auto:
        return torch.bfloat16 if device.type == "cuda" else None
    return {Precision.fp32: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[precision]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A host batch to the device, asynchronously from pinned memory; channels_last for CNNs."""
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=fmt), labels.to(device, non_blocking=True)
