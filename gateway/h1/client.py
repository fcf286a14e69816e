"""Forwarding to the upstream (spec 6): a lean HTTP/1.1 client on asyncio protocols.

Connections are pooled per origin and kept alive. The request head is written
as bytes straight from the client's raw headers (gateway/h1/headers.py picks
them); the response is parsed by aiohttp's own HTTP parser (the C llhttp
binding), not by hand. A small response that arrived whole goes back in one
write; anything else is streamed both ways, with flow control.

Framing is exact (spec 6, issue 10). Before the parser sees them, the bytes of
each response head are checked here as they came: one plain decimal
Content-Length no larger than 2^53, or exactly `Transfer-Encoding: chunked`,
or neither (the body ends at the close); never both, never a bare CR or LF, a
folded line, a NUL or a space before a colon. Anything else is 502 and the
connection is closed. The parser's view must then agree with that check. The
client never gets the upstream's framing lines: the validated length is written
anew (gateway/h1/headers.py), or the listener frames the body itself.

A connection goes back to the pool only when the request went out whole as
framed (every body byte and the chunked terminator written), the response was
read whole as framed, and nothing else arrived; every other ending closes it.

While the client's body is being sent, the upstream is watched too: its
failure, its early answer, or its silence for the route's timeout (counted
while it holds our writes paused or we wait for its answer, not while we wait
for the client's next byte) ends the upload at once. The client's side ends it
as 413 body_too_large, 408 request_timeout, or 499 when the client left.

Failures are translated in one place (`_upstream_failed`), for the head and the
body phase alike: a timeout is 504 upstream_timeout; a refused, reset or
garbage answer is 502 upstream_unavailable. After the status line has gone to
the client a failure can only cut the client's connection; a client that
leaves mid-download is its own failure (raised, recorded as 499).

Replay (RFC 9110 9.2.2): a request is sent a second time, always on a fresh
connection, only when a reused connection closed before any byte of the answer
and the request is replayable (GET, HEAD or OPTIONS without a body), or when
not one byte of it had been written. Redirects are passed back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from gateway import errors
from gateway.config import MAX_SAFE_LENGTH, Route
from gateway.h1.compat import (
    EMPTY_PAYLOAD,
    BaseProtocol,
    HttpProcessingError,
    HttpResponseParser,
    RawResponseMessage,
    StreamReader,
    drain,
    reading_paused,
)
from gateway.h1.downstream import BodyTimeout, BodyTooLarge, Downstream
from gateway.h1.headers import NO_BODY_STATUS, client_response_head, http_date, upstream_request_head

log = logging.getLogger("gateway.upstream")

T = TypeVar("T")

CHUNK: Final = 64 * 1024
MAX_IDLE_PER_ORIGIN: Final = 512
IDLE_SECONDS: Final = 30.0  # an idle pooled connection older than this is closed, not reused
MAX_HEAD_BYTES: Final = 64 * 1024  # a response head (status line and fields) larger than this is 502
# Statuses whose responses never carry a body, whatever their headers say (RFC 9110 6.4.1).
# RFC 9110 9.2.2: what may be sent again after it may have reached the upstream (and only bodyless).
_REPLAYABLE: Final = frozenset({"GET", "HEAD", "OPTIONS"})

_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [^\r\n]*)?")
# A framing field's line: the name, what stands between it and the colon (must be nothing), the value.
_FRAMING_LINE: Final = re.compile(rb"\r\n(content-length|transfer-encoding)([^:\r\n]*):([^\r\n]*)", re.IGNORECASE)
_PLAIN_LENGTH: Final = re.compile(rb"[ \t]?(0|[1-9][0-9]{0,15})")  # at most one OWS byte, nothing after
_CHUNKED_ONLY: Final = re.compile(rb"[ \t]?chunked", re.IGNORECASE)


class UpstreamError(Exception):
    """The exchange failed before a response head arrived: 502 (or 504 for TimeoutError).

    Its message is a fixed phrase of this module, never bytes from the upstream (safe to log)."""


class _Closed(UpstreamError):
    """The connection closed before any byte of the response: retryable on a reused connection."""


class ClientGone(ConnectionError):
    """Our own client went away while its body was read or its answer written (recorded as 499)."""


class _BadClientBody(Exception):
    """The client's body broke its own framing while it was read (400 invalid_request)."""


@dataclass(frozen=True, slots=True)
class Framing:
    """A final response head's framing, as its raw bytes state it (checked by `check_head`)."""

    code: int
    length: int | None  # the one Content-Length; None when there is none
    chunked: bool


def check_head(head: bytes) -> Framing | str:
    """A response head (status line and field lines, each ending in CRLF, without the empty line)
    checked as raw bytes: its framing, or why it cannot be honoured exactly (a fixed phrase)."""
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        return "bare CR or LF in the response head"
    if b"\x00" in head:
        return "NUL in the response head"
    if b"\r\n " in head or b"\r\n\t" in head:
        return "folded line in the response head"
    status = _STATUS_LINE.fullmatch(head, 0, head.find(b"\r\n"))
    if status is None:
        return "malformed status line"
    code = int(status[2])
    length: int | None = None
    lengths = encodings = 0
    chunked = False
    for line in _FRAMING_LINE.finditer(head):
        between = line[2]
        if between:
            if not between.strip(b" \t"):
                return "space before the colon of a framing field"
            continue  # another field whose name begins alike (Content-Length-Foo)
        if len(line[1]) == len(b"content-length"):
            lengths += 1
            value = _PLAIN_LENGTH.fullmatch(line[3])
            if value is None:
                return "Content-Length is not one plain decimal"
            length = int(value[1])
            if length > MAX_SAFE_LENGTH:
                return "Content-Length out of range"
        else:
            encodings += 1
            chunked = _CHUNKED_ONLY.fullmatch(line[3]) is not None
            if not chunked:
                return "Transfer-Encoding other than chunked"
    if code < 200:
        return Framing(code, None, False)  # an interim answer: no body, its framing fields mean nothing
    if lengths > 1 or encodings > 1:
        return "framing field repeated"
    if lengths and encodings:
        return "Content-Length together with Transfer-Encoding"
    if encodings and status[1] == b"0":
        return "Transfer-Encoding in an HTTP/1.0 response"  # RFC 9112 6.1: faulty framing
    return Framing(code, length, chunked)


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

    __slots__ = ("_head", "_last_read", "_parser", "_payload", "_raw", "_timer", "_upgraded", "closed", "framing",
                 "idle_since", "origin", "request_whole", "reused", "timed_out", "timeout",
                 "waiting_on_client")  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        super().__init__(loop)
        self.origin = origin
        self._parser: Any = None  # one per exchange (made in begin); BaseProtocol.pause_reading() pauses it
        self._upgraded = False
        self._head: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._raw: bytearray | None = None  # the response head's bytes so far, while it is being checked
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self.framing: Framing | None = None  # the final head's, once checked
        self.timeout = 30.0
        self.closed = False
        self.timed_out = False
        self.reused = False
        self.request_whole = False  # the request went out whole as framed
        self.waiting_on_client = False  # the exchange waits for our client's body, not for the upstream
        self.idle_since = 0.0

    # exchange -------------------------------------------------------------

    def begin(self, method: str, timeout: float) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        # A fresh parser per exchange (cheap: ~0.5 us), so finished() can ask the old one whether
        # bytes beyond the answer arrived. read_until_eof: a body with neither a length nor chunked
        # framing ends when the upstream closes. A HEAD answer has no body whatever its headers say.
        self._parser = HttpResponseParser(
            self, self._loop, CHUNK, response_with_body=method != "HEAD", read_until_eof=True, auto_decompress=False
        )
        self._raw = bytearray()
        self.framing = None
        self.request_whole = False
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
        if leftover is not None or not self.request_whole:
            self.close()
            return False
        return not self.closed and self.transport is not None

    def close(self) -> None:
        self.closed = True
        self._disarm()
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                transport.abort()  # bytes the upstream is not taking: do not wait for them to leave
            else:
                transport.close()

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
        if reading_paused(self) or self.waiting_on_client:
            # Our client is slow to take the body, or to send its own: not the upstream's fault.
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
        if self._raw is not None and data:
            why = self._check_raw(data)
            if why is not None:
                self._fail(UpstreamError(why))
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
            framing = self.framing
            if self._raw is not None or framing is None or framing.code != message.code:
                self._fail(UpstreamError("the parser read a head the framing check did not"))
                return
            if framing.chunked != bool(message.chunked):
                self._fail(UpstreamError("the parser read other framing than the head states"))
                return
            self._head = None
            if message.code in NO_BODY_STATUS:
                payload = EMPTY_PAYLOAD
            if payload is not EMPTY_PAYLOAD:
                self._payload = payload
            if message.should_close or message.upgrade:
                self.closed = True  # used for this exchange, never again
            head.set_result((message, payload))

    def _check_raw(self, data: bytes) -> str | None:
        """Checks each response head's bytes (interim ones too) before the parser reads them."""
        raw = self._raw
        assert raw is not None
        start = len(raw)
        raw += data
        search = max(0, start - 3)
        while True:
            end = raw.find(b"\r\n\r\n", search)
            if end < 0:
                # A bare LF in a head not yet ended: refused now, not when a head that never ends
                # times out (a complete head is checked whole by check_head; the body is not ours).
                if raw.count(b"\n", start) != raw.count(b"\r\n", max(0, start - 1)):
                    return "bare LF in the response head"
                if len(raw) > MAX_HEAD_BYTES:
                    return "response head too large"
                return None
            framing = check_head(bytes(raw[: end + 2]))
            if isinstance(framing, str):
                return framing
            del raw[: end + 4]
            if framing.code >= 200:
                self.framing = framing
                self._raw = None  # what follows is the body: the parser's alone
                return None
            if framing.code == 101:
                return "an upgrade nobody asked for"
            start = search = 0

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        try:
            if self._parser is not None:
                self._parser.feed_eof()
        except Exception:  # noqa: S110 - a truncated body: the payload got the error already
            pass
        # Before any byte of the answer, a reset is the same race as a close (the idle-close retry).
        self._fail(_Closed("connection closed by the upstream" if exc is None else "connection reset by the upstream"))
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


# The errors of the upstream's side, wherever they surface (connect, head, body).
_UPSTREAM_ERRORS: Final = (TimeoutError, UpstreamError, HttpProcessingError, OSError, ValueError)


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
        request: Downstream,
        route: Route,
        path: str,
        request_id: str,
        *,
        key_id: str | None = None,
        key_owner: str | None = None,
        admit: Callable[[], bool] | None = None,
    ) -> int | errors.Denial | None:
        """Stream the exchange and return the status sent; a Denial when no response could be started
        (502/504 for the upstream's side, 413/408/400 for the client's body). None when `admit`, asked
        after a wait for a new connection and before the first byte goes upstream, says the decision
        to forward is stale: nothing was sent, and the caller decides again.

        `path` is the request target on the upstream below the route's base path (encoded, with its
        query); `key_id` and `key_owner` become the X-Gateway-Key-* identity headers."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the forwarder is not started")
        pool, base = self._pool(route.upstream)
        path = base + path
        has_body = request.body_exists  # its size was checked against the route by the proxy
        head, chunked = upstream_request_head(
            request.method,
            path,
            request.raw_headers,
            host=pool.origin.host_header,
            forward_authorization=route.forward_authorization,
            key_id=key_id,
            key_owner=key_owner,
            request_id=request_id,
            peer=request.remote,
            scheme=request.scheme,
            has_body=has_body,
            body_length=request.body_length,
            trusted=request.trusted,
        )
        replayable = not has_body and request.method in _REPLAYABLE
        timeout = route.timeout_seconds
        if has_body and (broken := request.content.exception()) is not None:
            # The body broke (or outgrew its limit) in the bytes that came with the head: refused
            # before a byte of the request goes upstream.
            return _client_body_failure(broken)
        early: int | None = None  # body bytes sent when the upstream answered before the whole body
        for attempt in (1, 2):
            conn = pool.take(loop.time()) if attempt == 1 else None  # a retry always gets a fresh connection
            written = False
            try:
                if conn is None:
                    conn = await pool.connect(loop, timeout)
                    if admit is not None and not admit():
                        pool.give_back(conn, loop.time())  # unused: the next request takes it
                        return None
                transport = conn.transport
                if conn.closed or transport is None or transport.is_closing():
                    raise _Closed("connection closed before the request was written")
                answered = conn.begin(request.method, timeout)
                written = True
                transport.write(head)
                if has_body:
                    try:
                        await request.send_continue()  # when it asked: the key passed, now it may send its body
                    except OSError as exc:
                        raise ClientGone("the client left before its body") from exc
                    early = await _send_body(loop, conn, request, chunked, answered)
                    conn.request_whole = early is None
                else:
                    conn.request_whole = True
                message, payload = await answered
                break
            except ClientGone:
                if conn is not None:
                    conn.close()
                raise
            except (BodyTooLarge, BodyTimeout, _BadClientBody) as exc:
                if conn is not None:
                    conn.close()
                return _client_body_failure(exc)
            except _Closed as exc:
                if conn is not None:
                    conn.close()
                    if attempt == 1 and conn.reused and not conn.timed_out and (replayable or not written):
                        continue  # the upstream closed an idle keep-alive connection as we reused it
                return self._upstream_failed(exc, conn, route, request_id, "head")
            except _UPSTREAM_ERRORS as exc:
                if conn is not None:
                    conn.close()
                return self._upstream_failed(exc, conn, route, request_id, "head")
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
        else:  # pragma: no cover - the loop always breaks or returns
            raise AssertionError

        # An upstream that answered before it had the whole body (and keeps the connection) still gets
        # the rest, as RFC 9112 9.5 asks, alongside the answer: what it reads is exactly the client's
        # request, and the connection stays reusable. One that is closing gets no more.
        rest = None
        if early is not None and not conn.closed:
            rest = loop.create_task(_send_body(loop, conn, request, chunked, None, early))
        try:
            return await self._answer(request, route, request_id, pool, conn, message, payload, rest, loop)
        finally:
            if rest is not None:
                if not rest.done():
                    rest.cancel()
                    conn.close()
                elif not rest.cancelled():
                    rest.exception()  # retrieved: an answer that failed first already closed the connection

    async def _answer(
        self,
        request: Downstream,
        route: Route,
        request_id: str,
        pool: _Pool,
        conn: _Connection,
        message: RawResponseMessage,
        payload: StreamReader,
        rest: asyncio.Task[int | None] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> int:
        framing = conn.framing
        assert framing is not None  # data_received resolves a head only after checking it
        code = message.code
        # The upstream's framing lines are never copied: the checked length is written anew. A HEAD
        # answer and a 304 keep it as what a GET would carry; a 204 has none (RFC 9110 8.6).
        length = None if code == 204 else framing.length
        head, has_length = client_response_head(message.raw_headers, request_id, http_date(time.time()), length)
        if payload is EMPTY_PAYLOAD or payload.is_eof():
            # The whole answer is here already (the common small response): one write.
            body = payload.read_nowait(-1) if payload is not EMPTY_PAYLOAD else b""
            if payload.exception() is None:
                if rest is None:
                    self._release(pool, conn, loop)
                request.reply(code, message.reason, head, body, has_length=has_length)
                if rest is not None:
                    await self._rest_sent(rest, request, conn)
                    self._release(pool, conn, loop)
                return code
        await self._stream(request, pool, conn, payload, message, head, has_length, route, request_id, loop, rest)
        return code

    @staticmethod
    async def _rest_sent(rest: asyncio.Task[int | None], request: Downstream, conn: _Connection) -> None:
        """Waits for the rest of a body the upstream answered early; the connection is reusable only
        when all of it went out, and the client's only when all of it was read."""
        try:
            conn.request_whole = await rest is None
        except (ClientGone, BodyTooLarge, BodyTimeout, _BadClientBody, *_UPSTREAM_ERRORS):
            conn.request_whole = False
            request.close_after()  # the client's body was not read to its end

    async def _stream(
        self,
        request: Downstream,
        pool: _Pool,
        conn: _Connection,
        payload: StreamReader,
        message: RawResponseMessage,
        head: bytes,
        has_length: bool,
        route: Route,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
        rest: asyncio.Task[int | None] | None = None,
    ) -> None:
        clean = False
        try:
            try:
                await request.start(message.code, message.reason, head, has_length=has_length)
            except OSError as exc:
                raise ClientGone("the client left before its answer") from exc
            while True:
                try:
                    chunk = await payload.readany()
                except _UPSTREAM_ERRORS as exc:
                    # The status line is gone already: the only honest signal left is a cut connection.
                    self._upstream_failed(exc, conn, route, request_id, "body")
                    request.abort()
                    return
                if not chunk:
                    break
                try:
                    await request.write(chunk)
                except OSError as exc:  # the client left mid-download: its failure, not the upstream's
                    raise ClientGone("the client left mid-download") from exc
            try:
                await request.end()
            except OSError as exc:
                raise ClientGone("the client left mid-download") from exc
            if rest is not None:
                await self._rest_sent(rest, request, conn)
            clean = True
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
    def _upstream_failed(
        exc: BaseException, conn: _Connection | None, route: Route, request_id: str, phase: str
    ) -> errors.Denial:
        """The one map of the upstream's failures, for the head and the body phase: a timeout is
        504 upstream_timeout, anything else 502 upstream_unavailable. Logged by type (a parser's
        message may quote the upstream's bytes); only this module's own phrases are logged whole."""
        timed_out = isinstance(exc, TimeoutError) or (conn is not None and conn.timed_out)
        code: errors.ErrorCode = "upstream_timeout" if timed_out else "upstream_unavailable"
        why = str(exc) if type(exc) in (UpstreamError, _Closed) else type(exc).__name__
        if phase == "body":
            log.warning("upstream failed mid-response: %s", why, extra={"route": route.name, "request_id": request_id})
        elif timed_out:
            log.warning("upstream timeout", extra={"route": route.name, "request_id": request_id})
        else:
            log.warning("upstream unavailable: %s", why, extra={"route": route.name, "request_id": request_id})
        return errors.Denial(code)


async def _unless_answered(
    loop: asyncio.AbstractEventLoop, step: Awaitable[T], answered: asyncio.Future[Any]
) -> tuple[T] | None:
    """`step`'s result (as a 1-tuple), or None when the upstream's answer (or failure) came first;
    `step` is then cancelled, and has ended when this returns."""
    task = asyncio.ensure_future(step, loop=loop)
    try:
        await asyncio.wait((task, answered), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))
    if task.cancelled():
        return None
    return (task.result(),)


def _client_body_failure(exc: BaseException) -> errors.Denial:
    """The answer to a client body that cannot be forwarded whole: too large (413), stalled (408),
    broken framing (400); a client that left raises ClientGone (recorded as 499)."""
    if isinstance(exc, BodyTooLarge):
        return errors.Denial("body_too_large")
    if isinstance(exc, BodyTimeout):
        return errors.Denial("request_timeout")
    if isinstance(exc, (_BadClientBody, HttpProcessingError)):
        return errors.Denial("invalid_request")
    raise ClientGone("the client left mid-upload") from exc


def _buffered(content: StreamReader) -> bytes | None:
    """What the client's body holds now (b"" at its end), or None when a read would wait.
    Raises what the listener put on the body (BodyTooLarge, BodyTimeout, the client's close)."""
    data = content.read_nowait(-1)
    if data or content.is_eof():
        return data
    return None


async def _send_body(
    loop: asyncio.AbstractEventLoop,
    conn: _Connection,
    request: Downstream,
    chunked: bool,
    answered: asyncio.Future[Any] | None,
    sent: int = 0,
) -> int | None:
    """Stream the client's body to the upstream as it arrives (re-framed as chunked when it had no
    length). None when all of it went out, the chunked terminator too; the bytes sent so far when
    the upstream answered first (`answered` done: the caller sends the rest alongside the answer,
    calling again with `answered` None and `sent`). The upstream's failure or timeout is raised at
    once, even while the client's next byte is awaited."""
    content = request.content
    expected = request.body_length
    while True:
        if answered is not None and answered.done():
            answered.result()  # the upstream's failure, raised now
            return sent
        try:
            chunk = _buffered(content)
            if chunk is None:
                if answered is None:  # the answer is in: only our client's stall (BodyTimeout) bounds this
                    chunk = await content.readany()
                else:
                    conn.waiting_on_client = True
                    try:
                        got = await _unless_answered(loop, content.readany(), answered)
                    finally:
                        conn.waiting_on_client = False
                    if got is None:
                        continue
                    chunk = got[0]
        except (BodyTooLarge, BodyTimeout):
            raise
        except HttpProcessingError as exc:
            raise _BadClientBody from exc
        except (OSError, ValueError, RuntimeError) as exc:  # the client's connection broke mid-upload
            raise ClientGone("the client left mid-upload") from exc
        if not chunk:
            break
        sent += len(chunk)
        if expected is not None and sent > expected:  # the listener's parser never lets this through
            raise _BadClientBody
        transport = conn.transport
        if conn.closed or transport is None or transport.is_closing():
            if answered is not None and answered.done():
                continue  # its failure (or answer) is taken at the top
            raise _Closed("connection closed by the upstream while sending the body")
        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        if conn.writing_paused:
            try:
                if answered is None:  # an upstream that answered and stopped reading: bounded by its timeout
                    await asyncio.wait_for(drain(conn), conn.timeout)
                elif await _unless_answered(loop, drain(conn), answered) is None:
                    continue
            except OSError:  # the connection was lost while our bytes waited
                if answered is not None and answered.done():
                    continue
                raise _Closed("connection closed by the upstream while sending the body") from None
        conn.progress()  # the response timeout counts from the last sign of life either way
    if expected is not None and sent != expected:
        raise ClientGone("the client's body ended short of its length")
    if chunked:
        transport = conn.transport
        if conn.closed or transport is None or transport.is_closing():
            if answered is not None and answered.done():
                answered.result()
                return sent
            raise _Closed("connection closed by the upstream while sending the body")
        transport.write(b"0\r\n\r\n")
    return None
