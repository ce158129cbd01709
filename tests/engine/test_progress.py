import io
import sys

import pytest
from rich.console import Console

from fgvr.engine.progress import EpochProgress


def test_progress_bar_on_a_terminal_shows_rate_loss_and_lr():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    progress = EpochProgress("epoch 1/2", total=4, enabled=True, console=console)
    with progress:
        for _ in range(4):
            progress.advance()
        progress.show({"loss": 0.5, "lr": 1e-3, "img_per_s": 123.0})
        progress.progress.refresh()
    text = buffer.getvalue()
    assert "epoch 1/2" in text and "4/4" in text and "123 img/s" in text and "loss 0.500" in text


@pytest.mark.parametrize("tty", [True, False])
def test_the_bar_follows_whether_stdout_is_a_terminal(monkeypatch, tty):
    """By default (enabled=None) the bar is drawn on a terminal and not in a log file (SLURM's
    output, a redirect), where the trainer writes plain log lines instead."""

    class Stdout(io.StringIO):
        def isatty(self) -> bool:
            return tty

    monkeypatch.setattr(sys, "stdout", Stdout())
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)  # draws whatever it is asked to
    with EpochProgress("epoch 1/2", total=4, console=console) as progress:
        progress.advance()
        progress.show({"loss": 0.5, "lr": 1e-3, "img_per_s": 1.0})
        if progress.progress is not None:
            progress.progress.refresh()
    assert progress.live == tty and ("epoch 1/2" in buffer.getvalue()) == tty
