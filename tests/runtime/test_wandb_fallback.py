"""logger=wandb with a key but no W&B server in reach: one warning, and the run goes on offline
(its results written as always) instead of dying after wandb's 90 s. Hermetic: the server is a
closed port on 127.0.0.1, so nothing leaves this machine."""

import logging
import re
import socket
import time

import pytest
import wandb
from omegaconf import OmegaConf

import fgvr.runtime.tracker as run_module
from fgvr.runtime.tracker import RunInfo, RunLogger, start_logger


@pytest.fixture
def unreachable(monkeypatch):
    """A W&B key and a base URL on a loopback port nothing listens on; its port. wandb reads them
    when it is set up, so its setup from earlier tests goes first, and this one after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wandb.teardown()
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no crash reports to W&B's Sentry either
    monkeypatch.delenv("WANDB_MODE", raising=False)
    yield port
    wandb.teardown()


def logger_cfg(mode: str | None = "online"):
    return OmegaConf.create({"_target_": "fgvr.runtime.tracker.init_wandb", "project": "fgvr", "entity": None,
                             "mode": mode, "tags": []})


def check_offline_fallback(tmp_path, caplog, port: int, limit: float) -> None:
    caplog.set_level(logging.WARNING, logger="fgvr.runtime.tracker")
    start = time.monotonic()
    run = start_logger(logger_cfg(), tmp_path, "abcd1234", name="x")
    took = time.monotonic() - start
    try:
        assert run.offline and run.settings.mode == "offline" and run.id == "abcd1234"  # the id it was asked for
        assert took < limit, took
        (warning,) = [r.getMessage() for r in caplog.records if r.name == "fgvr.runtime.tracker"]
        # the host tried (loopback only: nothing left this machine), and the last cause wandb-core saw: the
        # refused connection, or the request that the deadline cut short
        assert re.match(rf"W&B: could not reach 127.0.0.1:{port} within {run_module.INIT_TIMEOUT:g} s "
                        r"\((connection refused|timed out)\); logging offline to ", warning), warning
        assert "\n" not in warning and f"upload later with `wandb sync {tmp_path / 'wandb'}/offline-run-" in warning
    finally:
        run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-abcd1234.wandb"))


def test_an_unreachable_wandb_server_falls_back_to_offline_fast(unreachable, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(run_module, "INIT_TIMEOUT", 2.0)
    check_offline_fallback(tmp_path, caplog, unreachable, limit=2.0 + 8)


@pytest.mark.slow  # waits the real INIT_TIMEOUT (20 s)
def test_an_unreachable_wandb_server_costs_at_most_about_30_s(unreachable, tmp_path, caplog):
    check_offline_fallback(tmp_path, caplog, unreachable, limit=32)


def test_a_run_whose_wandb_server_is_unreachable_still_writes_its_results(unreachable, monkeypatch, tmp_path):
    monkeypatch.setattr(run_module, "INIT_TIMEOUT", 1.0)
    logger = RunLogger(RunInfo(tmp_path, "x"), logger_cfg(None), {"seed": 0})  # mode from the key: online
    logger.log(step=1, epoch=0, split="train", loss=1.0)
    logger.finish({"status": "finished", "test_acc": 50.0})
    assert (tmp_path / "results.json").is_file() and logger.wandb.settings.mode == "offline"
