"""Stopping at a step boundary when the job is told to stop.

SLURM sends SIGUSR2 `signal_delay_s` before a job's time limit (and, on clusters that set
PreemptParameters=send_user_signal, on preemption); preemption otherwise sends SIGTERM. A signal
can land in the middle of a step, where nothing consistent can be saved, so the handler only
records it. The loop asks `requested` after every optimizer step; when set, it saves
checkpoints/last.pt there and stops. The caller then sends the signal again to whoever listened
before: submitit's handler writes the job's resubmission and requeues it (the requeued job
resumes from last.pt in the same run dir); a plain process ends as the signal says.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped at a step boundary on a signal, with its checkpoint saved."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class StopOnSignal:
    """While active, SIGTERM, SIGUSR2 and a first Ctrl-C (SIGINT) only set `requested` (the signal
    number); a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame) -> None:
        # Only a flag: a handler may run inside any call, logging's own writes included.
        if os.getpid() != self._pid:  # a forked data loader worker: the main process decides
            return
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without saving
        self.requested = signum

    def __enter__(self) -> StopOnSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# How long a data loader worker outlives a SIGTERM: long enough for the main process to finish
# its step and save (SLURM itself waits KillWait, 30 s by default, before SIGKILL).
WORKER_GRACE_S = 30.0


def protect_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn. SLURM signals every process of a job step, workers included; a
    worker that died at once would fail the main process's step before it could save.

    SIGUSR2 and SIGINT are ignored. SIGTERM ends the worker WORKER_GRACE_S later instead of at once (the
    DataLoader also uses SIGTERM to end a stuck worker, so it cannot simply be ignored); by then
    the main process has saved and shut its workers down."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main process decides
    signal.signal(signal.SIGTERM, _exit_later)


def _exit_later(signum, frame) -> None:
    timer = threading.Timer(WORKER_GRACE_S, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
