"""The listener's limits, exact framing and header hygiene (spec 5, 6; issue 10), end to end.

A real gateway (`gateway_factory`: real redis-server) in front of a recording upstream that
writes down every request it gets, at its head and again once its body is read whole, so each
test checks what the upstream received: nothing at all, for every refusal. The memory test runs
the gateway as its own process (`python -m gateway serve`) and reads its RSS from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import AdminTokens, Gateway, RedisProcess, free_port
from tests.test_http1 import (
    Reply,
    closed_by_server,
    connect,
    read_reply,
    requests_counted,
    still_open,
    until,
)

WAIT = 10.0
MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


# --- a recording upstream -----------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    whole: bool = False  # its body was read to its end

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers]
            entry = Seen(request.method, request.raw_path, pairs)
            self.seen.append(entry)  # at the head: a request forwarded without its body shows too
            entry.body = await request.read()
            entry.whole = True
            return web.Response(text="recorded", headers={"X-Upstream": "recorder"})

        # aiohttp's own 8 KiB field limit would refuse what the gateway forwards under its 32 KiB head limit
        app = web.Application(client_max_size=256 * MIB, handler_args={"max_field_size": 64 * 1024})
        app.router.add_route("*", "/{tail:.*}", record)
        return app


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    server = TestServer(rec.app(), host="127.0.0.1")
    await server.start_server()
    yield rec, str(server.make_url("")).rstrip("/")
    await server.close()


Start = Callable[..., Any]


@pytest.fixture
async def start(gateway_factory: Callable[..., Any], recorder: tuple[Recorder, str]) -> Start:
    """A gateway whose routes all lead to the recorder: `/open` (no key), `/small` (a 1000-byte
    body limit), `/tracing` (lists TRACE), `/key` (a key required)."""
    _rec, url = recorder

    async def make(**overrides: Any) -> Gateway:
        routes = [
            {"name": "open", "path_prefix": "/open", "upstream": url, "auth": "none"},
            {"name": "small", "path_prefix": "/small", "upstream": url, "auth": "none", "max_body_bytes": 1000},
            {"name": "tracing", "path_prefix": "/tracing", "upstream": url, "auth": "none",
             "methods": ["GET", "TRACE"]},
            {"name": "key", "path_prefix": "/key", "upstream": url},
        ]  # fmt: skip
        gw: Gateway = await gateway_factory(routes=routes, **overrides)
        return gw

    return make


def refused(reply: Reply, status: int, code: str) -> None:
    assert (reply.status, reply.code) == (status, code), (reply.status, reply.body[:300])
    assert reply.headers.getall("Connection") == ["close"]
    assert reply.json()["meta"]["requestId"] == reply.headers["X-Request-Id"]


# --- 1. exact request framing -------------------------------------------------------------------

SMUGGLED = b"GET /open/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"


def raw(method: str, path: str, lines: list[str], body: bytes = b"", version: str = "1.1") -> bytes:
    head = f"{method} {path} HTTP/{version}\r\nHost: gw\r\n" + "".join(f"{line}\r\n" for line in lines)
    return head.encode("latin-1") + b"\r\n" + body


FRAMING = {
    "cl-2^64-1": raw("POST", "/open/x", ["Content-Length: 18446744073709551615"], SMUGGLED),
    "cl-2^64": raw("POST", "/open/x", ["Content-Length: 18446744073709551616"], SMUGGLED),
    "cl-2^53+1": raw("POST", "/open/x", [f"Content-Length: {2**53 + 1}"], SMUGGLED),
    "cl-leading-zero": raw("POST", "/open/x", ["Content-Length: 05"], b"hello" + SMUGGLED),
    "cl-plus": raw("POST", "/open/x", ["Content-Length: +5"], b"hello"),
    "cl-list": raw("POST", "/open/x", ["Content-Length: 5, 5"], b"hello"),
    "cl-twice": raw("POST", "/open/x", ["Content-Length: 5", "Content-Length: 5"], b"hello"),
    "cl-inner-space": raw("POST", "/open/x", ["Content-Length: 5 5"], b"hello"),
    "cl-and-te": raw("POST", "/open/x", ["Content-Length: 5", "Transfer-Encoding: chunked"], b"0\r\n\r\n"),
    "te-gzip-chunked": raw("POST", "/open/x", ["Transfer-Encoding: gzip, chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "te-chunked-twice": raw(
        "POST", "/open/x", ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], b"0\r\n\r\n"
    ),
    "te-identity": raw("POST", "/open/x", ["Transfer-Encoding: identity"], b"hello"),
    "te-obfuscated": raw("POST", "/open/x", ["Transfer-Encoding: xchunked"], b"0\r\n\r\n"),
    "te-on-http10": raw("POST", "/open/x", ["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n", "1.0"),
    "bare-lf": b"POST /open/x HTTP/1.1\nHost: gw\nContent-Length: 5\n\nhello",
    "obs-fold": raw("POST", "/open/x", ["Content-Length: 5", "X-Folded: a", " b"], b"hello"),
    "nul-in-value": raw("POST", "/open/x", ["Content-Length: 5", "X-A: a\x00b"], b"hello"),
    "cr-in-value": raw("POST", "/open/x", ["Content-Length: 5", "X-A: a\rb"], b"hello"),
}


@pytest.mark.parametrize("case", list(FRAMING), ids=list(FRAMING))
async def test_framing_the_gateway_cannot_honour_is_400_closes_and_reaches_no_upstream(
    start: Start, recorder: tuple[Recorder, str], case: str
) -> None:
    gw = await start()
    rec, _url = recorder
    before = requests_counted(gw, "-", "invalid_request")
    async with connect(gw.proxy.port) as (reader, writer):
        # A good request first, in the same packet: it is answered, the refused one after it.
        writer.write(raw("GET", "/open/first", []) + FRAMING[case])
        first = await read_reply(reader)
        assert (first.status, first.body) == (200, b"recorded")
        assert "Connection" not in first.headers
        reply = await read_reply(reader)
        refused(reply, 400, "invalid_request")
        assert await closed_by_server(reader) == b""  # nothing after it (the smuggled GET) is answered
    assert [(s.method, s.path) for s in rec.seen] == [("GET", "/open/first")]
    assert requests_counted(gw, "-", "invalid_request") == before + 1  # an access record for the refusal


async def test_the_upstream_gets_the_gateways_own_framing_never_the_clients(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start()
    rec, _url = recorder
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(raw("POST", "/open/length", ["Content-Length: 5"], b"hello"))
        assert (await read_reply(reader)).status == 200
        writer.write(raw("POST", "/open/chunks", ["Transfer-Encoding: CHUNKED"], b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"))
        assert (await read_reply(reader)).status == 200
        writer.write(raw("POST", "/open/empty", ["Content-Length: 0"]))
        assert (await read_reply(reader)).status == 200
        writer.write(raw("GET", "/open/none", []))
        assert (await read_reply(reader)).status == 200
    length, chunks, empty, none = rec.seen
    assert (length.header("Content-Length"), length.header("Transfer-Encoding")) == (["5"], [])
    assert (chunks.header("Content-Length"), chunks.header("Transfer-Encoding")) == ([], ["chunked"])
    assert (empty.header("Content-Length"), empty.header("Transfer-Encoding")) == (["0"], [])
    assert (none.header("Content-Length"), none.header("Transfer-Encoding")) == ([], [])
    assert [(s.body, s.whole) for s in rec.seen] == [(b"hello", True), (b"hello", True), (b"", True), (b"", True)]


async def test_a_broken_chunk_mid_body_is_400_and_the_upstream_never_gets_a_whole_request(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start()
    rec, _url = recorder
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(raw("POST", "/open/upload", ["Transfer-Encoding: chunked"], b"5\r\nhello\r\n"))
        await until(lambda: len(rec.seen) == 1, what="the upload's head at the upstream")
        writer.write(b"fffffffffffffffffffff\r\n" + b"x" * 100 + b"\r\n0\r\n\r\n" + SMUGGLED)  # size overflow
        reply = await read_reply(reader)
        refused(reply, 400, "invalid_request")
        assert await closed_by_server(reader) == b""
    await asyncio.sleep(0.2)
    assert [(s.path, s.whole) for s in rec.seen] == [("/open/upload", False)]


# --- 2. pipelining ------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_up_to_the_first_unparseable_one(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start()
    rec, _url = recorder
    batch = (
        raw("GET", "/open/1", [])
        + raw("POST", "/open/2", ["Content-Length: 5"], b"12345")
        + raw("POST", "/open/3", ["Transfer-Encoding: chunked"], b"2\r\nab\r\n0\r\n\r\n")
        + raw("GET", "/open/4", [])
        + b"GET /open/5 HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n"
        + raw("GET", "/open/6", [])
    )
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(batch)
        for _ in range(4):
            assert (await read_reply(reader)).status == 200
        refused(await read_reply(reader), 400, "invalid_request")
        assert await closed_by_server(reader) == b""
    assert [(s.path, s.body) for s in rec.seen] == [
        ("/open/1", b""), ("/open/2", b"12345"), ("/open/3", b"ab"), ("/open/4", b""),
    ]  # fmt: skip


# --- 3. body limits -----------------------------------------------------------------------------


async def test_a_declared_length_over_the_routes_limit_is_413_before_anything_is_forwarded(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start()
    rec, _url = recorder
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(raw("POST", "/small/ok", ["Content-Length: 1000"], b"a" * 1000))
        assert (await read_reply(reader)).status == 200
        writer.write(raw("POST", "/small/big", ["Content-Length: 1001"], b"b" * 1001))
        refused(await read_reply(reader), 413, "body_too_large")
        assert await closed_by_server(reader) == b""
    assert [(s.path, len(s.body), s.whole) for s in rec.seen] == [("/small/ok", 1000, True)]
    assert requests_counted(gw, "small", "body_too_large") == 1


async def test_a_chunked_body_growing_past_the_limit_is_413_and_never_reaches_the_upstream_whole(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start()
    rec, _url = recorder
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(
            raw("POST", "/small/within", ["Transfer-Encoding: chunked"], b"3e8\r\n" + b"w" * 1000 + b"\r\n0\r\n\r\n")
        )
        assert (await read_reply(reader)).status == 200
        writer.write(raw("POST", "/small/grows", ["Transfer-Encoding: chunked"]))
        for _ in range(5):  # 5 x 300 bytes, one at a time
            writer.write(b"12c\r\n" + b"g" * 300 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        reply = await read_reply(reader)
        refused(reply, 413, "body_too_large")
        assert await closed_by_server(reader) == b""
    await asyncio.sleep(0.2)
    assert (rec.seen[0].path, rec.seen[0].whole) == ("/small/within", True)
    assert all(not s.whole for s in rec.seen[1:]), [(s.path, len(s.body)) for s in rec.seen]


# --- 4. the request head: size, fields, deadline ---------------------------------------------------


def head_of(size: int, *, fields: int | None = None, path: str = "/open/h") -> bytes:
    """A complete request head of exactly `size` bytes (or of `fields` header fields)."""
    start = f"GET {path} HTTP/1.1\r\nHost: gw\r\n".encode()
    if fields is not None:
        return start + b"".join(b"X-F%d: v\r\n" % i for i in range(fields - 1)) + b"\r\n"
    pad = size - len(start) - len(b"X-Pad: \r\n\r\n")
    return start + b"X-Pad: " + b"p" * pad + b"\r\n\r\n"


async def test_a_head_over_max_header_bytes_is_431_in_one_write_or_dribbled(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start(**{"limits.max_header_bytes": 4096})
    rec, _url = recorder
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(head_of(4096))  # exactly the limit: forwarded
        assert (await read_reply(reader)).status == 200
        writer.write(head_of(4097))
        refused(await read_reply(reader), 431, "headers_too_large")
        assert await closed_by_server(reader) == b""
    async with connect(gw.proxy.port) as (reader, writer):
        big = head_of(6000)
        for i in range(0, 4500, 500):  # in pieces, the count spanning reads, up to the piece that passes the limit
            writer.write(big[i : i + 500])
            await writer.drain()
            await asyncio.sleep(0.01)
        refused(await read_reply(reader), 431, "headers_too_large")
        assert await closed_by_server(reader) == b""
    assert len(rec.seen) == 1
    assert requests_counted(gw, "-", "headers_too_large") == 2


async def test_one_field_is_bounded_at_8k_inside_the_head_limit(start: Start, recorder: tuple[Recorder, str]) -> None:
    """nginx's and aiohttp's per-field default stays: a field up to 8190 bytes passes, a longer one is
    refused (400) however much room the whole head has left; nothing of it is forwarded. (The bound
    is on the value: llhttp counts it apart from the name.)"""
    gw = await start()  # the default max_header_bytes: 32 KiB for the whole head
    rec, _url = recorder
    cookie = "c=" + "k" * (8190 - len("c="))
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(raw("GET", "/open/cookie", [f"Cookie: {cookie}"]))
        assert (await read_reply(reader)).status == 200
    assert rec.seen[0].header("Cookie") == [cookie]
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(raw("GET", "/open/cookie", [f"Cookie: {cookie}k"]))
        refused(await read_reply(reader), 400, "invalid_request")
        assert await closed_by_server(reader) == b""
    assert len(rec.seen) == 1


async def test_more_than_max_headers_fields_is_431(start: Start, recorder: tuple[Recorder, str]) -> None:
    gw = await start(**{"limits.max_headers": 10})
    rec, _url = recorder
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(head_of(0, fields=10))  # Host and 9 more: at the limit
        assert (await read_reply(reader)).status == 200
        writer.write(head_of(0, fields=11))
        refused(await read_reply(reader), 431, "headers_too_large")
        assert await closed_by_server(reader) == b""
    assert len(rec.seen) == 1 and len(rec.seen[0].headers) >= 10


async def test_a_slowloris_head_is_answered_408_and_closed_at_the_heads_deadline(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start(**{"limits.header_timeout_seconds": 1.0})
    rec, _url = recorder
    loop = asyncio.get_running_loop()
    dribble = head_of(2000)
    async with connect(gw.proxy.port) as (reader, writer):
        first_byte = loop.time()

        async def slowloris() -> None:
            for i in range(len(dribble) - 1):  # never the last byte; each byte well within any idle timeout
                writer.write(dribble[i : i + 1])
                await asyncio.sleep(0.05)

        async with asyncio.TaskGroup() as tasks:
            task = tasks.create_task(slowloris())
            reply = await read_reply(reader)
            answered = loop.time() - first_byte
            task.cancel()
        refused(reply, 408, "request_timeout")
        assert await closed_by_server(reader) == b""
    assert 0.9 <= answered < 2.0, answered  # the deadline counts from the first byte, not reset per byte
    assert rec.seen == []
    assert requests_counted(gw, "-", "request_timeout") == 1


async def test_the_head_deadline_spares_an_idle_connection_and_a_head_that_arrives_in_time(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start(**{"limits.header_timeout_seconds": 1.0, "limits.keepalive_seconds": 2.5})
    rec, _url = recorder
    loop = asyncio.get_running_loop()
    async with connect(gw.proxy.port) as (reader, writer):
        opened = loop.time()
        assert await still_open(reader, 1.5)  # no byte yet: the keep-alive timeout governs, not the head's
        head = head_of(300)
        for i in range(0, len(head), 50):  # in parts, within the deadline
            writer.write(head[i : i + 50])
            await asyncio.sleep(0.1)
        assert (await read_reply(reader)).status == 200
        assert await still_open(reader, 1.2)  # idle after an answer: still the keep-alive timeout
        assert await closed_by_server(reader) == b""
        assert loop.time() - opened >= 2.5
    assert len(rec.seen) == 1


# --- 5. a stalled upload ---------------------------------------------------------------------------


async def test_a_stalled_upload_is_answered_408_within_the_body_timeout(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start(**{"limits.body_timeout_seconds": 1.0})
    rec, _url = recorder
    loop = asyncio.get_running_loop()
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(raw("POST", "/open/stall", ["Content-Length: 100000"], b"s" * 1000))
        await until(lambda: len(rec.seen) == 1, what="the upload's head at the upstream")
        stalled = loop.time()
        reply = await read_reply(reader)
        waited = loop.time() - stalled
        refused(reply, 408, "request_timeout")
        assert await closed_by_server(reader) == b""
    assert 0.5 <= waited < 2.5, waited
    await asyncio.sleep(0.2)
    assert [(s.path, s.whole) for s in rec.seen] == [("/open/stall", False)]


async def test_a_slow_but_steady_upload_is_not_cut_by_the_body_timeout(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start(**{"limits.body_timeout_seconds": 0.5})
    rec, _url = recorder
    parts = [bytes([65 + i]) * 100 for i in range(8)]
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(raw("POST", "/open/steady", [f"Content-Length: {sum(map(len, parts))}"]))
        for part in parts:  # 8 x 0.3 s: longer in all than the timeout, never idle as long
            await asyncio.sleep(0.3)
            writer.write(part)
        assert (await read_reply(reader)).status == 200
    assert rec.seen[0].body == b"".join(parts) and rec.seen[0].whole


# --- 6. the connection cap ---------------------------------------------------------------------------


async def test_connections_over_max_connections_are_closed_on_accept(
    start: Start, recorder: tuple[Recorder, str]
) -> None:
    gw = await start(**{"limits.max_connections": 3})
    server = gw.replica.proxy_server
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(connect(gw.proxy.port)) for _ in range(3)]
        await until(lambda: len(server.connections) == 3, what="three connections accepted")
        async with connect(gw.proxy.port) as (reader, writer):
            writer.write(raw("GET", "/open/over", []))
            assert await closed_by_server(reader, 2.0) == b""  # closed, not answered
        assert server.rejected == 1
        for reader, writer in held:  # the ones inside the cap are served
            writer.write(raw("GET", "/open/in", []))
            assert (await read_reply(reader)).status == 200
        held[0][1].close()
        await until(lambda: len(server.connections) == 2, what="a connection to close")
        async with connect(gw.proxy.port) as (reader, writer):  # room again
            writer.write(raw("GET", "/open/again", []))
            assert (await read_reply(reader)).status == 200
    rec, _url = recorder
    assert sorted(s.path for s in rec.seen) == ["/open/again", "/open/in", "/open/in", "/open/in"]


# --- 7. header hygiene and methods -------------------------------------------------------------------

POSING = [
    ("Forwarded", "for=1.2.3.4;proto=https"),
    ("X-Real-IP", "1.2.3.4"),
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X-Forwarded-For", "1.2.3.4"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/internal"),
    ("X_Forwarded_For", "5.6.7.8"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
]


@pytest.mark.parametrize(
    ("trusted_proxies", "trusted"),
    [(None, False), (["10.0.0.0/8"], False), (["10.0.0.0/8", "127.0.0.0/8"], True)],
    ids=["none", "other-network", "loopback-trusted"],
)
async def test_headers_posing_as_someone_else_pass_only_from_a_trusted_proxy(
    start: Start, recorder: tuple[Recorder, str], trusted_proxies: list[str] | None, trusted: bool
) -> None:
    gw = await start(**({"trusted_proxies": trusted_proxies} if trusted_proxies else {}))
    rec, _url = recorder
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(raw("GET", "/open/who", [f"{n}: {v}" for n, v in POSING]))
        assert (await read_reply(reader)).status == 200
    (seen,) = rec.seen
    # the gateway's own, either way
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Host") == ["gw"]
    if trusted:
        assert seen.header("X-Forwarded-For") == ["1.2.3.4, 127.0.0.1"]
        for name, value in POSING[:4] + POSING[5:8]:
            assert seen.header(name) == [value], name
    else:
        assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
        for name, _value in POSING[:4] + POSING[5:8]:
            assert seen.header(name) == [], name


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
async def test_connect_and_trace_are_405_unless_the_route_lists_them(
    start: Start, recorder: tuple[Recorder, str], method: str
) -> None:
    gw = await start()
    rec, _url = recorder
    async with connect(gw.proxy.port) as (reader, writer):
        writer.write(raw(method, "/open/x", []))
        reply = await read_reply(reader)
        assert (reply.status, reply.code) == (405, "method_not_allowed")
        allow = {m.strip() for m in reply.headers["Allow"].split(",")}
        assert "GET" in allow and not allow & {"CONNECT", "TRACE"}
    assert rec.seen == []
    if method == "TRACE":  # a route that lists it forwards it
        async with connect(gw.proxy.port) as (reader, writer):
            writer.write(raw("TRACE", "/tracing/x", []))
            assert (await read_reply(reader)).status == 200
        assert [(s.method, s.path) for s in rec.seen] == [("TRACE", "/tracing/x")]


# --- 8. memory: many connections each holding an unfinished maximal head ------------------------------

CONNECTIONS = 300
HEAD_BYTES = 32 * 1024  # the default limits.max_header_bytes
# The bound: what the heads themselves hold, about twice over (the parser keeps each field's raw bytes
# and its decoded value), plus 48 KiB a connection for the socket, the protocol, its task and parser.
BOUND_PER_CONNECTION = 2 * HEAD_BYTES + 48 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def unfinished_head(i: int) -> bytes:
    """A head just under HEAD_BYTES, of 64 fields, without its final empty line."""
    start = f"GET /open/m{i} HTTP/1.1\r\nHost: gw\r\n".encode()
    room = HEAD_BYTES - len(start) - 64
    per = room // 64
    fields = b"".join(b"X-M%02d: " % n + secrets.token_hex(per).encode()[: per - 9] + b"\r\n" for n in range(64))
    return start + fields


@pytest.mark.slow
async def test_rss_stays_bounded_with_hundreds_of_connections_holding_maximal_unfinished_heads(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, recorder: tuple[Recorder, str]
) -> None:
    _rec, url = recorder
    proxy_port, admin_port = free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": proxy_port},
        "admin": {"listen": {"host": "127.0.0.1", "port": admin_port}, "tokens": admin_tokens.entries},
        "redis": {"url": redis_server.url, "prefix": f"m{secrets.token_hex(4)}:"},
        "routes": [{"name": "open", "path_prefix": "/open", "upstream": url, "auth": "none"}],
        "limits": {"header_timeout_seconds": 60},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(path),
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.returncode is None, log_path.read_text()
            with contextlib.suppress(OSError):
                async with connect(proxy_port) as (reader, writer):
                    writer.write(raw("GET", "/open/warm", []))
                    if (await read_reply(reader)).status == 200:
                        break
            assert time.monotonic() < deadline, "the gateway did not start"
            await asyncio.sleep(0.1)
        # warm: a few complete maximal heads first, so the allocator's first growth is not counted
        for i in range(5):
            async with connect(proxy_port) as (reader, writer):
                writer.write(unfinished_head(i) + b"\r\n")
                assert (await read_reply(reader)).status == 200
        await asyncio.sleep(0.5)
        before = rss_bytes(proc.pid)
        heads = [unfinished_head(i) for i in range(CONNECTIONS)]
        assert all(HEAD_BYTES - 200 < len(h) + 2 <= HEAD_BYTES for h in heads), {len(h) for h in heads}
        async with contextlib.AsyncExitStack() as stack:
            conns = [await stack.enter_async_context(connect(proxy_port)) for _ in range(CONNECTIONS)]
            for (_reader, writer), head in zip(conns, heads, strict=True):
                writer.write(head)
            await asyncio.gather(*(writer.drain() for _reader, writer in conns))
            await asyncio.sleep(2.0)  # every head read by the gateway
            during = rss_bytes(proc.pid)
            growth = during - before
            print(
                f"\nRSS {before / MIB:.1f} MiB -> {during / MIB:.1f} MiB with {CONNECTIONS} unfinished "
                f"{HEAD_BYTES // 1024} KiB heads: +{growth / MIB:.1f} MiB, {growth / CONNECTIONS / 1024:.1f} KiB "
                f"a connection (bound {BOUND_PER_CONNECTION // 1024} KiB)"
            )
            # the heads are held, not dropped: finishing a few of them gets each its answer
            for reader, writer in conns[:3]:
                writer.write(b"\r\n")
                reply = await read_reply(reader)
                assert reply.status == 200, reply.body[:200]
        assert growth < CONNECTIONS * BOUND_PER_CONNECTION, growth
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
