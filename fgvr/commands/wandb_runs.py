"""`fgvr table --source wandb`: the runs of a W&B project as table records, through wandb's
public API, for runs made on other machines.

fgvr logs the resolved config as the W&B config and results.json, flattened with "/", as the
summary (runtime/tracker.py), so a W&B run gives the same `Record` as its run dir: the config
flattened with ".", the summary with its "/" read as ".".
"""

from __future__ import annotations

import json
from typing import Any

from fgvr.commands.records import Record
from fgvr.runtime.config import upgrade, with_defaults
from fgvr.runtime.errors import ConfigError, DataError, first_line
from fgvr.runtime.tracker import flatten

PER_PAGE = 50  # runs per API request
# wandb-core retries a request that failed with a timeout, 429 or 5xx, waiting between `RETRY_WAIT`
# seconds (doubling): a server that keeps failing ends the table in about 2 minutes (one that never
# answers in 6), with one line, instead of never.
RETRIES, RETRY_WAIT, REQUEST_TIMEOUT = 6, (2.0, 60.0), 30.0
# W&B's states of a run that has not ended; once it has, fgvr's status in the summary says how.
ACTIVE = ("pending", "running", "preempting")


def parse_filters(text: str | None, group: str | None) -> dict:
    """--filters (a JSON MongoDB query, as wandb.Api().runs takes it) and --group, together."""
    filters: dict = {}
    if text:
        try:
            filters = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--filters {text}: not JSON ({e.msg}); e.g. "
                              "--filters '{\"config.data.name\": \"cub\", \"state\": \"finished\"}'") from None
        if not isinstance(filters, dict):
            raise ConfigError(f"--filters {text}: a JSON object is needed, e.g. '{{\"tags\": \"paper\"}}'")
    if group is not None:
        filters = {"$and": [filters, {"group": group}]} if filters else {"group": group}
    return filters


def to_record(run: Any) -> Record:
    """A W&B run (config + summary) as the record its run dir would give."""
    summary = {k.replace("/", "."): v for k, v in flatten(dict(run.summary_metrics), ".").items()
               if not k.startswith("_")}  # W&B's own _step, _runtime, _wandb ...
    config = flatten(with_defaults(upgrade(dict(run.config))), ".")  # wandb leaves its own _wandb out; an older fgvr's keys as today's
    if run.state in ACTIVE:
        status = "running"
    else:  # without fgvr's status, the run died before its end: W&B's crashed, killed or failed
        status = summary.get("status", run.state if run.state != "finished" else "no summary")
    return Record(f"{run.url} ({run.name})", status, config, summary, ended(run))


def ended(run: Any) -> float | None:
    """When a W&B run ended (seconds since the epoch): its last heartbeat, else its last logged time."""
    from datetime import datetime, timezone

    heartbeat = getattr(run, "heartbeat_at", None)
    if isinstance(heartbeat, str):
        try:
            at = datetime.fromisoformat(heartbeat.replace("Z", "+00:00"))
            return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()  # W&B's times are UTC
        except ValueError:
            pass
    timestamp = dict(run.summary_metrics).get("_timestamp")
    return float(timestamp) if isinstance(timestamp, (int, float)) else None


def read_wandb(project: str, group: str | None = None, filters: str | None = None) -> list[Record]:
    """The runs of ENTITY/PROJECT, oldest first (so a sweep's runs in job order), page by page."""
    import wandb
    from wandb.sdk.lib.service.service_connection import WandbApiFailedError

    if project.count("/") != 1 or not all(project.split("/")):
        raise ConfigError(f"--project {project}: give it as ENTITY/PROJECT, e.g. --project my-team/fgvr")
    query = parse_filters(filters, group)
    wandb.setup(wandb.Settings(x_graphql_retry_max=RETRIES, x_graphql_retry_wait_min_seconds=RETRY_WAIT[0],
                               x_graphql_retry_wait_max_seconds=RETRY_WAIT[1],
                               x_graphql_timeout_seconds=REQUEST_TIMEOUT))
    # Waiting on wandb-core: longer than all its retries of one request together.
    patience = (RETRIES + 1) * REQUEST_TIMEOUT + sum(min(RETRY_WAIT[0] * 2 ** i, RETRY_WAIT[1]) for i in range(RETRIES))
    try:
        api = wandb.Api(timeout=int(patience) + 10)
    except wandb.Error as e:  # no credentials, the server refused them, or no server there
        text = first_line(e)
        hint = "; log in with `wandb login` or set WANDB_API_KEY"
        if "wandb login" in text or "giving up" in text:  # wandb said so already, or the server is not there
            hint = ""
        raise DataError(f"W&B: {text}{hint}") from None
    runs = api.runs(project, filters=query, per_page=PER_PAGE, lazy=False)
    try:
        return [to_record(run) for run in runs]
    except (WandbApiFailedError, wandb.Error) as e:
        raise DataError(f"W&B: reading the runs of {project} failed: {first_line(e)}") from None
    except ValueError:
        if runs.last_response is not None and runs.last_response.get("project") is None:
            raise DataError(f"W&B: no project {project}, or no access to it; check --project") from None
        raise
