"""The proxy's own HTTP/1.1 server (gateway/h1/server.py), over real loopback sockets.

Two kinds of test: the full gateway (`gw`: real redis-server, the echo upstream of
tests/upstream_app.py) spoken to byte for byte over raw sockets; and `http1.Server`
alone with a small handler of the test's own, for what the gateway cannot be made
to do on cue (a handler that streams without a length, sleeps, or never finishes).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.config import LimitsConfig
from gateway.h1 import server as http1
from tests.conftest import Gateway
from tests.upstream_app import UPLOAD_STARTED

WAIT = 10.0  # the most a single step may take before the test calls it a hang


# --- raw HTTP/1.x over a socket ------------------------------------------------------------------


def request(
    method: str,
    target: str,
    *,
    version: str = "1.1",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    length: int | None = None,
) -> bytes:
    """One request's bytes; `length` declares a Content-Length other than the body's (a body sent later)."""
    lines = [f"{method} {target} HTTP/{version}", "Host: gw"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if length is None and body:
        length = len(body)
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Reply:
    status: int
    reason: str
    raw_headers: list[tuple[str, str]]
    body: bytes  # the body, without its framing
    wire: bytes  # the bytes after the head, framing included
    framing: str  # "length", "chunked", "close" (until EOF) or "none"

    @property
    def headers(self) -> CIMultiDict[str]:
        return CIMultiDict(self.raw_headers)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.raw_headers if n.lower() == name.lower())

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        assert self.headers.get("Content-Type", "").startswith("application/json"), (self.status, self.body[:200])
        code: str = self.json()["error"]["code"]
        return code


async def read_reply(reader: asyncio.StreamReader, *, head: bool = False) -> Reply:
    """One answer from the stream: its head, then its body as framed (`head`: the answer to a HEAD)."""
    async with asyncio.timeout(WAIT):
        status_line = await reader.readline()
        assert status_line, "the server closed the connection instead of answering"
        version, status, reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        assert version == "HTTP/1.1", status_line
        raw: list[tuple[str, str]] = []
        while (line := await reader.readline()) != b"\r\n":
            assert line, "the connection closed inside a response head"
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep and line.endswith(b"\r\n"), line
            raw.append((name, value.strip()))
        headers = CIMultiDict(raw)
        code = int(status)
        if head or code < 200 or code in (204, 304):
            return Reply(code, reason, raw, b"", b"", "none")
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            wire, body = bytearray(), bytearray()
            while True:
                size_line = await reader.readline()
                wire += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (trailer := await reader.readline()) != b"\r\n":
                        assert trailer, "the connection closed inside the trailers"
                        wire += trailer
                    wire += b"\r\n"
                    return Reply(code, reason, raw, bytes(body), bytes(wire), "chunked")
                data = await reader.readexactly(size + 2)
                assert data.endswith(b"\r\n"), data[-8:]
                wire += data
                body += data[:-2]
        if "Content-Length" in headers:
            data = await reader.readexactly(int(headers["Content-Length"]))
            return Reply(code, reason, raw, data, data, "length")
        data = await reader.read()  # close-delimited
        return Reply(code, reason, raw, data, data, "close")


async def closed_by_server(reader: asyncio.StreamReader, seconds: float = WAIT) -> bytes:
    """Waits until the server closes the connection; what it sent before that (b"" when nothing)."""
    async with asyncio.timeout(seconds):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def still_open(reader: asyncio.StreamReader, seconds: float = 0.3) -> bool:
    """True when, for `seconds`, the server neither closed the connection nor sent anything."""
    try:
        async with asyncio.timeout(seconds):
            await reader.read(1)
    except TimeoutError:
        return True
    return False


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def until(condition: Callable[[], bool], seconds: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.01)


def requests_counted(gw: Gateway, route: str, code: str) -> float:
    value = gw.replica.metrics.registry.get_sample_value("gateway_requests_total", {"route": route, "code": code})
    return value or 0.0


def echoed(reply: Reply) -> dict[str, Any]:
    assert reply.status == 200, (reply.status, reply.body[:300])
    assert reply.headers.get("X-Upstream") == "echo"
    data: dict[str, Any] = reply.json()
    return data


def assert_fresh_date(reply: Reply) -> None:
    assert reply.count("Date") == 1, reply.raw_headers
    sent = email.utils.parsedate_to_datetime(reply.headers["Date"]).timestamp()
    assert abs(sent - time.time()) < 5, reply.headers["Date"]
    assert reply.headers["Date"].endswith(" GMT")


@pytest.fixture
async def key(gw: Gateway) -> str:
    created = await gw.create_key(name="http1", owner="acme")
    token: str = created["key"]
    return token


# --- http1.Server on its own, with the test's handler ---------------------------------------------

Start = Callable[..., Awaitable[http1.Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    """Starts `http1.Server(handler, ...)` on a free loopback port; shut down at the end of the test."""
    servers: list[http1.Server] = []

    async def start(handler: http1.Handler, **kw: Any) -> http1.Server:
        server = http1.Server(handler, **kw)
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.shutdown(0)


async def say_path(req: http1.Request) -> None:
    req.reply(200, "OK", b"Content-Type: text/plain\r\n", f"{req.method} {req.raw_path}".encode())


PARTS = [b"alpha;", b"beta;", b"0\r\n\r\n", b"gamma;"]  # one part looks like a chunked body's end


async def streamed(req: http1.Request) -> None:
    """An answer without a length, written in parts: chunked for HTTP/1.1, close-delimited for HTTP/1.0."""
    if req.raw_path != "/stream":
        await say_path(req)
        return
    await req.start(200, "OK", b"Content-Type: text/plain\r\n", has_length=False)
    for part in PARTS:
        await req.write(part)
        await asyncio.sleep(0.01)  # separate writes on the wire
    await req.end()


# --- 1. pipelining -------------------------------------------------------------------------------


async def test_fifty_pipelined_requests_in_one_write_are_answered_in_order(gw: Gateway, key: str) -> None:
    """More than MAX_QUEUED requests at once: reading pauses and resumes, nothing is lost or reordered."""
    batch: list[bytes] = []
    expected: list[tuple[int, str]] = []
    for i in range(50):
        rid = f"pipe-{i:02d}"
        kind = i % 3
        if kind == 0:
            batch.append(request("GET", f"/public/p{i}", headers=[("X-Request-Id", rid)]))
            expected.append((200, f"/public/p{i}"))
        elif kind == 1:
            auth = ("Authorization", f"Bearer {key}")
            batch.append(request("GET", f"/api/a{i}?n={i}", headers=[("X-Request-Id", rid), auth]))
            expected.append((200, f"/api/a{i}?n={i}"))
        else:
            batch.append(request("GET", f"/api/n{i}", headers=[("X-Request-Id", rid)]))
            expected.append((401, "missing_key"))
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(b"".join(batch))
        await writer.drain()
        for i, (status, what) in enumerate(expected):
            reply = await read_reply(reader)
            assert reply.status == status, (i, reply.status, reply.body[:200])
            assert reply.headers["X-Request-Id"] == f"pipe-{i:02d}"
            assert "Connection" not in reply.headers, reply.raw_headers
            if status == 200:
                assert echoed(reply)["path"] == what
            else:
                assert reply.code == what
                assert reply.json()["meta"]["requestId"] == f"pipe-{i:02d}"
        # Reading paused while more than MAX_QUEUED waited; it resumed: a later request is read and answered.
        assert await still_open(reader), "the connection should stay open after the pipelined batch"
        writer.write(request("GET", "/public/later", headers=[("X-Request-Id", "pipe-later")]))
        later = await read_reply(reader)
        assert echoed(later)["path"] == "/public/later"
        assert later.headers["X-Request-Id"] == "pipe-later"
    assert gw.replica.proxy.inflight == 0


# --- 2. HTTP/1.0 and streamed answers ------------------------------------------------------------


async def test_http10_closes_without_keep_alive_and_keeps_alive_when_asked(gw: Gateway) -> None:
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(request("GET", "/public/ten", version="1.0"))
        reply = await read_reply(reader)
        assert echoed(reply)["path"] == "/public/ten"
        assert reply.headers.getall("Connection") == ["close"]
        assert await closed_by_server(reader) == b""

    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(request("GET", "/public/one", version="1.0", headers=[("Connection", "keep-alive")]))
        first = await read_reply(reader)
        assert echoed(first)["path"] == "/public/one"
        assert first.headers.getall("Connection") == ["keep-alive"]
        assert await still_open(reader)
        # The same socket carries a second request; without keep-alive this time, so it ends there.
        writer.write(request("GET", "/public/two", version="1.0"))
        second = await read_reply(reader)
        assert echoed(second)["path"] == "/public/two"
        assert second.headers.getall("Connection") == ["close"]
        assert await closed_by_server(reader) == b""


async def test_a_streamed_answer_is_close_delimited_for_http10_and_chunked_for_http11(serve: Start) -> None:
    server = await serve(streamed)
    async with connect(server.port) as (reader, writer):
        writer.write(request("GET", "/stream", version="1.0", headers=[("Connection", "keep-alive")]))
        reply = await read_reply(reader)
        assert reply.framing == "close"  # no length, no chunked framing: the body ends with the connection
        assert "Transfer-Encoding" not in reply.headers
        assert reply.headers.getall("Connection") == ["close"]  # keep-alive asked for, but impossible here
        assert reply.wire == b"".join(PARTS)

    async with connect(server.port) as (reader, writer):
        writer.write(request("GET", "/stream"))
        reply = await read_reply(reader)
        assert reply.framing == "chunked"
        assert reply.headers.getall("Transfer-Encoding") == ["chunked"]
        assert "Connection" not in reply.headers
        assert reply.body == b"".join(PARTS)
        assert reply.wire == b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in PARTS) + b"0\r\n\r\n"
        # The chunked answer ended cleanly: the connection carries the next request.
        writer.write(request("GET", "/after"))
        after = await read_reply(reader)
        assert (after.status, after.body) == (200, b"GET /after")


async def test_a_chunked_upstream_answer_reaches_an_http10_client_without_chunk_framing(gw: Gateway, key: str) -> None:
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(request("GET", "/api/chunked", version="1.0", headers=[("Authorization", f"Bearer {key}")]))
        reply = await read_reply(reader)
        assert reply.status == 200
        assert "Transfer-Encoding" not in reply.headers
        assert reply.framing in ("length", "close")
        assert reply.wire == b"part0;part1;part2;part3;part4;"
        assert reply.headers.getall("Connection") == ["close"]
        assert await closed_by_server(reader) == b""


# --- 3. Connection: close from an HTTP/1.1 client ------------------------------------------------


@pytest.mark.parametrize("target", ["/public/bye", "/api/bye"], ids=["forwarded", "refused"])
async def test_connection_close_from_an_http11_client_is_honoured(gw: Gateway, target: str) -> None:
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(request("GET", target, headers=[("Connection", "close")]))
        reply = await read_reply(reader)
        assert reply.status == (200 if target.startswith("/public") else 401)
        assert reply.headers.getall("Connection") == ["close"]
        assert await closed_by_server(reader) == b""


async def test_a_request_saying_close_is_answered_even_when_more_bytes_follow_it(gw: Gateway) -> None:
    """RFC 9112 9.6: answer the request that said close, then close; what follows is not processed."""
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(request("GET", "/public/bye", headers=[("Connection", "close")]) + request("GET", "/public/never"))
        reply = await read_reply(reader)
        assert echoed(reply)["path"] == "/public/bye"
        assert reply.headers.getall("Connection") == ["close"]
        assert await closed_by_server(reader) == b""


# --- 4. a refused upload ------------------------------------------------------------------------


async def test_a_refused_upload_is_read_and_dropped_and_the_connection_serves_the_next_request(gw: Gateway) -> None:
    # A body that would answer as requests if it were ever parsed as such.
    smuggled = b"GET /public/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
    body = (smuggled * (200 * 1024 // len(smuggled) + 1))[: 200 * 1024]
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(request("POST", "/api/x", body=body, headers=[("X-Request-Id", "upload-1")]))
        writer.write(request("GET", "/public/after", headers=[("Connection", "close")]))
        await writer.drain()
        refused = await read_reply(reader)
        assert (refused.status, refused.code) == (401, "missing_key")
        assert refused.headers["X-Request-Id"] == "upload-1"
        assert "Connection" not in refused.headers  # the body is dropped, the connection goes on
        after = await read_reply(reader)
        assert echoed(after)["path"] == "/public/after"
        assert after.headers.getall("Connection") == ["close"]
        assert await closed_by_server(reader) == b"", "bytes of the dropped body were answered as requests"
    assert requests_counted(gw, "public", "forwarded") == 1


async def test_a_refused_expect_continue_upload_gets_no_100_and_the_connection_closes(gw: Gateway) -> None:
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(request("POST", "/api/x", length=100_000, headers=[("Expect", "100-continue")]))
        refused = await read_reply(reader)
        assert (refused.status, refused.code) == (401, "missing_key")
        assert refused.headers.getall("Connection") == ["close"]
        rest = await closed_by_server(reader)
        assert b"100 Continue" not in rest and rest == b""


# --- 5. Expect: 100-continue with a key that passes -----------------------------------------------


async def test_expect_continue_with_a_valid_key_gets_100_before_the_body_then_the_answer(gw: Gateway, key: str) -> None:
    body = bytes(range(256)) * 1000
    headers = [("Authorization", f"Bearer {key}"), ("Expect", "100-continue")]
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(request("POST", "/api/upload-here", length=len(body), headers=headers))
        interim = await read_reply(reader)  # nothing of the body has been sent yet
        assert (interim.status, interim.reason) == (100, "Continue")
        assert interim.raw_headers == []
        writer.write(body)
        final = await read_reply(reader)
        echo = echoed(final)
        assert echo["method"] == "POST" and echo["path"] == "/api/upload-here"
        assert echo["body_length"] == len(body)
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert "Connection" not in final.headers
        writer.write(request("GET", "/public/next"))
        assert echoed(await read_reply(reader))["path"] == "/public/next"


# --- 6. requests the parser refuses ---------------------------------------------------------------

SECRET = "gw_refused_marker_0123456789"
BAD_REQUESTS = {
    "nul-in-header": f"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Token: {SECRET}\x00{SECRET}\r\n\r\n".encode(),
    "long-request-line": f"GET /public/{SECRET}{'A' * 9000} HTTP/1.1\r\nHost: gw\r\n\r\n".encode(),
}


async def refused_after_a_good_one(gw: Gateway, key: str, bad: bytes, *, same_write: bool) -> None:
    """A good request, then a bad one before the good one's answer came. The good one goes to the slow
    route (its upstream answers after 2 s, the route gives up after 0.3 s: 504), so that, written apart,
    the bad one surely arrives while the good one is still being handled."""
    before = requests_counted(gw, "-", "invalid_request")
    good = request(
        "GET", "/slowroute/first", headers=[("X-Request-Id", "before-bad"), ("Authorization", f"Bearer {key}")]
    )
    async with connect(gw.proxy.port) as (reader, writer):
        if same_write:
            writer.write(good + bad)
        else:
            writer.write(good)
            await until(lambda: gw.replica.proxy.inflight == 1, what="the good request to be in its handler")
            writer.write(bad)
        await writer.drain()
        first = await read_reply(reader)
        assert first.headers.get("X-Request-Id") == "before-bad", (first.status, first.body[:200])
        assert (first.status, first.code) == (504, "upstream_timeout")
        assert "Connection" not in first.headers  # the refusal behind it is not known when this answer goes
        refused = await read_reply(reader)
        assert (refused.status, refused.code) == (400, "invalid_request")
        assert refused.json()["meta"]["requestId"] == refused.headers["X-Request-Id"]
        assert refused.headers.getall("Connection") == ["close"]
        assert_fresh_date(refused)
        rest = await closed_by_server(reader)
    assert rest == b""
    everything = repr(refused.raw_headers).encode() + refused.body
    assert SECRET.encode() not in everything and b"AAAAAAAA" not in everything
    assert requests_counted(gw, "-", "invalid_request") == before + 1  # on_refused was called, once


@pytest.mark.parametrize("bad", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
async def test_a_request_the_parser_refuses_is_400_and_closes_after_the_one_before_it(
    gw: Gateway, key: str, bad: str
) -> None:
    await refused_after_a_good_one(gw, key, BAD_REQUESTS[bad], same_write=False)


@pytest.mark.parametrize("bad", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
async def test_a_good_request_in_the_same_packet_as_a_refused_one_is_still_answered(
    gw: Gateway, key: str, bad: str
) -> None:
    await refused_after_a_good_one(gw, key, BAD_REQUESTS[bad], same_write=True)


async def test_a_refused_request_alone_is_400_with_nothing_of_it_echoed(gw: Gateway) -> None:
    for bad in BAD_REQUESTS.values():
        async with connect(gw.proxy.port) as (reader, writer):
            writer.write(bad)
            refused = await read_reply(reader)
            assert (refused.status, refused.code) == (400, "invalid_request")
            assert refused.headers.getall("Connection") == ["close"]
            assert refused.count("Content-Length") == 1 and int(refused.headers["Content-Length"]) == len(refused.body)
            assert SECRET.encode() not in refused.body and SECRET not in repr(refused.raw_headers)
            assert await closed_by_server(reader) == b""


# --- Upgrade ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["websocket", "h2c"])
async def test_an_upgrade_request_is_answered_as_a_plain_one_and_the_connection_closes(
    gw: Gateway, protocol: str
) -> None:
    upgrade = request("GET", "/public/up", headers=[("Connection", "Upgrade"), ("Upgrade", protocol)])
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(upgrade + request("GET", "/public/never"))
        reply = await read_reply(reader)
        assert echoed(reply)["path"] == "/public/up"
        assert reply.headers.getall("Connection") == ["close"]
        assert "Upgrade" not in reply.headers
        assert await closed_by_server(reader) == b""  # the bytes after the upgrade request are not answered


# --- 7. keep-alive timeout ------------------------------------------------------------------------


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout_but_a_busy_one_is_not(serve: Start) -> None:
    async def handler(req: http1.Request) -> None:
        if req.raw_path == "/sleep":
            await asyncio.sleep(1.5)
        await say_path(req)

    server = await serve(handler, limits=LimitsConfig(keepalive_seconds=1.0))
    loop = asyncio.get_running_loop()

    async def idle_never_spoke() -> float:
        async with connect(server.port) as (reader, _writer):
            opened = loop.time()
            assert await closed_by_server(reader, 3.5) == b""
            return loop.time() - opened

    async def idle_after_a_request() -> float:
        async with connect(server.port) as (reader, writer):
            writer.write(request("GET", "/quick"))
            assert (await read_reply(reader)).body == b"GET /quick"
            answered = loop.time()
            assert await closed_by_server(reader, 3.5) == b""
            return loop.time() - answered

    async def busy() -> float:
        async with connect(server.port) as (reader, writer):
            writer.write(request("GET", "/sleep"))
            reply = await read_reply(reader)  # 1.5 s: longer than the keep-alive timeout
            assert (reply.status, reply.body) == (200, b"GET /sleep")
            assert "Connection" not in reply.headers
            writer.write(request("GET", "/again"))  # and the connection is still good
            assert (await read_reply(reader)).body == b"GET /again"
            answered = loop.time()
            assert await closed_by_server(reader, 3.5) == b""
            return loop.time() - answered

    waited = await asyncio.gather(idle_never_spoke(), idle_after_a_request(), busy())
    for seconds in waited:
        assert 0.95 <= seconds <= 3.0, waited
    assert not server.connections


# --- 8. shutdown -------------------------------------------------------------------------------


async def test_shutdown_closes_idle_connections_refuses_new_ones_and_drains_busy_ones(serve: Start) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def handler(req: http1.Request) -> None:
        if req.raw_path == "/slow":
            entered.set()
            await release.wait()
        await say_path(req)

    server = await serve(handler)
    port = server.port
    loop = asyncio.get_running_loop()
    async with connect(port) as (slow_r, slow_w), connect(port) as (idle_r, idle_w):
        idle_w.write(request("GET", "/first"))
        assert (await read_reply(idle_r)).body == b"GET /first"
        slow_w.write(request("GET", "/slow") + request("GET", "/queued-behind-slow"))
        await asyncio.wait_for(entered.wait(), WAIT)
        async with asyncio.TaskGroup() as tasks:
            started = loop.time()
            shutdown = tasks.create_task(server.shutdown(drain_seconds=2))
            assert await closed_by_server(idle_r, 0.5) == b"", "the idle connection was not closed at once"
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            assert await still_open(slow_r, 0.2), "the busy connection was cut before its answer"
            assert not shutdown.done()
            release.set()
            reply = await read_reply(slow_r)
            assert (reply.status, reply.body) == (200, b"GET /slow")
            assert reply.headers.getall("Connection") == ["close"]
            # The answer was the last one: the request queued behind it is not answered.
            assert await closed_by_server(slow_r, 1.0) == b""
        assert loop.time() - started < 1.5, "shutdown waited for the drain deadline with nothing left to drain"
    assert not server.connections


async def test_shutdown_cancels_a_handler_that_never_finishes_after_the_drain_deadline(serve: Start) -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(req: http1.Request) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await serve(handler)
    loop = asyncio.get_running_loop()
    async with connect(server.port) as (reader, writer):
        writer.write(request("GET", "/forever"))
        await asyncio.wait_for(entered.wait(), WAIT)
        started = loop.time()
        await asyncio.wait_for(server.shutdown(drain_seconds=1.0), WAIT)
        took = loop.time() - started
        assert 0.95 <= took < 2.0, took
        assert cancelled.is_set()
        assert await closed_by_server(reader, 1.0) == b""  # cut without an answer
    assert not server.connections


# --- 9. a client that leaves mid-upload ------------------------------------------------------------


@contextlib.asynccontextmanager
async def an_abandoned_upload(gw: Gateway, key: str, upstream: TestServer) -> AsyncIterator[Any]:
    """A 1 MiB upload to /api/upload with a valid key, a tenth of it sent, then the client's socket closed.

    Yields the server's connection object. On the way out, its task is cancelled if it is still running,
    so a gateway that never notices the client left does not hold the test's teardown (the server's
    shutdown would not reach it: the connection leaves `Server.connections` when the client goes)."""
    started = upstream.app[UPLOAD_STARTED]
    started.clear()
    headers = [("Authorization", f"Bearer {key}")]
    server = gw.replica.proxy_server
    async with connect(gw.proxy.port) as (_reader, writer):
        writer.write(request("POST", "/api/upload", length=1024 * 1024, headers=headers) + b"x" * 100_000)
        await writer.drain()
        await asyncio.wait_for(started.wait(), WAIT)  # the upstream has the first bytes
        assert gw.replica.proxy.inflight == 1
        (conn,) = [c for c in server.connections if c.busy]
    try:
        yield conn
    finally:
        task = conn.cancel()
        if task is not None:
            await asyncio.wait([task], timeout=WAIT)


async def test_a_client_that_disconnects_mid_upload_is_recorded_499_and_frees_its_request(
    gw: Gateway, key: str, upstream: TestServer
) -> None:
    before = requests_counted(gw, "api", "client_closed")
    async with an_abandoned_upload(gw, key, upstream) as conn:
        await until(lambda: gw.replica.proxy.inflight == 0, 3.0, "the abandoned upload to end")
        assert requests_counted(gw, "api", "client_closed") == before + 1
        await until(lambda: conn.task is not None and conn.task.done(), 1.0, "the connection's task to end")
        assert conn not in gw.replica.proxy_server.connections


async def test_a_client_that_disconnects_mid_upload_does_not_hold_up_other_clients(
    gw: Gateway, key: str, upstream: TestServer
) -> None:
    auth = [("Authorization", f"Bearer {key}")]
    async with an_abandoned_upload(gw, key, upstream), connect(gw.proxy.port) as (reader, writer):
        writer.write(request("GET", "/public/next") + request("POST", "/api/next", body=b"z" * 1000, headers=auth))
        assert echoed(await read_reply(reader))["path"] == "/public/next"
        echo = echoed(await read_reply(reader))
        assert (echo["path"], echo["body_length"]) == ("/api/next", 1000)


# --- 10. Date, and HEAD's Content-Length -----------------------------------------------------------


async def test_date_on_own_and_forwarded_answers_and_one_content_length_on_a_forwarded_head(
    gw: Gateway, key: str
) -> None:
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(request("GET", "/api/x"))
        refused = await read_reply(reader)
        assert refused.status == 401
        assert_fresh_date(refused)

        writer.write(request("GET", "/api/x", headers=[("Authorization", f"Bearer {key}")]))
        forwarded = await read_reply(reader)
        assert echoed(forwarded)["path"] == "/api/x"
        assert_fresh_date(forwarded)

        # HEAD, pipelined with a GET: the HEAD answer has exactly one Content-Length and no body
        # (a body would be read as the next answer's status line).
        writer.write(request("HEAD", "/public/h") + request("GET", "/public/h"))
        head = await read_reply(reader, head=True)
        assert head.status == 200
        assert head.count("Content-Length") == 1, head.raw_headers
        assert int(head.headers["Content-Length"]) > 0
        assert "Transfer-Encoding" not in head.headers
        assert_fresh_date(head)
        get = await read_reply(reader)
        assert echoed(get)["method"] == "GET" and echoed(get)["path"] == "/public/h"
        assert get.count("Content-Length") == 1
