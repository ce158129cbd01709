"""`fgvr table --source wandb`: the same table from W&B runs, read through wandb's real public API
(and wandb-core's HTTP) from a local server replaying the GraphQL exchanges in wandb_api/."""

import json
from pathlib import Path

import pytest

import fgvr.commands.wandb_runs as wandb_runs
from fgvr.cli import main
from fgvr.commands.wandb_runs import parse_filters
from tests.commands.fake_wandb import FakeWandb

CASSETTES = Path(__file__).parent / "wandb_api"
GOLDEN = Path(__file__).parent / "golden"
PROJECT = ["--source", "wandb", "--project", "fgvr-lab/fgvr"]


@pytest.fixture
def wandb_server(monkeypatch):
    """Start the fake W&B server on a cassette and point wandb (key, base URL) at it."""
    servers = []

    def start(cassette: str) -> FakeWandb:
        fake = FakeWandb(CASSETTES / cassette).__enter__()
        servers.append(fake)
        monkeypatch.setenv("WANDB_BASE_URL", fake.url)
        monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
        return fake

    monkeypatch.setattr(wandb_runs, "RETRY_WAIT", (1.0, 1.0))
    yield start
    for fake in servers:
        fake.__exit__()


def runs_requests(fake: FakeWandb) -> list:
    return [v["cursor"] for op, v in fake.requests if op == "Runs"]


def test_wandb_runs_give_the_same_table_as_their_run_dirs(wandb_server, monkeypatch, capsys):
    """The golden sweep as W&B holds it, 12 runs in pages of 5: the golden table, to the byte."""
    fake = wandb_server("table4_group.json")
    monkeypatch.setattr(wandb_runs, "PER_PAGE", 5)
    main(["table", *PROJECT, "--group", "table4", "--extra", "train_img_per_s,cost.gflops_per_image.total"])
    assert capsys.readouterr().out == (GOLDEN / "table.md").read_text()
    cursors = runs_requests(fake)
    assert len(cursors) == 3 and cursors[0] is None and len(set(cursors)) == 3  # each page once, after the last
    assert fake.unmatched == []


def test_a_page_that_fails_is_fetched_again(wandb_server, monkeypatch, capsys):
    fake = wandb_server("table4_group.json")
    monkeypatch.setattr(wandb_runs, "PER_PAGE", 5)
    fake.fail("Runs", times=2, status=503)
    main(["table", *PROJECT, "--group", "table4", "--format", "json"])
    cells = json.loads(capsys.readouterr().out)["cells"]
    assert sum(c["n"] for c in cells) == 12  # every run, none twice
    assert len(runs_requests(fake)) == 3 + 2 and fake.unmatched == []


def test_a_server_that_stays_down_is_one_line(wandb_server, monkeypatch, capsys):
    fake = wandb_server("table4_group.json")
    monkeypatch.setattr(wandb_runs, "RETRIES", 1)
    fake.fail("Runs", times=10, status=500)
    with pytest.raises(SystemExit) as e:
        main(["table", *PROJECT, "--group", "table4"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and "reading the runs of fgvr-lab/fgvr failed" in err
    assert len(runs_requests(fake)) == 2  # the request and its one retry


def test_runs_that_cannot_be_in_the_table_are_listed_with_their_w_and_b_page(wandb_server, capsys):
    """--filters and --group together; a run still going, one that crashed, one that failed, one
    that fgvr did not make: listed under the table with why, the finished one in it."""
    fake = wandb_server("left_out.json")
    main(["table", *PROJECT, "--group", "table4", "--filters", '{"config.data.name": "cub"}'])
    out = capsys.readouterr().out
    assert "| glsim | 90.50 (1) |" in out
    for why, run in [("still running", "r1nn1ng0"), ("crashed: W&B lost contact with it", "cr4sh3d0"),
                     ("failed: DataError: data.root=/data/cub: no such folder", "f41l3d00"),
                     ("W&B has no fgvr results for it (its summary lacks status)", "n0fgvr00")]:
        assert f"  {why}: {fake.url}/fgvr-lab/fgvr/runs/{run} (glsim-cub-s10)" in out
    assert "not in the table (4 runs)" in out and fake.unmatched == []


@pytest.mark.parametrize("args,message", [
    (["--project", "fgvr-lab/nope"], "W&B: no project fgvr-lab/nope, or no access to it; check --project"),
    (["--project", "fgvr-lab/fgvr", "--group", "nosuch"], "W&B fgvr-lab/fgvr: no runs in group nosuch"),
    (["--project", "fgvr-lab/fgvr", "outputs/multirun"], "--source wandb takes --project ENTITY/PROJECT and no paths"),
    (["--source", "dirs", "outputs/multirun", "--group", "g"], "--project, --group and --filters go with --source"),
    (["--project", "fgvr"], "--project fgvr: give it as ENTITY/PROJECT"),
    (["--project", "fgvr-lab/fgvr", "--filters", "{config.data.name: cub}"], "--filters {config.data.name: cub}: "
     "not JSON"),
])
def test_wandb_errors_are_one_line(wandb_server, capsys, args, message):
    wandb_server("left_out.json")
    with pytest.raises(SystemExit) as e:
        main(["table", "--source", "wandb", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code in (1, 2) and "\n" not in err and message in err


def test_credentials_the_server_refuses_are_one_line(wandb_server, capsys):
    fake = wandb_server("left_out.json")
    viewer = next(i for i in fake.interactions if i["operation"] == "Viewer")
    viewer["response"] = {"data": {"viewer": None}}  # W&B's answer to an API key it does not know
    with pytest.raises(SystemExit):
        main(["table", *PROJECT])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "log in with `wandb login` or set WANDB_API_KEY" in err


def test_group_and_filters_make_one_query():
    assert parse_filters(None, None) == {}
    assert parse_filters(None, "table4") == {"group": "table4"}
    assert parse_filters('{"tags": "paper"}', "g") == {"$and": [{"tags": "paper"}, {"group": "g"}]}
