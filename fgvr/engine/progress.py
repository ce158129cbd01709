"""Terminal progress: a rich progress bar per epoch on a TTY; nothing otherwise (the trainer
then writes plain periodic log lines)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class EpochProgress:
    def __init__(self, description: str, total: int, completed: int = 0, enabled: bool | None = None,
                 console: Console | None = None):
        self.live = sys.stdout.isatty() if enabled is None else enabled
        self.progress = None
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), transient=True,
                                     console=console)
            self.task = self.progress.add_task(description, total=total, completed=completed, stats="")

    def __enter__(self) -> "EpochProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def show(self, event: dict) -> None:
        if self.progress is not None:
            stats = f"loss {event['loss']:.3f} | lr {event['lr']:.1e} | {event['img_per_s']:.0f} img/s"
            self.progress.update(self.task, stats=stats)
