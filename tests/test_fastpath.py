"""The fast forwarding path (gateway/h1/client.py) against upstreams that misbehave, and the lookup path's
single flight and negative-cache bound (gateway/keytable/lookup.py, gateway/keytable/cache.py), all on real parts.
The lookup tests turn the key filter off (cache.key_filter: false): they show what happens behind
it, when it is not ready; tests/test_known.py shows the filter itself.

The upstreams here are raw asyncio servers that write the test's bytes as given (odd chunkings,
trailers, interim responses, garbage, silent closes, stalls) and count the connections they accept,
so connection reuse is observed from the upstream's side. Redis is the session's real redis-server;
Redis reads are counted with `INFO commandstats` (the key lookup is one GET). A test that needs a read
in flight holds it with HeldReads (the real GET, held before it is sent or after its reply, until the
test releases it); one test of single flight holds it in Redis itself with `CLIENT PAUSE` (2 s, this
xdist worker's own redis-server). tests/test_lookup.py shows the lookup's decisions alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from gateway import config as config_mod
from gateway.keytable.cache import NEGATIVE_MAX
from gateway.keytable.record import KeyRecord, digest
from gateway.runtime.replica import Replica, build
from gateway.runtime.serve import listen_client
from tests.conftest import (
    AdminTokens,
    Gateway,
    RedisProcess,
    free_port,
    get_calls,
    make_config,
    migrations_over,
    serve_replica,
)
from tests.loopback import LoopbackServer

MIB = 1024 * 1024
SHORT = 0.5  # timeout_seconds of the /short route
WAIT = 10.0  # the most any single step may take before the test calls it a hang


# --- a raw upstream ------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the upstream received it."""

    conn: int  # which accepted connection, from 1
    index: int  # the how-manyth request on that connection, from 1
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    upstream: RawUpstream = field(repr=False)


Handler = Callable[[Seen, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def _read_chunked_body(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


@dataclass
class RawUpstream(LoopbackServer):
    """An HTTP/1.1 server written by hand: it parses each request, records it, and lets `handler`
    answer with whatever bytes it likes. `handler` returns True to keep the connection for the next
    request; False closes it. `read_bodies=False` leaves the request body to the handler."""

    handler: Handler
    read_bodies: bool = True
    connections: int = 0
    seen: list[Seen] = field(default_factory=list)
    closed_by_gateway: list[int] = field(default_factory=list)  # connections the gateway ended

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def open_connections(self) -> int:
        return len(self._tasks)

    def on(self, conn: int) -> list[Seen]:
        return [s for s in self.seen if s.conn == conn]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        index = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_gateway.append(conn)
                    return
                index += 1
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers: CIMultiDict[str] = CIMultiDict()
                for line in lines:
                    if line:
                        name, _, value = line.partition(":")
                        headers.add(name.strip(), value.strip())
                body = b""
                if self.read_bodies:
                    if "chunked" in headers.get("Transfer-Encoding", "").lower():
                        body = await _read_chunked_body(reader)
                    elif "Content-Length" in headers:
                        body = await reader.readexactly(int(headers["Content-Length"]))
                seen = Seen(conn, index, method, path, headers, body, self)
                self.seen.append(seen)
                if not await self.handler(seen, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # close() ends a handler still waiting; start_server's callback must not see it cancelled


def response(status: int = 200, body: bytes = b"", *, reason: str = "OK", headers: list[str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", *(headers or [])]
    if not any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in lines[1:]):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def dribble(writer: asyncio.StreamWriter, data: bytes, pieces: list[int]) -> None:
    """`data` in writes of the given sizes (cycled), yielding to the loop between writes so each
    one leaves as its own segment and the gateway's parser sees the bytes split at odd places."""
    at = i = 0
    while at < len(data):
        size = pieces[i % len(pieces)]
        writer.write(data[at : at + size])
        await writer.drain()
        await asyncio.sleep(0)
        at += size
        i += 1


async def until_eof(seen: Seen, reader: asyncio.StreamReader, seconds: float = WAIT) -> bool:
    """Sends nothing more and waits (bounded) for the gateway to close its side; True if it did."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    seen.upstream.closed_by_gateway.append(seen.conn)
    return True


# --- the gateway in front of it ------------------------------------------------------------------


def routes_for(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "path_prefix": "/public", "upstream": upstream, "auth": "none"},
        {"name": "short", "path_prefix": "/short", "upstream": upstream, "auth": "none", "timeout_seconds": SHORT},
        {"name": "long", "path_prefix": "/long", "upstream": upstream, "auth": "none", "timeout_seconds": 30},
        {"name": "api", "path_prefix": "/api", "upstream": upstream},
    ]


async def start_replica_for(
    cfg: config_mod.Config, stack: contextlib.AsyncExitStack, *, socket_timeout: float, retries: bool
) -> Replica:
    """Like conftest.start_replica, with the command client's timeout and retries chosen by the test
    (a read held by CLIENT PAUSE must outlast the pause, or fail fast when the test wants it to)."""
    url = cfg.redis.url or ""
    extra: dict[str, Any] = {} if retries else {"retry": Retry(NoBackoff(), 0)}
    client = Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=5, **extra)
    listener = listen_client(url)
    stack.push_async_callback(client.aclose)
    stack.push_async_callback(listener.aclose)
    replica = build(cfg, client, listener)
    await stack.enter_async_context(replica.running())
    known = replica.lookup.known
    await until(lambda: replica.coherence.coherent and (known.ready or not known.enabled),
                what="the invalidation subscription and the key filter came up")  # fmt: skip
    await migrations_over(replica)  # their script's GET must not land in a test's count of GETs
    return replica


Front = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def front(redis_server: RedisProcess, admin_tokens: AdminTokens) -> AsyncIterator[Front]:
    """A gateway (proxy and admin listeners, routes_for) in front of a given upstream URL."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            upstream_url: str, *, socket_timeout: float = 10.0, retries: bool = True, **overrides: Any
        ) -> Gateway:
            # A Redis paused by a test (2 s) is neither a break nor the end of the cache's lease.
            overrides = {
                "routes": routes_for(upstream_url),
                "redis.health_check_seconds": 5,
                "redis.lease_seconds": 5,
                **overrides,
            }
            cfg = make_config(
                redis_url=redis_server.url, upstream_url=upstream_url, tokens=admin_tokens.entries, overrides=overrides
            )
            replica = await start_replica_for(cfg, stack, socket_timeout=socket_timeout, retries=retries)
            return await serve_replica(replica, stack, admin_tokens, connector=aiohttp.TCPConnector(limit=200))

        yield start


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    started: list[RawUpstream] = []

    async def start(handler: Handler, *, read_bodies: bool = True) -> RawUpstream:
        upstream = RawUpstream(handler, read_bodies=read_bodies)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


async def until(condition: Callable[[], bool], seconds: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.005)


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def code(self) -> str:
        assert self.headers.get("Content-Type", "").startswith("application/json"), (self.status, self.body[:200])
        code: str = json.loads(self.body)["error"]["code"]
        return code


async def fetch(session: aiohttp.ClientSession, method: str, url: str, *, key: str | None = None, **kw: Any) -> Answer:
    headers = dict(kw.pop("headers", {}))
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with asyncio.timeout(WAIT), session.request(method, url, headers=headers, **kw) as r:
        return Answer(r.status, CIMultiDict(r.headers), await r.read())


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """One client connection at a time: what the gateway sends back must leave it usable."""
    async with aiohttp.ClientSession(
        auto_decompress=False, connector=aiohttp.TCPConnector(limit=1, force_close=False)
    ) as session:
        yield session


@dataclass
class RawReply:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    cut: bool  # the gateway closed the connection before the declared body was complete


async def raw_get(port: int, path: str, seconds: float = WAIT) -> RawReply:
    """A GET over a raw socket that reads the body until its declared end or the connection's."""
    async with asyncio.timeout(seconds):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            status = int((await reader.readline()).split()[1])
            headers: CIMultiDict[str] = CIMultiDict()
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers.add(name.strip(), value.strip())
            declared = int(headers.get("Content-Length", "-1"))
            body = bytearray()
            while declared < 0 or len(body) < declared:
                data = await reader.read(65536)
                if not data:
                    break
                body += data
            if "chunked" in headers.get("Transfer-Encoding", ""):
                complete = bytes(body).endswith(b"0\r\n\r\n")
            else:
                complete = len(body) == declared
            return RawReply(status, headers, bytes(body), cut=not complete)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


# --- 1. what the upstream sends arrives intact -----------------------------------------------------


def chunked_encoding(parts: list[bytes], *, extensions: bool, trailers: list[str]) -> bytes:
    out = bytearray()
    for i, part in enumerate(parts):
        ext = f';n={i};q="a b"' if extensions and i % 3 == 0 else ""
        out += f"{len(part):x}{ext}\r\n".encode() + part + b"\r\n"
    out += b"0\r\n" + "".join(t + "\r\n" for t in trailers).encode() + b"\r\n"
    return bytes(out)


@pytest.mark.parametrize("split", ["one-write", "dribbled"])
async def test_many_small_chunks_with_extensions_and_trailers_arrive_intact(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], client: aiohttp.ClientSession, split: str
) -> None:
    parts = [bytes([65 + i % 26]) * (1 + i % 37) + b"|" for i in range(600)]
    encoded = chunked_encoding(parts, extensions=True, trailers=["X-Checksum: abc", "X-Other: 1"])
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum, X-Other\r\nX-Up: chunked\r\n\r\n"

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/chunked"):
            if split == "one-write":
                writer.write(head + encoded)
            else:
                await dribble(writer, head + encoded, [1, 2, 7, 3, 64, 5, 11])
        else:
            writer.write(response(body=b"next"))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    answer = await fetch(client, "GET", gw.proxy_url + "/public/chunked")
    assert answer.status == 200
    assert answer.headers["X-Up"] == "chunked"
    assert answer.body == b"".join(parts)
    # the trailers were consumed with the message: the same upstream connection carries the next one
    assert (await fetch(client, "GET", gw.proxy_url + "/public/next")).body == b"next"
    assert upstream.connections == 1
    assert [s.index for s in upstream.on(1)] == [1, 2]


async def test_a_content_length_body_split_at_odd_places_arrives_intact(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], client: aiohttp.ClientSession
) -> None:
    body = secrets.token_bytes(3 * MIB + 17)

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/big"):
            await dribble(writer, response(body=body), [1, 65537, 3, 200_003, 9_999])
        else:
            writer.write(response(body=b"next"))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    answer = await fetch(client, "GET", gw.proxy_url + "/public/big")
    assert answer.status == 200
    assert answer.headers["Content-Length"] == str(len(body))
    assert hashlib.sha256(answer.body).digest() == hashlib.sha256(body).digest()
    assert (await fetch(client, "GET", gw.proxy_url + "/public/next")).body == b"next"
    assert upstream.connections == 1


async def test_a_body_delimited_by_the_upstreams_close_arrives_intact(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], client: aiohttp.ClientSession
) -> None:
    body = b"no length, ends at close;" * 5000

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/eof"):
            await dribble(writer, b"HTTP/1.1 200 OK\r\nX-Up: eof\r\n\r\n" + body, [4096, 1, 30000])
            return False  # the close ends the body
        writer.write(response(body=b"next"))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    answer = await fetch(client, "GET", gw.proxy_url + "/public/eof")
    assert answer.status == 200
    assert answer.body == body
    assert (await fetch(client, "GET", gw.proxy_url + "/public/next")).body == b"next"
    assert upstream.connections == 2


@pytest.mark.parametrize(("status", "reason"), [(304, "Not Modified"), (204, "No Content")])
async def test_a_204_or_304_carrying_content_length_does_not_hang(
    front: Front,
    raw_upstream: Callable[..., Awaitable[RawUpstream]],
    client: aiohttp.ClientSession,
    status: int,
    reason: str,
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/nobody"):
            # no body follows, whatever Content-Length says (RFC 9110 6.4.1)
            writer.write(f'HTTP/1.1 {status} {reason}\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n'.encode())
        else:
            writer.write(response(body=b"next"))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    started = time.monotonic()
    answer = await fetch(client, "GET", gw.proxy_url + "/public/nobody")
    assert answer.status == status
    assert answer.body == b""
    assert answer.headers.get("ETag") == '"v1"'
    assert time.monotonic() - started < 5  # not the route's 30 s timeout
    # neither the client connection nor the upstream one waits for 1234 bytes that never come
    assert (await fetch(client, "GET", gw.proxy_url + "/public/next")).body == b"next"
    assert upstream.connections == 1
    assert len(upstream.on(1)) == 2


@pytest.mark.parametrize("framing", ["Content-Length: 5000", "Transfer-Encoding: chunked"])
async def test_head_returns_the_headers_and_both_connections_stay_usable(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], client: aiohttp.ClientSession, framing: str
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.method == "HEAD":
            writer.write(f"HTTP/1.1 200 OK\r\n{framing}\r\nX-Head: yes\r\nETag: h1\r\n\r\n".encode())
        else:
            writer.write(response(body=b"after head"))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    answer = await fetch(client, "HEAD", gw.proxy_url + "/public/thing")
    assert answer.status == 200
    assert answer.headers["X-Head"] == "yes"
    assert answer.headers["ETag"] == "h1"
    assert answer.body == b""
    if framing.startswith("Content-Length"):
        # what a GET would carry: HEAD's headers pass through like any other answer's
        assert answer.headers.get("Content-Length") == "5000"
    for _ in range(2):
        assert (await fetch(client, "GET", gw.proxy_url + "/public/thing")).body == b"after head"
    assert upstream.connections == 1
    assert [s.method for s in upstream.on(1)] == ["HEAD", "GET", "GET"]


@pytest.mark.parametrize("split", ["together", "apart"])
async def test_interim_1xx_responses_are_skipped_and_the_final_one_arrives(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], client: aiohttp.ClientSession, split: str
) -> None:
    interim = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    ]
    final = response(body=b"the final answer", headers=["X-Final: 1"])

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/hints"):
            if split == "together":
                writer.write(b"".join(interim) + final)
            else:
                for part in [*interim, final]:
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.05)
        else:
            writer.write(response(body=b"next"))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    for method, data in (("GET", None), ("POST", b"payload" * 100)):
        answer = await fetch(client, method, gw.proxy_url + "/public/hints", data=data)
        assert answer.status == 200
        assert answer.headers["X-Final"] == "1"
        assert answer.body == b"the final answer"
    assert (await fetch(client, "GET", gw.proxy_url + "/public/next")).body == b"next"
    assert upstream.connections == 1
    assert upstream.seen[1].body == b"payload" * 100


# --- 2. connection reuse, and what ends it ---------------------------------------------------------


async def test_sequential_requests_reuse_one_upstream_connection(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = b"" if seen.method == "HEAD" else f"{seen.method} {len(seen.body)}".encode()
        writer.write(response(body=body))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    plan: list[tuple[str, bytes | None]] = [
        ("GET", None),
        ("POST", b"x" * 70_000),
        ("HEAD", None),
        ("PUT", b"y" * 10),
        ("DELETE", None),
        ("GET", None),
    ] * 2
    for i, (method, data) in enumerate(plan):
        # a new client connection each time, so only the gateway's side can reuse
        async with aiohttp.ClientSession() as session:
            answer = await fetch(session, method, gw.proxy_url + f"/public/{i}", data=data)
        assert answer.status == 200
        if method != "HEAD":
            assert answer.body == f"{method} {len(data or b'')}".encode()
    assert upstream.connections == 1
    assert [s.index for s in upstream.seen] == list(range(1, len(plan) + 1))


GARBAGE = {
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "bad-status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\n",
    "binary": b"\x00\x01\x02\xff\xfe garbage \r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
async def test_a_garbage_answer_is_502_and_the_next_request_gets_a_fresh_connection(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], garbage: str
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(GARBAGE[garbage] if seen.path.endswith("/garbage") else response(body=b"fine"))
        await writer.drain()
        return True  # and keeps the connection open: the gateway must not use it again

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/public/ok")).body == b"fine"
    bad = await fetch(gw.session, "GET", gw.proxy_url + "/public/garbage")
    assert bad.status == 502
    assert bad.code == "upstream_unavailable"
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/public/ok")).body == b"fine"
    assert upstream.connections == 2
    assert [s.path for s in upstream.on(1)] == ["/public/ok", "/public/garbage"]
    assert [s.path for s in upstream.on(2)] == ["/public/ok"]
    await until(lambda: 1 in upstream.closed_by_gateway, what="the gateway closed the connection that spoke garbage")


async def test_trailing_junk_after_a_response_does_not_reach_the_next_request(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """Bytes after a complete response (here in the same segment) belong to no request: the
    connection cannot be trusted with another, and an innocent next request must not pay for it."""

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/junk"):
            writer.write(response(body=b"ok") + b"HTTP/1.1 418 JUNK\r\nContent-Le")
        else:
            writer.write(response(body=b"fine"))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/public/junk")).body == b"ok"
    for _ in range(2):
        after = await fetch(gw.session, "GET", gw.proxy_url + "/public/innocent")
        assert (after.status, after.body) == (200, b"fine")


async def test_a_timeout_is_504_and_the_next_request_gets_a_fresh_connection(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/hang"):
            await until_eof(seen, reader)  # answers nothing, until the gateway gives up on it
            return False
        writer.write(response(body=b"fine"))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/short/ok")).body == b"fine"
    started = time.monotonic()
    slow = await fetch(gw.session, "GET", gw.proxy_url + "/short/hang")
    took = time.monotonic() - started
    assert slow.status == 504
    assert slow.code == "upstream_timeout"
    assert SHORT * 0.8 <= took < SHORT + 4
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/short/ok")).body == b"fine"
    assert upstream.connections == 2
    assert [s.path for s in upstream.on(1)] == ["/short/ok", "/short/hang"]
    await until(lambda: 1 in upstream.closed_by_gateway, what="the gateway closed the timed-out connection")


@pytest.mark.parametrize("then", ["closes", "stays-open"])
async def test_an_upstream_saying_connection_close_gets_a_new_connection_each_time(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], then: str
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(body=b"bye", headers=["Connection: close"]))
        await writer.drain()
        if then == "closes":
            return False
        return not await until_eof(seen, reader)  # said close, but leaves the socket open: still must not be reused

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    for _ in range(3):
        answer = await fetch(gw.session, "GET", gw.proxy_url + "/public/x")
        assert (answer.status, answer.body) == (200, b"bye")
    assert upstream.connections == 3
    assert all(s.index == 1 for s in upstream.seen)


@pytest.mark.parametrize("when", ["right-after-the-response", "after-an-idle-delay"])
async def test_an_idle_connection_the_upstream_closed_is_not_used_again(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], when: str
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(body=f"{seen.method} {len(seen.body)}".encode()))  # no Connection: close
        await writer.drain()
        if when == "after-an-idle-delay":
            await asyncio.sleep(0.2)
        return False

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    for i, (method, data) in enumerate([("GET", None), ("GET", None), ("POST", b"z" * 1000), ("GET", None)]):
        if i:
            await until(lambda: upstream.open_connections == 0, what="the upstream closed the idle connection")
            await asyncio.sleep(0.05)
        answer = await fetch(gw.session, method, gw.proxy_url + "/public/x", data=data)
        assert (answer.status, answer.body) == (200, f"{method} {len(data or b'')}".encode())
    assert upstream.connections == 4
    assert [s.body for s in upstream.seen if s.method == "POST"] == [b"z" * 1000]  # sent once


def closes_stale_connections(
    reply: Callable[[Seen], bytes],
) -> tuple[Handler, Callable[[], None], list[Seen]]:
    """A handler that answers normally until `go_stale()`; from then on, a connection accepted
    before that call reads the next request on it whole and closes without a word: from the
    gateway's side, exactly the race of reusing a kept-alive connection that the upstream closed
    while it was idle (the FIN crosses the request)."""
    stale_before = [0]
    dropped: list[Seen] = []
    accepted = [0]

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        accepted[0] = max(accepted[0], seen.conn)
        if seen.conn <= stale_before[0]:
            dropped.append(seen)
            return False
        writer.write(reply(seen))
        await writer.drain()
        return True

    def go_stale() -> None:
        stale_before[0] = accepted[0]

    return handler, go_stale, dropped


async def test_a_get_on_a_connection_closed_while_idle_is_retried_once_on_a_fresh_one(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    handler, go_stale, dropped = closes_stale_connections(lambda seen: response(body=b"fresh"))
    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/public/warm")).body == b"fresh"
    go_stale()
    answer = await fetch(gw.session, "GET", gw.proxy_url + "/public/again")
    assert (answer.status, answer.body) == (200, b"fresh")  # transparent: the client never sees the race
    assert [s.path for s in dropped] == ["/public/again"]
    assert upstream.connections == 2
    assert [s.path for s in upstream.on(2)] == ["/public/again"]


async def test_the_retry_goes_to_a_fresh_connection_not_to_another_pooled_one(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """h1/client.py: "A kept-alive connection that the upstream closed while idle is retried once on a
    fresh one". With two idle connections in the pool that the upstream has both dropped, the retry
    must not take the second stale one."""

    gate = asyncio.Event()
    handler, go_stale, dropped = closes_stale_connections(lambda seen: response(body=b"ok"))

    async def holding(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/hold"):
            await asyncio.wait_for(gate.wait(), WAIT)
        return await handler(seen, reader, writer)

    upstream = await raw_upstream(holding)
    gw = await front(upstream.url)
    # two exchanges at once: two connections, both back in the pool afterwards
    async with asyncio.TaskGroup() as tg:
        held = [tg.create_task(fetch(gw.session, "GET", gw.proxy_url + "/public/hold")) for _ in range(2)]
        await until(lambda: upstream.connections == 2, what="two upstream connections")
        gate.set()
    assert [t.result().status for t in held] == [200, 200]
    go_stale()
    answer = await fetch(gw.session, "GET", gw.proxy_url + "/public/after")
    assert (answer.status, answer.body) == (200, b"ok"), answer.body
    assert len(dropped) == 1
    assert upstream.connections == 3


async def test_a_request_with_a_body_is_never_sent_twice(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    handler, go_stale, dropped = closes_stale_connections(lambda seen: response(body=b"%d" % len(seen.body)))
    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/public/warm")).body == b"0"
    go_stale()
    body = secrets.token_bytes(50_000)
    answer = await fetch(gw.session, "POST", gw.proxy_url + "/public/charge", data=body)
    # The upstream may have acted on it: not retried, the client is told the upstream failed.
    assert answer.status == 502
    assert answer.code == "upstream_unavailable"
    assert [s.method for s in dropped] == ["POST"]
    posts = [s for s in upstream.seen if s.method == "POST"]
    assert [(s.conn, s.body == body) for s in posts] == [(1, True)]
    assert upstream.connections == 1  # no second connection was opened for it
    # the pool is not poisoned: the next request works, on a fresh connection
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/public/next")).body == b"0"
    assert upstream.connections == 2


async def test_a_fresh_connection_closed_before_any_answer_is_502_and_not_retried(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False  # reads the request, closes without a byte

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    answer = await fetch(gw.session, "GET", gw.proxy_url + "/public/x")
    assert answer.status == 502
    assert answer.code == "upstream_unavailable"
    # a fresh connection that closed is not the idle-close race: no retry
    assert upstream.connections == 1
    assert len(upstream.seen) == 1


# --- 3. timeouts ---------------------------------------------------------------------------------


async def test_each_route_keeps_its_own_timeout_on_a_shared_pooled_connection(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/hang"):
            await until_eof(seen, reader)
            return False
        if seen.path.endswith("/slow"):
            await asyncio.sleep(SHORT * 2.5)  # past the short route's timeout, far within the long one's
        writer.write(response(body=seen.path.encode()))
        await writer.drain()
        return True

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)

    # the long route's exchange leaves its (30 s) timer on the pooled connection ...
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/long/first")).status == 200
    started = time.monotonic()
    answer = await fetch(gw.session, "GET", gw.proxy_url + "/short/hang")
    took = time.monotonic() - started
    # ... and the short route, on that same connection, still times out after its own 0.5 s
    assert answer.status == 504
    assert answer.code == "upstream_timeout"
    assert took < SHORT + 4, took
    assert [s.path for s in upstream.on(1)] == ["/long/first", "/short/hang"]

    # the other way: the short route's timer must not cut the long route's slow answer
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/short/second")).status == 200
    answer = await fetch(gw.session, "GET", gw.proxy_url + "/long/slow")
    assert (answer.status, answer.body) == (200, b"/long/slow")
    assert [s.path for s in upstream.on(2)] == ["/short/second", "/long/slow"]
    assert upstream.connections == 2


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_upstream_that_stalls_mid_body_cuts_the_client_connection(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], framing: str
) -> None:
    sent = 300 * 1024

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MIB + b"s" * sent)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % sent + b"s" * sent + b"\r\n")
        await writer.drain()
        await until_eof(seen, reader)  # and then nothing more
        return False

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    started = time.monotonic()
    reply = await raw_get(gw.proxy.port, "/short/stall")
    took = time.monotonic() - started
    assert reply.status == 200  # the head had gone out before the stall
    assert reply.cut, "the gateway ended the body as if it were complete"
    assert sent <= len(reply.body) < MIB + 64
    assert took < SHORT + 5, took
    await until(lambda: 1 in upstream.closed_by_gateway, what="the gateway closed the stalled upstream connection")


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_upstream_that_closes_mid_body_cuts_the_client_connection(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], framing: str
) -> None:
    sent = 300 * 1024

    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if seen.path.endswith("/next"):
            writer.write(response(body=b"next"))
            await writer.drain()
            return True
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MIB + b"c" * sent)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % sent + b"c" * sent + b"\r\n")
        await writer.drain()
        return False  # closes with the body unfinished

    upstream = await raw_upstream(handler)
    gw = await front(upstream.url)
    started = time.monotonic()
    # a 30 s route: the close, not a timer, must end it
    reply = await raw_get(gw.proxy.port, "/long/truncated", seconds=4)
    assert time.monotonic() - started < 4
    assert reply.status == 200
    assert reply.cut, "a truncated upstream body was passed on as complete"
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/long/next")).body == b"next"


# --- 4. large bodies stream with bounded memory ----------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def gateway_serve(tmp_path: Path, redis_url: str, upstream_url: str) -> AsyncIterator[tuple[int, int]]:
    """`python -m gateway serve` as an operator runs it; yields (pid, proxy port)."""
    proxy_port, admin_port = free_port(), free_port()
    raw = {
        "listen": {"host": "127.0.0.1", "port": proxy_port},
        "admin": {"listen": {"host": "127.0.0.1", "port": admin_port}},
        "redis": {"url": redis_url, "prefix": f"fp{secrets.token_hex(4)}:"},
        # max_body_bytes: the 64 MiB upload below is above the default limit (10 MiB)
        "routes": [
            {
                "name": "public",
                "path_prefix": "/public",
                "upstream": upstream_url,
                "auth": "none",
                "max_body_bytes": 256 * MIB,
            }
        ],
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.returncode is None, log.read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.05)
        yield proc.pid, proxy_port
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 15)


@pytest.mark.slow
async def test_large_bodies_stream_through_a_served_gateway_with_bounded_memory(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    size = 128 * MIB
    block = hashlib.sha256(b"block").digest() * (MIB // 32)
    upload_size = 64 * MIB
    upload_gate = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line = head.split(b"\r\n", 1)[0]
                if b"/public/download" in line:
                    mb = int(line.split(b"mb=")[1].split()[0])
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (mb * MIB))
                    for _ in range(mb):  # made on the fly, as fast as the gateway takes it
                        writer.write(block)
                        await writer.drain()
                elif b"/public/upload" in line:
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await asyncio.wait_for(upload_gate.wait(), WAIT)  # holds the body back meanwhile
                    digest_ = hashlib.sha256()
                    left = length
                    while left:
                        data = await reader.read(min(left, 1 << 20))
                        assert data
                        digest_.update(data)
                        left -= len(data)
                    body = f"{length} {digest_.hexdigest()}".encode()
                    writer.write(response(body=body))
                    await writer.drain()
                else:
                    writer.write(response(body=b"warm"))
                    await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    upstream_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with gateway_serve(tmp_path, redis_server.url, upstream_url) as (pid, port):
            # warm up the path (imports, buffers) with a small and a middling download
            for path in ("/public/warm", "/public/download?mb=4"):
                assert (await raw_get(port, path, 30)).status == 200
            baseline = rss_bytes(pid)
            peak = baseline

            # Download: the client reads a little, then stops for a while. A gateway that buffers
            # takes the upstream's whole answer into memory meanwhile; a streaming one stops reading.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /public/download?mb={size // MIB} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 200"), head
            digest_ = hashlib.sha256()
            got = 0
            stalled = False
            async with asyncio.timeout(60):
                while got < size:
                    data = await reader.read(1 << 20)
                    assert data, f"the download ended after {got} bytes"
                    digest_.update(data)
                    got += len(data)
                    peak = max(peak, rss_bytes(pid))
                    if not stalled and got >= 2 * MIB:
                        stalled = True
                        for _ in range(30):  # 1.5 s: the slow client
                            await asyncio.sleep(0.05)
                            peak = max(peak, rss_bytes(pid))
            writer.close()
            assert got == size
            assert digest_.digest() == hashlib.sha256(block * (size // MIB)).digest()
            download_growth = peak - baseline

            # Upload: the upstream does not read the body for a while; the client keeps sending.
            baseline = peak = rss_bytes(pid)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST /public/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: {upload_size}\r\n\r\n".encode())
            sent = 0
            gate_opened_at: float | None = None
            started = time.monotonic()
            async with asyncio.timeout(60):
                while sent < upload_size:
                    writer.write(block)
                    sent += len(block)
                    try:
                        await asyncio.wait_for(writer.drain(), 0.05)
                    except TimeoutError:
                        # blocked: the gateway is not taking more than it can pass on
                        while True:
                            peak = max(peak, rss_bytes(pid))
                            if gate_opened_at is None and time.monotonic() - started > 1.5:
                                gate_opened_at = time.monotonic()
                                upload_gate.set()
                            try:
                                await asyncio.wait_for(writer.drain(), 0.05)
                                break
                            except TimeoutError:
                                continue
                    peak = max(peak, rss_bytes(pid))
                upload_gate.set()
                answer = await reader.readuntil(b"\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 200"), answer
                length = int(answer.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                echoed = await reader.readexactly(length)
            writer.close()
            assert echoed == f"{upload_size} {hashlib.sha256(block * (upload_size // MIB)).hexdigest()}".encode()
            assert gate_opened_at is not None, "the whole upload went through while the upstream read nothing"
            upload_growth = peak - baseline
    finally:
        server.close()
        await server.wait_closed()
    assert download_growth < 32 * MIB, f"RSS grew {download_growth / MIB:.1f} MiB for a {size // MIB} MiB download"
    assert upload_growth < 32 * MIB, f"RSS grew {upload_growth / MIB:.1f} MiB for a {upload_size // MIB} MiB upload"


# --- 5. single flight ------------------------------------------------------------------------------


PAUSE_MS = 2000


async def pause_redis(redis: Redis) -> float:
    """Holds every Redis command for PAUSE_MS (CLIENT PAUSE ALL cannot be lifted early); returns
    when it ends."""
    await redis.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
    return time.monotonic() + PAUSE_MS / 1000


async def warm_redis_pool(gw: Gateway, connections: int = 4) -> None:
    """Several idle connections in the replica's Redis pool: a read held by the pause is then one
    already sent, not one waiting on a new connection's handshake."""
    await asyncio.gather(*(gw.replica.store.redis.ping() for _ in range(connections)))


class HeldReads:
    """Stands in for the replica's key store in its KeyLookup (gw.replica.lookup.store): each read is
    the real GET on the session's Redis, held before it is sent (`before=True`) or after its reply came
    (`before=False`, the reply in flight) until the test releases it. Only the first `hold` reads are
    held; later ones run straight through. A CLIENT PAUSE would hold them too, for a fixed 2 s."""

    def __init__(self, gw: Gateway, *, before: bool, hold: int, fail: BaseException | None = None) -> None:
        self.store = gw.replica.lookup.store
        self.before = before
        self.hold = hold
        self.fail = fail
        self.held = 0
        self.released = asyncio.Event()
        self._arrived = asyncio.Event()

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        if self.held >= self.hold:
            return await self.store.get_by_hash(key_hash)
        answer = None if self.before else await self.store.get_by_hash(key_hash)
        self.held += 1
        self._arrived.set()
        await self.released.wait()
        if self.fail is not None:
            raise self.fail
        return await self.store.get_by_hash(key_hash) if self.before else answer

    async def until_held(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.held < count:
                self._arrived.clear()
                await self._arrived.wait()


def hold_reads(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, *, before: bool, hold: int, fail: BaseException | None = None
) -> HeldReads:
    held = HeldReads(gw, before=before, hold=hold, fail=fail)
    monkeypatch.setattr(gw.replica.lookup, "store", held)
    return held


async def lookup_upstream(raw_upstream: Callable[..., Awaitable[RawUpstream]]) -> RawUpstream:
    async def handler(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(body=b"forwarded"))
        await writer.drain()
        return True

    return await raw_upstream(handler)


async def test_concurrent_requests_with_one_unknown_key_share_one_redis_read(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], redis: Redis
) -> None:
    upstream = await lookup_upstream(raw_upstream)
    gw = await front(upstream.url, **{"cache.negative_ttl_seconds": 30, "cache.key_filter": False})
    await warm_redis_pool(gw)
    unknown = "gw_unknown_" + secrets.token_urlsafe(24)
    n = 50
    before = await get_calls(redis)
    ends = await pause_redis(redis)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(fetch(gw.session, "GET", gw.proxy_url + "/api/x", key=unknown)) for _ in range(n)]
        await until(lambda: gw.replica.proxy.inflight == n, what="all requests waiting on the lookup")
        assert time.monotonic() < ends, "the requests did not all arrive while Redis was paused"
    answers = [t.result() for t in tasks]
    assert {(a.status, a.code) for a in answers} == {(401, "key_not_found")}
    assert await get_calls(redis) - before == 1

    # remembered as unknown: within negative_ttl the same key costs no further read
    for _ in range(20):
        answer = await fetch(gw.session, "GET", gw.proxy_url + "/api/x", key=unknown)
        assert (answer.status, answer.code) == (401, "key_not_found")
    assert await get_calls(redis) - before == 1
    assert upstream.connections == 0


async def test_concurrent_requests_with_distinct_unknown_keys_each_read_redis(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = await lookup_upstream(raw_upstream)
    gw = await front(upstream.url, **{"cache.key_filter": False})
    n = 50
    keys = ["gw_unknown_" + secrets.token_urlsafe(24) for _ in range(n)]
    before = await get_calls(redis)
    held = hold_reads(gw, monkeypatch, before=True, hold=n)  # each read held until all n are in flight
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(fetch(gw.session, "GET", gw.proxy_url + "/api/x", key=k)) for k in keys]
        await held.until_held(n)  # n reads at once: none of them waited for, or joined, another
        assert gw.replica.proxy.inflight == n
        held.released.set()
    assert {(t.result().status, t.result().code) for t in tasks} == {(401, "key_not_found")}
    assert await get_calls(redis) - before == n


async def test_a_read_begun_before_an_eviction_is_not_joined_by_a_request_after_it(
    front: Front,
    raw_upstream: Callable[..., Awaitable[RawUpstream]],
    redis: Redis,
    redis_server: RedisProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spec 8's generation rule on the request path. A's read has its reply (the key enabled) and is
    held there, in flight; the key is then disabled in Redis and evicted from the cache as an
    invalidation would; B, arriving after the eviction, must issue its own read (which runs after
    the write) rather than share A's, and so gets the fresh answer. tests/test_lookup.py shows the
    rule on the lookup alone."""
    upstream = await lookup_upstream(raw_upstream)
    gw = await front(upstream.url)
    created = await gw.create_key(name="generation", owner="acme")
    key, key_hash = created["key"], digest(created["key"])
    record_name = f"{gw.replica.config.redis.prefix}k:{key_hash}"  # the layout in gateway/keytable/store.py
    record = KeyRecord.from_json(await redis.get(record_name))
    assert record.enabled
    disabled = record.bump(enabled=False, disabled_at=time.time(), disabled_reason="test").to_json()
    writer = Redis.from_url(redis_server.url)
    await writer.ping()
    gw.replica.cache.evict(key_hash)  # not cached (the admin API's create may have cached it): A reads Redis
    before = await get_calls(redis)
    held = hold_reads(gw, monkeypatch, before=False, hold=1)  # A's read: its reply in hand, held
    try:
        async with asyncio.TaskGroup() as tg:
            first = tg.create_task(fetch(gw.session, "GET", gw.proxy_url + "/api/a", key=key))
            await held.until_held(1)  # A's GET has its reply (enabled) and is in flight
            write = tg.create_task(writer.set(record_name, disabled))
            await write
            gw.replica.cache.evict(key_hash)  # the invalidation lands while A's read is in flight
            try:
                # B's own read is not held; had B joined A's read it would wait for A (a timeout here)
                second = tg.create_task(fetch(gw.session, "GET", gw.proxy_url + "/api/b", key=key))
                await asyncio.wait({second}, timeout=WAIT)
                assert second.done(), "B waited for A's read begun before the eviction"
                assert not first.done()  # A's read is still held
            finally:
                held.released.set()
        assert write.result()
    finally:
        await writer.aclose()
    a, b = first.result(), second.result()
    assert (a.status, a.body) == (200, b"forwarded")  # A's own (older) answer, served to A only
    assert (b.status, b.code) == (403, "key_disabled")  # B read for itself, after the write
    assert await get_calls(redis) - before == 2
    # and A's stale answer was never cached: the next request is refused without a read
    c = await fetch(gw.session, "GET", gw.proxy_url + "/api/c", key=key)
    assert (c.status, c.code) == (403, "key_disabled")
    assert await get_calls(redis) - before == 2
    assert [s.path for s in upstream.seen] == ["/api/a"]


async def test_requests_sharing_a_failed_read_each_answer_503(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared read times out (the client's socket timeout, as redis-py raises it): every request
    that waited on it answers 503 auth_unavailable itself (keytable/lookup.py: "each waiter answers
    for itself")."""
    upstream = await lookup_upstream(raw_upstream)
    gw = await front(upstream.url, **{"cache.key_filter": False})
    unknown = "gw_unknown_" + secrets.token_urlsafe(24)
    n = 10
    before = await get_calls(redis)
    held = hold_reads(gw, monkeypatch, before=True, hold=1, fail=RedisTimeoutError("Timeout reading from socket"))
    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(fetch(gw.session, "GET", gw.proxy_url + "/api/x", key=unknown)) for _ in range(n)]
        await until(lambda: gw.replica.proxy.inflight == n, what="all requests waiting on the lookup")
        assert held.held == 1  # one read, the leader's; the other n - 1 requests joined it
        assert time.monotonic() - started < 1.4, "the requests did not all join before the read timed out"
        held.released.set()  # the read times out
    answers = [(t.result().status, t.result().code) for t in tasks]
    assert answers == [(503, "auth_unavailable")] * n
    assert await get_calls(redis) - before <= 1  # the leader's (Redis drops it if the client left first)
    assert upstream.connections == 0


# --- 6. the negative cache's own bound -------------------------------------------------------------


async def pipelined(port: int, requests: list[bytes]) -> list[int]:
    """Sends `requests` back to back on one connection; the statuses of the answers, in order."""
    statuses: list[int] = []
    async with asyncio.timeout(60):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"".join(requests))
            await writer.drain()
            for _ in requests:
                statuses.append(int((await reader.readline()).split()[1]))
                length = 0
                while (line := await reader.readline()) != b"\r\n":
                    assert line, "the gateway closed a pipelined connection"
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return statuses


async def test_a_flood_of_unknown_keys_does_not_evict_a_known_one(
    front: Front, raw_upstream: Callable[..., Awaitable[RawUpstream]], redis: Redis
) -> None:
    """More distinct unknown keys than NEGATIVE_MAX: the known key stays cached (a hit, no read).

    cache.max_entries is NEGATIVE_MAX here, so a cache that kept unknown keys under the same bound
    as known ones would have pushed the known key out."""
    upstream = await lookup_upstream(raw_upstream)
    filter_off = {"cache.key_filter": False}  # the negative cache is what this test is about
    gw = await front(
        upstream.url, **{"cache.negative_ttl_seconds": 60, "cache.max_entries": NEGATIVE_MAX, **filter_off}
    )
    known = (await gw.create_key(name="known", owner="acme"))["key"]
    assert (await fetch(gw.session, "GET", gw.proxy_url + "/api/x", key=known)).status == 200
    flood = NEGATIVE_MAX + 500
    before = await get_calls(redis)

    # Over HTTP: pipelined on a few kept-alive connections, so the flood costs the gateway, not the client.
    lines = [
        f"GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer gw_flood_{i}_{secrets.token_hex(8)}\r\n\r\n".encode()
        for i in range(flood)
    ]
    connections = 16
    batches = await asyncio.gather(*(pipelined(gw.proxy.port, lines[i::connections]) for i in range(connections)))
    assert {status for batch in batches for status in batch} == {401}
    assert sum(len(batch) for batch in batches) == flood
    assert await get_calls(redis) - before == flood
    assert gw.replica.coherence.coherent

    before = await get_calls(redis)
    answer = await fetch(gw.session, "GET", gw.proxy_url + "/api/x", key=known)
    assert (answer.status, answer.body) == (200, b"forwarded")
    assert await get_calls(redis) - before == 0, "the known key was evicted by the flood of unknown ones"
    assert len(gw.replica.cache) <= NEGATIVE_MAX + 1
