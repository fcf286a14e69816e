"""A real HTTP server that receives webhooks, for tests/test_webhooks*.py.

Threaded (http.server), so gateway processes and in-process replicas alike post to it over
loopback. Each request is recorded whole (headers, body, arrival); `behave` decides the answer:
a status code, or HANG (the handler holds the request, unanswered, until the receiver closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from standardwebhooks import Webhook

HANG = -1


@dataclass(frozen=True)
class Got:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float

    @property
    def msg_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def attempt(self) -> int:
        return int(self.headers["webhook-attempt"])

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.body)
        return data

    def verified(self, secret: str) -> dict[str, Any]:
        """The payload, after the reference library checked the signature (raises if it does not hold)."""
        data: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return data


class Receiver:
    def __init__(self, behave: Callable[[Got], int] | None = None) -> None:
        self.behave = behave or (lambda got: 200)
        self.got: list[Got] = []
        self.answered: list[tuple[Got, int]] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.url = ""

    # what arrived ------------------------------------------------------------------------

    def snapshot(self) -> list[Got]:
        with self.lock:
            return list(self.got)

    def delivered(self) -> list[Got]:
        """Requests answered 2xx."""
        with self.lock:
            return [got for got, status in self.answered if 200 <= status < 300]

    def wait(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, f"{what}: not within {seconds} s; got {self.summary()}"
            time.sleep(0.02)

    async def await_(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, f"{what}: not within {seconds} s; got {self.summary()}"
            await asyncio.sleep(0.02)

    def summary(self) -> list[tuple[str, str, int]]:
        return [(g.headers.get("webhook-id", "?"), g.payload.get("type", "?"), int(g.headers.get("webhook-attempt", 0)))
                for g in self.snapshot()]  # fmt: skip

    # serving -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def serving(self, path: str = "/hook", userinfo: str = "") -> Iterator[Receiver]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                got = Got(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver.lock:
                    receiver.got.append(got)
                status = receiver.behave(got)
                if status == HANG:
                    receiver.closing.wait(60)
                    self.close_connection = True
                    return
                with receiver.lock:
                    receiver.answered.append((got, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        at = f"{userinfo}@" if userinfo else ""
        self.url = f"http://{at}127.0.0.1:{server.server_address[1]}{path}"
        try:
            yield self
        finally:
            self.closing.set()
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
