import io

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


def test_no_progress_bar_off_a_terminal():
    with EpochProgress("epoch 1/2", total=4, enabled=False) as progress:
        progress.advance()
        progress.show({"loss": 0.5, "lr": 1e-3, "img_per_s": 1.0})
    assert not progress.live
