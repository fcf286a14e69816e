"""The upstream side of exact framing (spec 6, issue 10): gateway/h1/client.py against an upstream
that answers with scripted bytes.

The upstream here is a raw asyncio server written for these tests: it records, per accepted
connection, every byte it read and each request it parsed out of them (method, path, request id,
body), and answers each request with whatever bytes the test's script returns. So each test
checks what the other side received: how many times the upstream saw a request, on which
connection, and (on the client side, a raw socket too) exactly which bytes came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway import config as config_mod
from tests.conftest import AdminTokens, ProxyTestServer, RedisProcess, make_config, start_replica
from tests.loopback import LoopbackServer

SHORT = 0.5  # timeout_seconds of the /short route
SMALL = 1000  # max_body_bytes of the /small route
BODY_TIMEOUT = 1.0  # limits.body_timeout_seconds
WAIT = 10.0  # the most any single step may take before the test calls it a hang
MIB = 1024 * 1024
MARK = b"SMUGGLED-RESPONSE-BYTES"  # in every bad answer's body: the client must never see it
CHUNKED_MARK = b"17\r\n" + MARK + b"\r\n0\r\n\r\n"  # MARK as one chunk (0x17 bytes), then the last chunk


# --- the recording upstream -----------------------------------------------------------------------


@dataclass
class Got:
    """One request as the upstream parsed it out of the bytes it read."""

    conn: int  # which accepted connection, from 1
    method: str
    path: str
    request_id: str
    head: bytes
    body: bytes | None  # None: the script answered without reading it


@dataclass
class Conn:
    number: int
    read: bytearray = field(default_factory=bytearray)  # every byte read on it, in order
    closed_by_gateway: bool = False


# What to answer: (bytes to write, what next). "keep": read the next request; "close": close now;
# "hold": read nothing more until the test sets `release`, then read on until the gateway closes;
# "drain": keep reading (and recording) without answering, until the gateway closes.
Script = Callable[[Got], Awaitable[tuple[bytes, str]]]


class Upstream(LoopbackServer):
    def __init__(self, script: Script, *, read_bodies: bool = True) -> None:
        super().__init__()
        self.script = script
        self.read_bodies = read_bodies
        self.conns: list[Conn] = []
        self.got: list[Got] = []
        self.release = asyncio.Event()

    def on(self, conn: int) -> list[str]:
        return [g.path for g in self.got if g.conn == conn]

    def with_id(self, request_id: str) -> list[Got]:
        return [g for g in self.got if g.request_id == request_id]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns) + 1)
        self.conns.append(conn)

        async def read_until(sep: bytes) -> bytes:
            data = await reader.readuntil(sep)
            conn.read += data
            return data

        async def read_exactly(n: int) -> bytes:
            data = await reader.readexactly(n)
            conn.read += data
            return data

        async def read_to_eof() -> None:
            while data := await reader.read(65536):
                conn.read += data
            conn.closed_by_gateway = True

        try:
            while True:
                try:
                    head = await read_until(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    conn.closed_by_gateway = True
                    return
                line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                fields = {}
                for item in lines:
                    if item:
                        name, _, value = item.partition(":")
                        fields[name.strip().lower()] = value.strip()
                body: bytes | None = None
                if self.read_bodies:
                    if fields.get("transfer-encoding") == "chunked":
                        out = bytearray()
                        while size := int((await read_until(b"\r\n")).split(b";")[0], 16):
                            out += (await read_exactly(size + 2))[:-2]
                        await read_until(b"\r\n")
                        body = bytes(out)
                    else:
                        body = await read_exactly(int(fields.get("content-length", "0")))
                got = Got(conn.number, method, path, fields.get("x-request-id", ""), head, body)
                self.got.append(got)
                answer, then = await self.script(got)
                writer.write(answer)
                await writer.drain()
                if then == "close":
                    return
                if then == "hold":
                    await self.release.wait()
                if then in ("hold", "drain"):
                    await read_to_eof()
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.closed_by_gateway = True
        except asyncio.CancelledError:
            return


def ok(body: bytes = b"fine", *extra: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n" + b"".join(e + b"\r\n" for e in extra) + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


@pytest.fixture
async def upstream_with() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def start(script: Script, **kw: Any) -> Upstream:
        up = Upstream(script, **kw)
        await up.start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.close()


# --- the gateway in front of it -------------------------------------------------------------------


@dataclass
class Front:
    port: int
    replica: Any


@pytest.fixture
async def front(
    redis_server: RedisProcess, admin_tokens: AdminTokens
) -> AsyncIterator[Callable[[str], Awaitable[Front]]]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(upstream_url: str) -> Front:
            routes = [
                {"name": "public", "path_prefix": "/public", "upstream": upstream_url, "auth": "none"},
                {"name": "short", "path_prefix": "/short", "upstream": upstream_url, "auth": "none",
                 "timeout_seconds": SHORT},
                {"name": "small", "path_prefix": "/small", "upstream": upstream_url, "auth": "none",
                 "max_body_bytes": SMALL},
                {"name": "big", "path_prefix": "/big", "upstream": upstream_url, "auth": "none",
                 "timeout_seconds": SHORT, "max_body_bytes": 1024 * MIB},
            ]  # fmt: skip
            overrides = {"routes": routes, "limits.body_timeout_seconds": BODY_TIMEOUT}
            cfg: config_mod.Config = make_config(
                redis_url=redis_server.url, upstream_url=upstream_url, tokens=admin_tokens.entries, overrides=overrides
            )
            replica = await start_replica(cfg, stack)
            proxy = ProxyTestServer(replica.proxy_server)
            await proxy.start_server()
            stack.push_async_callback(proxy.close)
            return Front(proxy.port, replica)

        yield start


# --- a raw client ---------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    head: bytes
    body: bytes
    complete: bool  # the body ended where its framing says, not at a cut

    def header(self, name: str) -> list[str]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                out.append(value.strip().decode("latin-1"))
        return out

    @property
    def code(self) -> str:
        code: str = json.loads(self.body)["error"]["code"]
        return code


class Client:
    """One raw client connection to the gateway; everything it read is kept in `read`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.read = bytearray()

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def reply(self, *, head_only: bool = False, seconds: float = WAIT) -> Reply:
        async with asyncio.timeout(seconds):
            head = await self.reader.readuntil(b"\r\n\r\n")
            self.read += head
            reply = Reply(int(head.split(b" ", 2)[1]), head, b"", complete=True)
            if head_only:
                return reply
            lengths = reply.header("Content-Length")
            body = bytearray()
            if reply.header("Transfer-Encoding") == ["chunked"]:
                while True:
                    line = await self.reader.readline()
                    self.read += line
                    if not line.endswith(b"\r\n"):
                        reply.complete = False
                        break
                    size = int(line.split(b";")[0], 16)
                    data = await self.reader.read(size + 2) if size else await self.reader.readline()
                    self.read += data
                    if size == 0:
                        break
                    body += data[:-2]
            elif lengths:
                want = int(lengths[0])
                while len(body) < want:
                    data = await self.reader.read(want - len(body))
                    if not data:
                        reply.complete = False
                        break
                    body += data
                self.read += body
            reply.body = bytes(body)
            return reply

    async def closed(self, seconds: float = WAIT) -> bool:
        """True when the gateway closes this connection (anything still read is kept)."""
        try:
            async with asyncio.timeout(seconds):
                while data := await self.reader.read(65536):
                    self.read += data
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[int], Awaitable[Client]]]:
    opened: list[Client] = []

    async def open_(port: int) -> Client:
        client = await Client.open(port)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        await client.close()


def get(path: str, request_id: str = "", method: str = "GET") -> bytes:
    rid = f"X-Request-Id: {request_id}\r\n" if request_id else ""
    return f"{method} {path} HTTP/1.1\r\nHost: gw\r\n{rid}\r\n".encode()


def new_id() -> str:
    return "req_" + secrets.token_hex(8)


async def until(condition: Callable[[], bool], what: str, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.005)


# --- 1. a response whose framing cannot be honoured exactly is 502 ------------------------------------

BAD_FRAMING = {
    "cl-overflow-2^64+1": b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551617\r\n\r\n" + MARK,
    "cl-2^64-1": b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n" + MARK,
    "cl-2^53+1": b"HTTP/1.1 200 OK\r\nContent-Length: 9007199254740993\r\n\r\n" + MARK,
    "cl-plus": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n" + MARK,
    "cl-leading-space": b"HTTP/1.1 200 OK\r\nContent-Length:  5\r\n\r\n" + MARK,
    "cl-leading-zero": b"HTTP/1.1 200 OK\r\nContent-Length: 05\r\n\r\n" + MARK,
    "cl-trailing-space": b"HTTP/1.1 200 OK\r\nContent-Length: 5 \r\n\r\n" + MARK,
    "cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n" + MARK,
    "cl-duplicate": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n" + MARK,
    "cl-space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n" + MARK,
    "cl-folded": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n Content-Length: 5\r\n\r\n" + MARK,
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_MARK,
    "te-gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED_MARK,
    "te-chunked-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" + CHUNKED_MARK,
    "te-twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_MARK,
    "te-on-http/1.0": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_MARK,
    "chunk-size-overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000" + CHUNKED_MARK,
    "bare-lf-head": b"HTTP/1.1 200 OK\nContent-Length: 23\n\n" + MARK,
    "bare-lf-one-line": b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 23\r\n\r\n" + MARK,
    "bare-cr": b"HTTP/1.1 200 OK\r\nX-A: 1\rContent-Length: 23\r\n\r\n" + MARK,
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 23\r\n\r\n" + MARK,
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FRAMING))
async def test_a_response_with_framing_that_cannot_be_honoured_is_502_on_a_connection_never_reused(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
    case: str,
) -> None:
    async def script(got: Got) -> tuple[bytes, str]:
        # After the bad answer the upstream keeps the connection open: only the gateway can refuse it.
        return (BAD_FRAMING[case] if got.path.endswith("/bad") else ok()), "keep"

    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(get("/public/first"))
    assert (await client.reply()).body == b"fine"
    client.send(get("/public/bad"))
    bad = await client.reply()
    assert (bad.status, bad.code) == (502, "upstream_unavailable")
    # the same client connection carries the next answer, whole and alone
    client.send(get("/public/next"))
    after = await client.reply()
    assert (after.status, after.body) == (200, b"fine")
    assert MARK not in client.read
    # the upstream saw the bad exchange on its first connection and the next one on a fresh one
    assert up.on(1) == ["/public/first", "/public/bad"]
    assert up.on(2) == ["/public/next"]
    await until(lambda: up.conns[0].closed_by_gateway, "the gateway closed the connection that framed badly")


@pytest.mark.parametrize("case", ["cl-2^64-1", "cl-and-te", "te-chunked-gzip", "cl-duplicate"])
async def test_bad_framing_on_a_head_answer_is_502_too(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
    case: str,
) -> None:
    async def script(got: Got) -> tuple[bytes, str]:
        return (BAD_FRAMING[case].split(b"\r\n\r\n")[0] + b"\r\n\r\n" if got.method == "HEAD" else ok()), "keep"

    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(get("/public/head", method="HEAD"))
    bad = await client.reply(head_only=True)  # an answer to HEAD has no body, the error's neither
    assert bad.status == 502
    client.send(get("/public/next"))
    assert (await client.reply()).body == b"fine"
    assert up.on(1) == ["/public/head"]
    assert up.on(2) == ["/public/next"]


async def test_the_client_gets_the_gateways_own_framing_never_the_upstreams_lines(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
) -> None:
    """A valid length in the upstream's spelling is written anew (one line, the gateway's); a chunked
    body is re-chunked by the listener; a HEAD answer keeps the checked length, with no body."""
    answers = {
        "/public/length": b"HTTP/1.1 200 OK\r\ncontent-length:\t11\r\nX-Up: 1\r\n\r\nhello world",
        "/public/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED\r\n\r\n"
        + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        "/public/head": b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n",
    }

    async def script(got: Got) -> tuple[bytes, str]:
        return answers[got.path], "keep"

    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(get("/public/length"))
    length = await client.reply()
    assert (length.body, length.header("Content-Length"), length.header("X-Up")) == (b"hello world", ["11"], ["1"])
    assert b"\r\nContent-Length: 11\r\n" in length.head  # the gateway's line, not the upstream's spelling
    assert b"content-length" not in length.head
    client.send(get("/public/chunked"))
    chunked = await client.reply()
    assert chunked.body == b"hello world" and chunked.complete
    # one framing line, the listener's own (a whole small answer gets its length)
    assert chunked.header("Content-Length") + chunked.header("Transfer-Encoding") in (["11"], ["chunked"])
    assert b"CHUNKED" not in chunked.head
    client.send(get("/public/head", method="HEAD"))
    head = await client.reply(head_only=True)
    assert head.header("Content-Length") == ["4096"]
    client.send(get("/public/length"))
    assert (await client.reply()).body == b"hello world"  # no body followed the HEAD answer
    assert len(up.conns) == 1  # every one of them went back to the pool


# --- 2. a response cut short of its length --------------------------------------------------------


@pytest.mark.parametrize("then", ["close", "drain"])
async def test_a_response_cut_short_of_its_length_cuts_the_client_and_is_never_reused(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
    then: str,
) -> None:
    async def script(got: Got) -> tuple[bytes, str]:
        if got.path.endswith("/short-body"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 40000, then
        return ok(), "keep"

    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(get("/short/short-body"))
    cut = await client.reply()
    assert cut.status == 200 and cut.header("Content-Length") == ["100000"]
    assert not cut.complete and len(cut.body) == 40000
    assert await client.closed()
    other = await clients(gw.port)
    other.send(get("/short/next"))
    assert (await other.reply()).body == b"fine"
    assert up.on(1) == ["/short/short-body"]
    assert up.on(2) == ["/short/next"]
    if then == "drain":  # the upstream left it open, stalled: the gateway closed it (after the timeout)
        await until(lambda: up.conns[0].closed_by_gateway, "the gateway closed the cut connection")


# --- 3. the replay rule ------------------------------------------------------------------------------


def drops_once_reused() -> tuple[Script, Callable[[], None]]:
    """Answers normally until `arm()`; then the next request on an already used connection is read
    whole and the connection closed without a word (the idle-close race, made certain)."""
    armed = [False]

    async def script(got: Got) -> tuple[bytes, str]:
        if armed[0]:
            armed[0] = False
            return b"", "close"
        answer = ok(b"%s %d" % (got.method.encode(), got.conn))
        if got.method == "HEAD":  # the same head, without the body
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        return answer, "keep"

    def arm() -> None:
        armed[0] = True

    return script, arm


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_a_non_replayable_request_dropped_on_a_reused_connection_is_502_and_sent_once(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
    method: str,
) -> None:
    script, arm = drops_once_reused()
    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(get("/public/warm"))
    assert (await client.reply()).body == b"GET 1"
    arm()
    rid = new_id()
    client.send(get("/public/charge", rid, method=method))  # bodyless, and still never sent twice
    answer = await client.reply()
    assert (answer.status, answer.code) == (502, "upstream_unavailable")
    assert [(g.conn, g.method) for g in up.with_id(rid)] == [(1, method)]
    assert len(up.conns) == 1  # no second connection was opened for it
    client.send(get("/public/next"))
    assert (await client.reply()).body == b"GET 2"


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_a_replayable_request_dropped_on_a_reused_connection_is_retried_on_a_fresh_one(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
    method: str,
) -> None:
    script, arm = drops_once_reused()
    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(get("/public/warm"))
    assert (await client.reply()).body == b"GET 1"
    arm()
    rid = new_id()
    client.send(get("/public/read", rid, method=method))
    answer = await client.reply(head_only=method == "HEAD")
    assert answer.status == 200
    if method != "HEAD":
        assert answer.body == f"{method} 2".encode()
    assert [(g.conn, g.method) for g in up.with_id(rid)] == [(1, method), (2, method)]


# --- 4. stalls and limits while the client's body is sent ----------------------------------------------


async def test_an_upstream_that_stops_reading_the_upload_is_504_within_the_route_timeout(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
) -> None:
    async def script(got: Got) -> tuple[bytes, str]:
        return b"", "hold"  # reads the head, then neither reads nor answers

    up = await upstream_with(script, read_bodies=False)
    gw = await front(up.url)
    client = await clients(gw.port)
    total = 512 * MIB
    client.send(b"POST /big/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % total)
    started = time.monotonic()
    client.send(b"u" * (32 * MIB))  # more than every buffer on the way holds; then the client holds its upload
    answer = await client.reply(seconds=SHORT + 5)
    took = time.monotonic() - started
    assert (answer.status, answer.code) == (504, "upstream_timeout")
    assert took < SHORT + 3, took
    up.release.set()  # the upstream reads again: what it finds is the end of the connection
    await until(lambda: up.conns[0].closed_by_gateway, "the gateway closed the stalled connection")
    assert up.got[0].body is None


async def test_an_upstream_that_closes_during_the_upload_is_502_at_once(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
) -> None:
    async def script(got: Got) -> tuple[bytes, str]:
        await asyncio.sleep(0.2)
        return b"", "close"

    up = await upstream_with(script, read_bodies=False)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(b"POST /public/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10)
    started = time.monotonic()
    answer = await client.reply()  # the client still owes 990 bytes: the answer must not wait for them
    assert (answer.status, answer.code) == (502, "upstream_unavailable")
    assert time.monotonic() - started < 2
    assert len(up.got) == 1


async def test_a_client_that_stalls_its_upload_gets_408_not_504_and_the_upstream_connection_closes(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
) -> None:
    """The upstream reads everything it is sent and waits for the rest: the stall is the client's, so
    the route's 0.5 s timeout does not run while the gateway waits for the client's next byte."""

    async def script(got: Got) -> tuple[bytes, str]:
        return ok(), "keep"

    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(b"POST /short/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10)
    started = time.monotonic()
    answer = await client.reply(seconds=BODY_TIMEOUT + 5)
    took = time.monotonic() - started
    assert (answer.status, answer.code) == (408, "request_timeout")
    assert BODY_TIMEOUT * 0.8 < took < BODY_TIMEOUT + 3, took
    await until(lambda: up.conns[0].closed_by_gateway, "the gateway closed the half-sent upstream connection")
    assert up.got == []  # the upstream never got a whole request


async def test_a_chunked_upload_past_max_body_bytes_is_413_and_the_upstream_connection_closes(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
) -> None:
    async def script(got: Got) -> tuple[bytes, str]:
        return ok(), "keep"

    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(b"POST /small/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):  # 1500 bytes against a 1000-byte limit, in pieces, and then nothing more
        client.send(b"1f4\r\n" + b"b" * 500 + b"\r\n")
        await asyncio.sleep(0.05)
    answer = await client.reply()
    assert (answer.status, answer.code) == (413, "body_too_large")
    await until(lambda: all(c.closed_by_gateway for c in up.conns), "the gateway closed the half-sent connection")
    assert up.got == []  # no request reached the upstream whole
    assert sum(len(c.read) for c in up.conns) < SMALL + 1024  # and not more than the limit of its body


async def test_a_declared_length_past_max_body_bytes_is_413_before_anything_is_forwarded(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
) -> None:
    async def script(got: Got) -> tuple[bytes, str]:
        return ok(), "keep"

    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(b"POST /small/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % (SMALL + 1))
    answer = await client.reply()
    assert (answer.status, answer.code) == (413, "body_too_large")
    assert up.conns == []


async def test_an_early_answer_ends_the_upload_and_the_connection_is_not_reused(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
) -> None:
    async def script(got: Got) -> tuple[bytes, str]:
        if got.path.endswith("/upload"):
            return ok(b"no thanks"), "drain"  # answers before reading the body, then takes what comes
        return ok(), "keep"

    up = await upstream_with(script, read_bodies=False)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(b"POST /public/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n" + b"c" * 100)
    answer = await client.reply()
    assert (answer.status, answer.body) == (200, b"no thanks")
    other = await clients(gw.port)
    other.send(get("/public/next"))
    assert (await other.reply()).body == b"fine"
    assert up.on(2) == ["/public/next"]  # the half-sent connection carried nothing more
    await until(lambda: up.conns[0].closed_by_gateway, "the gateway closed the half-sent connection")


async def test_a_whole_exchange_with_a_body_keeps_the_connection(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
) -> None:
    async def script(got: Got) -> tuple[bytes, str]:
        return ok(b"%d" % len(got.body or b"")), "keep"

    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    client.send(b"POST /public/a HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello")
    assert (await client.reply()).body == b"5"
    client.send(b"POST /public/b HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert (await client.reply()).body == b"3"
    client.send(get("/public/c"))
    assert (await client.reply()).body == b"0"
    assert up.on(1) == ["/public/a", "/public/b", "/public/c"]
    assert [g.body for g in up.got] == [b"hello", b"abc", b""]


# --- 5. whose failure: a client that leaves mid-download --------------------------------------------


async def test_a_client_leaving_mid_download_is_recorded_499_not_an_upstream_failure(
    front: Callable[[str], Awaitable[Front]],
    upstream_with: Callable[..., Awaitable[Upstream]],
    clients: Callable[[int], Awaitable[Client]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    size = 64 * MIB

    async def script(got: Got) -> tuple[bytes, str]:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"d" * size, "keep"

    up = await upstream_with(script)
    gw = await front(up.url)
    client = await clients(gw.port)
    rid = new_id()
    client.send(get("/public/download", rid))
    head = await client.reply(head_only=True)
    assert head.status == 200
    await client.reader.readexactly(256 * 1024)
    client.writer.transport.abort()  # the client leaves with most of the body unread

    def access() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "gateway.access" and getattr(r, "request_id", "") == rid]

    await until(lambda: bool(access()), "the access record of the abandoned download")
    assert [(getattr(r, "code", None), getattr(r, "status", None)) for r in access()] == [("client_closed", 499)]
    assert not [r for r in caplog.records if r.name == "gateway.upstream"]
    await until(lambda: up.conns[0].closed_by_gateway, "the gateway closed the abandoned upstream connection")
