"""A run directory and its contract.

    <run dir>/
      .hydra/config.yaml, overrides.yaml, hydra.yaml   the config, once the run is accepted
      train.log                                         the console log of every launch into it
      metrics.jsonl                                     one JSON event a line (train, val, test, resumed, ...)
      checkpoints/last.pt, best.pt                      weights-only checkpoints
      results.json                                      written at the end: status, accuracy, cost, ...
      backbone.safetensors                              trainer.export_backbone=true
      eval_<split>.json, viz/                           fgvr eval, fgvr viz
      .lock                                             there while a process writes the run (its flock)

One process writes a run dir at a time: a second launch into it stops in one line. A launch
that is refused (other settings, a finished run) writes nothing there; the config and the
log file are only written once the run is accepted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fgvr.runtime.errors import FgvrError
from fgvr.runtime.files import write_text_atomic

log = logging.getLogger(__name__)

# The lock files this process holds. A forked child (a data loader worker) closes its copies at once:
# an flock lasts while any copy is open, and a worker that outlived a killed main process would
# otherwise keep the run dir locked against the job that resumes it.
_held: set[int] = set()


def _close_held() -> None:
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_held)


def checkpoint_in(path: str | Path) -> Path:
    """The checkpoint a `ckpt=` or `resume=` value names: a run dir's checkpoints/last.pt, or the file."""
    path = Path(path).expanduser()
    return RunDir(path).last if path.is_dir() else path


class RunDir:
    """The files of one run, by name; `locked()` while writing them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.hydra = self.path / ".hydra"
        self.config = self.hydra / "config.yaml"
        self.log = self.path / "train.log"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.results = self.path / "results.json"
        self.backbone = self.path / "backbone.safetensors"
        self.viz = self.path / "viz"
        self.bench = self.path / "bench.json"  # fgvr bench's numbers
        self.lock_file = self.path / ".lock"

    def eval_file(self, split: str) -> Path:
        return self.path / f"eval_{split}.json"

    def read_results(self) -> dict | None:
        """results.json of an earlier launch; None if there is none (or it is not valid JSON)."""
        try:
            return json.loads(self.results.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run dir's lock: an flock on .lock, which exists while it is held. The lock ends
        with the process however it ends; another process holding it is one line."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = self._acquire()
        if fd is None:
            yield
            return
        _held.add(fd)
        try:
            yield
        finally:
            _held.discard(fd)
            self.lock_file.unlink(missing_ok=True)  # before the lock ends: whoever opened it sees it replaced
            os.close(fd)

    def _acquire(self) -> int | None:
        """The locked .lock's descriptor; None where the file system has no locks (warned once)."""
        while True:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a read-only file system, no permission
                raise FgvrError(f"{self.path}: cannot write into this run dir ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise FgvrError(f"{self.path}: another fgvr process is writing this run dir right now; wait "
                                    "for it to end, or give this run another hydra.run.dir") from None
                if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                    log.warning("%s: this file system does not lock files (%s); nothing stops two launches into "
                                "one run dir", self.path, e.strerror)
                    return None
                raise
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder removed it as we opened it: take the one there now

    def ensure_idle(self, hint: str) -> None:
        """One line (ending with `hint`) if a process is writing the run dir; takes no lock itself."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise FgvrError(f"{self.path}: a process is writing this run dir right now; wait for it to end, "
                                f"{hint}") from None
        finally:
            os.close(fd)

    def write_config(self, config: Any, files: dict[str, str]) -> None:
        """Record the accepted run's config in .hydra/ (and `files`, Hydra's others: overrides.yaml, ...)."""
        from omegaconf import OmegaConf

        write_text_atomic(self.config, OmegaConf.to_yaml(config))
        for name, text in files.items():
            write_text_atomic(self.hydra / name, text)

    @contextmanager
    def logging_to_file(self) -> Iterator[None]:
        """While active, the root logger's records also go to train.log, formatted as on the console."""
        root = logging.getLogger()
        handler = logging.FileHandler(self.log)
        console = next((h.formatter for h in root.handlers if h.formatter is not None), None)
        handler.setFormatter(console or logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            handler.close()

    def discard_if_empty(self) -> None:
        """Remove the folder if nothing was written into it (Hydra makes it before the task runs)."""
        try:
            self.path.rmdir()
        except OSError:
            pass

