"""Writes that matter: to a temporary name in the same folder, then renamed into place, so a
reader never sees half a file (or folder) and a failed write leaves nothing behind but the old one."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from fgvr.runtime.errors import FgvrError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], size_hint: int | None = None) -> None:
    """Call `write` on a temporary file next to `path`, sync it and rename it to `path`.

    On failure the temporary file is removed and `path` keeps its previous content; a full disk or
    another OS error is one line naming the path (and, for a full disk, the space it needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        _remove(tmp)  # first: the space it took counts as free in the message
        # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise write_error(path, cause, size_hint) from None
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A fresh folder next to `path` to fill; renamed to `path` when the block ends without an error,
    removed otherwise. Where another process put `path` there first (it built the same thing), its
    folder stays and this one is dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        tmp = holder / path.name  # made by mkdir, so with the usual permissions (mkdtemp's are 0700)
        tmp.mkdir()
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only file system: nothing was written there either
        pass


def write_error(path: Path, e: OSError, size_hint: int | None = None) -> FgvrError:
    """An OSError while writing `path` as one line; for a full disk, how much was needed and free."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        need = f"about {size_hint / 2**20:.1f} MB needed, " if size_hint else ""
        return FgvrError(f"{path}: no space left on the device ({need}{free / 2**20:.1f} MB free); "
                         "free some space or move the run dir, then relaunch")
    return FgvrError(f"{path}: cannot write ({e.strerror or e})")


def load_weights_only(path: str | Path, allowed: list | tuple = ()) -> Any:
    """torch.load with torch's weights-only unpickler (tensors and plain values, plus the `allowed`
    globals): nothing in the file runs. Raises what torch raises; `unsafe_global` reads it."""
    import warnings

    import torch

    with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on pickle protocols: its error says it all
        return torch.load(path, map_location="cpu", weights_only=True)


def unsafe_global(error: Exception) -> str | None:
    """The pickled global (e.g. posix.system) the weights-only unpickler refused to load, if that is
    why `error` was raised."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), len(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())
