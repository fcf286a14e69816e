"""Forwarding to the upstream (spec 6): a lean HTTP/1.1 client on asyncio protocols.

Connections are pooled per origin and kept alive. The request head is written
as bytes straight from the client's raw headers (gateway/forwarding.py picks
them); the response is parsed by aiohttp's own HTTP parser (the C llhttp
binding), not by hand. A small response that arrived whole goes back in one
write; anything else is streamed both ways, with flow control.

Failures are translated here, once: no response head within the route's
timeout is 504 upstream_timeout; a refused, reset or garbage answer is 502
upstream_unavailable. After the status line has gone to the client a failure
can only cut the client's connection. A kept-alive connection that the upstream
closed while idle is retried once on a fresh one, and only for a request with
no body (nothing of the client's has been consumed). Redirects are passed back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from . import errors
from .aiohttp_compat import (
    EMPTY_PAYLOAD,
    BaseProtocol,
    HttpProcessingError,
    HttpResponseParser,
    RawResponseMessage,
    StreamReader,
    drain,
    reading_paused,
)
from .config import Route
from .forwarding import client_response_head, upstream_request_head
from .http1 import Request, http_date
from .keys import KeyRecord
from .routing import Target, encode, upstream_path

log = logging.getLogger("gateway.upstream")

CHUNK: Final = 64 * 1024
MAX_IDLE_PER_ORIGIN: Final = 512
IDLE_SECONDS: Final = 30.0  # an idle pooled connection older than this is closed, not reused
# Statuses whose responses never carry a body, whatever their headers say (RFC 9110 6.4.1).
_NO_BODY: Final = frozenset({204, 304})


class UpstreamError(Exception):
    """The exchange failed before a response head arrived: 502 (or 504 for TimeoutError)."""


class _Closed(UpstreamError):
    """The connection closed before any byte of the response: retryable on a reused connection."""


class ClientGone(ConnectionError):
    """Our own client went away while its body was being read: nothing to answer (recorded as 499)."""


@dataclass(frozen=True, slots=True)
class Origin:
    host: str
    port: int
    tls: bool
    host_header: bytes  # what the upstream sees in Host:

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if tls else 80)
        default = (443 if tls else 80) == port
        shown = f"[{host}]" if ":" in host else host
        return cls(host, port, tls, (shown if default else f"{shown}:{port}").encode("idna"))


class _Connection(BaseProtocol):
    """One keep-alive connection; at most one exchange at a time."""

    __slots__ = ("_head", "_last_read", "_parser", "_payload", "_timer",
                 "_upgraded", "closed", "idle_since", "origin", "reused", "timed_out", "timeout")  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        super().__init__(loop)
        self.origin = origin
        self._parser: Any = None  # one per exchange (made in begin); BaseProtocol.pause_reading() pauses it
        self._upgraded = False
        self._head: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self.timeout = 30.0
        self.closed = False
        self.timed_out = False
        self.reused = False
        self.idle_since = 0.0

    # exchange -------------------------------------------------------------

    def begin(self, method: str, timeout: float) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        # A fresh parser per exchange (cheap: ~0.5 us), so finished() can ask the old one whether
        # bytes beyond the answer arrived. read_until_eof: a body with neither a length nor chunked
        # framing ends when the upstream closes. A HEAD answer has no body whatever its headers say.
        self._parser = HttpResponseParser(
            self, self._loop, CHUNK, response_with_body=method != "HEAD", read_until_eof=True, auto_decompress=False
        )
        self.timeout = timeout
        self._head = self._loop.create_future()
        self._arm()
        return self._head

    def finished(self) -> bool:
        """True when the exchange ended cleanly and the connection may carry another.

        The timer stays armed: the next exchange reuses it, and on an idle
        connection it fires once and is dropped (no new handle per request)."""
        self._payload = None
        try:  # a parser that began another message holds bytes no request asked for
            leftover = self._parser.feed_eof()
        except Exception:
            leftover = True
        if leftover is not None:
            self.close()
            return False
        return not self.closed and self.transport is not None

    def close(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    # timeouts: one timer per connection, re-armed lazily (no new handle per read or per exchange)

    def _arm(self) -> None:
        self._last_read = now = self._loop.time()
        deadline = now + self.timeout
        timer = self._timer
        if timer is not None and timer.when() > deadline:  # armed for a longer timeout than this one
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = self._loop.call_at(deadline, self._check_timeout)

    def progress(self) -> None:
        self._last_read = self._loop.time()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_timeout(self) -> None:
        self._timer = None
        if self._head is None and self._payload is None:
            return
        if reading_paused(self):  # our client is slow to take the body: not the upstream's fault
            self._last_read = self._loop.time()
        deadline = self._last_read + self.timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check_timeout)
            return
        self.timed_out = True
        self._fail(TimeoutError())

    # asyncio.Protocol -------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if data:
            self._last_read = self._loop.time()
        if self._head is None and (self._payload is None or self._payload.is_eof()):
            if data:  # bytes after the whole answer, or nobody asked: this connection cannot be trusted any more
                self.close()
            return
        try:
            messages, _upgraded, _tail = self._parser.feed_data(data)
        except (HttpProcessingError, ValueError) as exc:
            self._fail(exc)
            return
        for message, payload in messages:
            if 100 <= message.code < 200:
                continue  # interim (100 Continue, 103 Early Hints): the final answer follows
            head = self._head
            if head is None or head.done():  # a second response to one request: garbage
                self._fail(UpstreamError("unexpected response"))
                return
            self._head = None
            if message.code in _NO_BODY:
                payload = EMPTY_PAYLOAD
            if payload is not EMPTY_PAYLOAD:
                self._payload = payload
            if message.should_close or message.upgrade:
                self.closed = True  # used for this exchange, never again
            head.set_result((message, payload))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        try:
            if self._parser is not None:
                self._parser.feed_eof()
        except Exception:  # noqa: S110 - a truncated body: the payload got the error already
            pass
        self._fail(_Closed("connection closed by the upstream") if exc is None else exc)
        super().connection_lost(exc)

    def _fail(self, exc: BaseException) -> None:
        head, payload = self._head, self._payload
        self._head = self._payload = None
        if head is not None and not head.done():
            head.set_exception(exc)
            head.exception()  # retrieved: a waiter may be gone already (its client left mid-upload)
        if payload is not None and not payload.is_eof():
            payload.set_exception(exc if isinstance(exc, Exception) else ConnectionError())
        self.close()


class _Pool:
    """Idle connections to one origin, most recently used first."""

    def __init__(self, origin: Origin, ssl_context: ssl.SSLContext | None) -> None:
        self.origin = origin
        self.ssl = ssl_context
        self.idle: collections.deque[_Connection] = collections.deque()

    def take(self, now: float) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and now - conn.idle_since < IDLE_SECONDS:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def connect(self, loop: asyncio.AbstractEventLoop, seconds: float) -> _Connection:
        origin = self.origin
        async with asyncio.timeout(seconds):
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, origin),
                origin.host,
                origin.port,
                ssl=self.ssl,
                server_hostname=origin.host if self.ssl else None,
            )
        return conn

    def give_back(self, conn: _Connection, now: float) -> None:
        if len(self.idle) >= MAX_IDLE_PER_ORIGIN:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class Forwarder:
    """The upstream pools, between `start` and `close` (the proxy's lifetime)."""

    def __init__(self) -> None:
        self._pools: dict[Origin, _Pool] = {}
        self._upstreams: dict[str, tuple[_Pool, str]] = {}  # route.upstream -> its pool and base path
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._upstreams.clear()

    def _pool(self, upstream: str) -> tuple[_Pool, str]:
        found = self._upstreams.get(upstream)
        if found is None:
            origin = Origin.parse(upstream)
            pool = self._pools.get(origin)
            if pool is None:
                if origin.tls and self._ssl is None:
                    self._ssl = ssl.create_default_context()
                pool = self._pools[origin] = _Pool(origin, self._ssl if origin.tls else None)
            found = self._upstreams[upstream] = (pool, urlsplit(upstream).path.rstrip("/"))
        return found

    async def forward(
        self,
        request: Request,
        route: Route,
        target: Target,
        record: KeyRecord | None,
        request_id: str,
    ) -> int | errors.Denial:
        """Stream the exchange and return the status sent; a Denial (502/504) when no response could be started."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the forwarder is not started")
        pool, base = self._pool(route.upstream)
        path = base + encode(upstream_path(route, target.path))
        if target.query:
            path += "?" + target.query
        has_body = request.body_exists
        head, chunked = upstream_request_head(
            request.method,
            path,
            request.raw_headers,
            host=pool.origin.host_header,
            forward_authorization=route.forward_authorization,
            record=record,
            request_id=request_id,
            peer=request.remote,
            scheme=request.scheme,
            has_body=has_body,
        )
        timeout = route.timeout_seconds
        for attempt in (1, 2):
            conn = pool.take(loop.time()) if attempt == 1 else None  # a retry always gets a fresh connection
            try:
                if conn is None:
                    conn = await pool.connect(loop, timeout)
                waiter = conn.begin(request.method, timeout)
                assert conn.transport is not None
                if has_body:
                    conn.transport.write(head)
                    await request.send_continue()  # when it asked: the key passed, now it may send its body
                    await _send_body(conn, request, chunked)
                else:
                    conn.transport.write(head)
                message, payload = await waiter
                break
            except ClientGone:
                if conn is not None:
                    conn.close()
                raise
            except _Closed:
                if conn is not None:
                    conn.close()
                if attempt == 1 and not has_body and conn is not None and conn.reused:
                    continue  # the upstream closed an idle keep-alive connection as we reused it
                if conn is not None and conn.timed_out:  # no sign of life while we sent the body
                    log.warning("upstream timeout", extra={"route": route.name, "request_id": request_id})
                    return errors.Denial("upstream_timeout")
                return self._failed(route, request_id, "closed")
            except TimeoutError:
                if conn is not None:
                    conn.close()
                log.warning("upstream timeout", extra={"route": route.name, "request_id": request_id})
                return errors.Denial("upstream_timeout")
            except (UpstreamError, HttpProcessingError, OSError, ValueError) as exc:
                if conn is not None:
                    conn.close()
                return self._failed(route, request_id, type(exc).__name__)
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
        else:  # pragma: no cover - the loop always breaks or returns
            raise AssertionError

        head, has_length = client_response_head(message.raw_headers, request_id, http_date(time.time()))
        if payload is EMPTY_PAYLOAD or payload.is_eof():
            # The whole answer is here already (the common small response): one write.
            body = payload.read_nowait(-1) if payload is not EMPTY_PAYLOAD else b""
            if payload.exception() is None:
                self._release(pool, conn, loop)
                # The upstream's Content-Length (a HEAD answer's too) stays; a chunked body gets one.
                request.reply(message.code, message.reason, head, body, has_length=has_length)
                return message.code
        await self._stream(request, pool, conn, payload, message, head, has_length, route, request_id, loop)
        return message.code

    async def _stream(
        self,
        request: Request,
        pool: _Pool,
        conn: _Connection,
        payload: StreamReader,
        message: RawResponseMessage,
        head: bytes,
        has_length: bool,
        route: Route,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        try:
            await request.start(message.code, message.reason, head, has_length=has_length)
        except BaseException:
            conn.close()
            raise
        clean = False
        try:
            while True:
                chunk = await payload.readany()
                if not chunk:
                    break
                await request.write(chunk)
            await request.end()
            clean = True
        except (TimeoutError, UpstreamError, HttpProcessingError, OSError, ValueError) as exc:
            # The status line is gone already: the only honest signal left is a cut connection.
            log.warning(
                "upstream failed mid-response: %s",
                type(exc).__name__,
                extra={"route": route.name, "request_id": request_id},
            )
            if request.transport is not None:
                request.transport.close()
        finally:
            if clean:
                self._release(pool, conn, loop)
            else:
                conn.close()

    @staticmethod
    def _release(pool: _Pool, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        if conn.finished():
            pool.give_back(conn, loop.time())
        else:
            conn.close()

    @staticmethod
    def _failed(route: Route, request_id: str, why: str) -> errors.Denial:
        log.warning("upstream unavailable: %s", why, extra={"route": route.name, "request_id": request_id})
        return errors.Denial("upstream_unavailable")


async def _send_body(conn: _Connection, request: Request, chunked: bool) -> None:
    """Stream the client's body to the upstream as it arrives (re-framed as chunked when it had no length)."""
    transport = conn.transport
    content = request.content
    while True:
        try:
            chunk = await content.readany()
        except (OSError, ValueError) as exc:  # the client's connection broke mid-upload (ConnectionError is OSError)
            raise ClientGone from exc
        if transport is None or transport.is_closing():
            raise _Closed("connection closed by the upstream while sending the body")
        if not chunk:
            break
        if chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            transport.write(chunk)
        if conn.writing_paused:
            await drain(conn)
        conn.progress()  # the response timeout counts from the last sign of life either way
    if chunked:
        transport.write(b"0\r\n\r\n")
