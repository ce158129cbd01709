"""A W&B server on localhost that replays GraphQL exchanges kept in a file (a cassette) to the
real `wandb.Api`, so the W&B reader is tested through wandb's own client, wandb-core's HTTP and
the server's wire format, without a network. Each cassette's `_source` says how it was made.

A cassette (tests/commands/wandb_api/*.json) lists `interactions`: an operation name, the
variables the client must send, and the response. A request that matches none of them gets a
GraphQL error (and is kept in `unmatched`), so a reader that asks for the wrong page, filters or
project fails its test. `fail` makes the next requests of an operation answer an HTTP status
instead, to test retries.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def operation(body: dict) -> str:
    """The operation's name: wandb sends some queries with an empty operationName."""
    named = re.search(r"\b(?:query|mutation)\s+(\w+)", body.get("query", ""))
    return body.get("operationName") or (named.group(1) if named else "")


def same_variables(sent: dict, recorded: dict) -> bool:
    """JSON-string variables (the runs filters) compare by their content, not their spelling."""
    def parsed(value):
        try:
            return json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            return value

    return sent.keys() >= recorded.keys() and all(parsed(sent[k]) == parsed(v) for k, v in recorded.items())


class FakeWandb:
    def __init__(self, cassette: Path):
        self.interactions = json.loads(cassette.read_text())["interactions"]
        self.requests: list[tuple[str, dict]] = []  # (operation, variables) of every GraphQL request
        self.unmatched: list[tuple[str, dict]] = []
        self.failing: dict[str, list[int]] = {}  # operation -> the HTTP statuses its next requests get
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def fail(self, op: str, times: int, status: int = 503) -> None:
        self.failing.setdefault(op, []).extend([status] * times)

    def answer(self, op: str, variables: dict) -> tuple[int, dict]:
        self.requests.append((op, variables))
        if self.failing.get(op):
            return self.failing[op].pop(), {"errors": [{"message": "service unavailable"}]}
        for interaction in self.interactions:
            if interaction["operation"] == op and same_variables(variables, interaction["variables"]):
                return 200, interaction["response"]
        self.unmatched.append((op, variables))
        return 200, {"data": None, "errors": [{"message": f"fake W&B: no recorded answer to {op} {variables}"}]}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, out = 200, {}
                if self.path.startswith("/graphql"):
                    request = json.loads(body)
                    status, out = fake.answer(operation(request), request.get("variables") or {})
                data = json.dumps(out).encode()  # anything else (wandb-core's telemetry): an empty 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self) -> FakeWandb:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
