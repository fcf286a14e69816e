"""The proxy's listener: a lean HTTP/1.1 server on asyncio protocols (issue 5, issue 10).

Requests are parsed by aiohttp's C parser (llhttp), as aiohttp's own server
does; what this module leaves out is everything a pass-through does not need
on its request path: the request and response objects, the router, the
middleware chain and the writer's per-header work. A complete answer goes to
the socket in one write; a streamed one is framed here (Content-Length,
chunked, or close-delimited for HTTP/1.0) with the transport's flow control.

The bytes a client sends are cut here at message boundaries before the parser
sees them: a head ends at its first empty line (llhttp takes CRLF only), a
body after exactly its Content-Length or at the end of its last chunk. So the
parser is fed one head at a time, which gives three things: requests that
came in one packet are each answered, in order, up to the first one the parser
refuses (the parser raises before returning what it parsed earlier in the same
feed); the head's bytes and fields are counted before the parser holds them
(`limits.max_header_bytes`, `limits.max_headers`: 431); and each head's framing
is checked on its raw lines (spec 6: one plain-decimal Content-Length within
2^53, or exactly `Transfer-Encoding: chunked` on HTTP/1.1, never both) before
a byte of its body is parsed. A refused head is answered in order (400, 431,
or 408 when it was not complete `limits.header_timeout_seconds` after its
first byte) with `Connection: close`, and nothing after it is read.

One task per client connection reads the parsed requests in order (so
pipelined requests are answered in order) and calls the handler for each. The
handler answers through `Request.reply`, or `start`/`write`/`end` to stream.
Keep-alive follows RFC 9112 9.3: HTTP/1.1 unless `Connection: close`,
HTTP/1.0 only with `Connection: keep-alive`. A request body the handler did
not read (a refused upload) is read and dropped for up to `LINGER_SECONDS`
before the connection can carry another request, so the client sees its answer
rather than a reset. A request body that stalls while something waits for it
(`limits.body_timeout_seconds`) or grows past the limit the handler set
(`Request.limit_body`) ends in `BodyTimeout` / `BodyTooLarge` for its reader,
and the connection is read no further. Nothing of refused bytes is echoed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from multidict import CIMultiDictProxy

from gateway import errors
from gateway.config import MAX_SAFE_LENGTH, LimitsConfig
from gateway.h1.compat import (
    EMPTY_PAYLOAD,
    BadHttpMessage,
    BaseProtocol,
    HttpProcessingError,
    HttpRequestParser,
    RawRequestMessage,
    StreamReader,
    buffer_paused,
    drain,
    pause_for_buffer,
    reader_waiting,
    reading_paused,
    resume_for_buffer,
)
from gateway.h1.downstream import BodyTimeout, BodyTooLarge
from gateway.h1.headers import NO_BODY_STATUS, Network, http_date, trusted_peer

log = logging.getLogger("gateway.http")

READ_LIMIT: Final = 2**16  # the request body's buffer before reading from the client pauses
LINGER_SECONDS: Final = 10.0  # how long an unread request body may take to arrive and be dropped
MAX_QUEUED: Final = 32  # pipelined requests parsed ahead of the one being handled, before reading pauses
MAX_FIELD: Final = 8190  # one header field's value: longer is refused 400, as nginx's and aiohttp's defaults do
MAX_REQUEST_LINE: Final = 8190  # aiohttp's (and nginx's large_client_header_buffers) default: longer is 400
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_DECIMAL: Final = re.compile(rb"0|[1-9][0-9]*")
_HEAD_END: Final = b"\r\n\r\n"

Handler = Callable[["Request"], Awaitable[None]]
# (request id, client address, code): a request the listener refused before any handler saw it
Refused = Callable[[str, "str | None", errors.ErrorCode], None]


class BodyBroken(ConnectionResetError):
    """The request body's framing broke mid-stream (a bad chunk): what was read of it cannot be trusted."""


class Refusal(Exception):
    """A request the listener answers itself, in order, before closing; `code` is spec 5's."""

    code: errors.ErrorCode = "invalid_request"


class FramingRefused(Refusal):
    """Content-Length / Transfer-Encoding the gateway cannot honour exactly (spec 6): 400."""


class HeadersTooLarge(Refusal):
    code = "headers_too_large"


class HeadTimeout(Refusal):
    code = "request_timeout"


def body_framing(message: RawRequestMessage) -> int | None:
    """The validated Content-Length of a request (None: chunked or none); FramingRefused when
    its raw framing lines are not exactly one plain decimal Content-Length within 2^53, or exactly
    one `Transfer-Encoding: chunked` on HTTP/1.1, or neither."""
    length: bytes | None = None
    coding: bytes | None = None
    for name, value in message.raw_headers:
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            if length is not None:
                raise FramingRefused("more than one Content-Length")
            length = value
        elif size == 17 and name.lower() == b"transfer-encoding":
            if coding is not None:
                raise FramingRefused("more than one Transfer-Encoding")
            coding = value
    if coding is not None:
        if length is not None:
            raise FramingRefused("Content-Length with Transfer-Encoding")
        if coding.lower() != b"chunked" or message.version < (1, 1):
            raise FramingRefused("a Transfer-Encoding other than chunked")
        return None
    if length is None:
        return None
    if _DECIMAL.fullmatch(length) is None or len(length) > 16 or int(length) > MAX_SAFE_LENGTH:
        raise FramingRefused("a Content-Length that is not a plain decimal within 2^53")
    return int(length)


def connection_line(keep_alive: bool, version: tuple[int, int]) -> bytes:
    """The `Connection` line of an answer (RFC 9112 9.3), pure: `close` when the connection ends
    after it, `keep-alive` for an HTTP/1.0 client that keeps it, nothing for HTTP/1.1's default."""
    if not keep_alive:
        return b"Connection: close\r\n"
    if version < (1, 1):
        return b"Connection: keep-alive\r\n"
    return b""


class Request:
    """One parsed request and the way to answer it (it implements gateway/h1/downstream.py's
    `Downstream`, the upstream client's view of it).

    The connection's keep-alive state is kept here, and only here: it starts as the request
    asked (RFC 9112 9.3), `close_after` and `abort` end it, and `_settle`, called as the head of
    the answer is written, ends it for what only the answer's moment knows (a shutdown, a refused
    upload, a broken body, a body framed by the close); `connection_line` renders it."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_finished",
        "_keep_alive",
        "body_exists",
        "body_length",
        "content",
        "continued",
        "expects_continue",
        "headers",
        "method",
        "raw_headers",
        "raw_path",
        "remote",
        "responded",
        "trusted",
        "version",
    )  # fmt: skip

    scheme: Final = "http"

    def __init__(
        self, conn: _ServerConnection, message: RawRequestMessage, payload: StreamReader, length: int | None = None
    ) -> None:
        self._conn = conn
        self.method: str = message.method
        self.raw_path: str = message.path  # the client's bytes, decoded with surrogateescape
        self.version = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_headers = message.raw_headers
        self.content = payload
        self.body_exists = payload is not EMPTY_PAYLOAD
        # The body's validated Content-Length; None for no body or a chunked one (set by the listener).
        self.body_length: int | None = length if self.body_exists else None
        self.remote = conn.remote
        self.trusted: bool = conn.trusted  # the peer is in trusted_proxies (decided once per connection)
        self._keep_alive = not (message.should_close or message.upgrade)
        self.expects_continue = (
            self.body_exists and message.version >= (1, 1) and self.headers.get("Expect", "").lower() == "100-continue"
        )
        self.continued = False
        self.responded = False  # the status line has gone (or the answer was given up)
        self._finished = False
        self._chunked = False

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    # the connection's state ----------------------------------------------------

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this answer."""
        return self._keep_alive

    def close_after(self) -> None:
        """The connection carries no other request after this answer (`Connection: close`)."""
        self._keep_alive = False

    def abort(self) -> None:
        """Cut the connection now: a streamed answer that cannot be finished honestly."""
        self._keep_alive = False
        transport = self._conn.transport
        if transport is not None:
            transport.close()

    def _settle(self) -> bytes:
        """The keep-alive state at the moment the answer's head is written, rendered."""
        if (
            self._conn.closing
            or (self.expects_continue and not self.continued)  # a refused upload never comes: close instead
            or (self.body_exists and self.content.exception() is not None)  # its body broke: nothing after it is read
        ):
            self._keep_alive = False
        return connection_line(self._keep_alive, self.version)

    def limit_body(self, max_bytes: int) -> None:
        """The body may be at most `max_bytes` (the route's max_body_bytes): past it, its reader
        gets BodyTooLarge and nothing more is read from this connection."""
        if self.body_exists:
            self._conn.limit_body(self.content, max_bytes)

    # answering ---------------------------------------------------------------

    def reply(self, status: int, reason: str, head: bytes, body: bytes, *, has_length: bool = False) -> None:
        """A complete answer in one write. `head` is header lines ending in CRLF, without framing;
        `has_length` says it carries the body's own Content-Length (a HEAD answer's, say)."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1", "replace")), head]
        if not has_length and self._takes_body(status) and self.method != "HEAD":
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(self._settle())
        lines.append(b"\r\n")
        if body and self.method != "HEAD" and status not in NO_BODY_STATUS:
            lines.append(body)
        self.responded = self._finished = True
        self._conn.send(b"".join(lines))

    async def start(self, status: int, reason: str, head: bytes, *, has_length: bool) -> None:
        """The status line and headers of a streamed answer; its body follows with `write` and `end`."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1", "replace")), head]
        if not has_length and self._takes_body(status) and self.method != "HEAD":
            if self.version >= (1, 1):
                self._chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:  # an HTTP/1.0 client: the body ends when the connection does
                self.close_after()
        lines.append(self._settle())
        lines.append(b"\r\n")
        self.responded = True
        await self._write(b"".join(lines))

    async def write(self, chunk: bytes) -> None:
        if self._chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        await self._write(chunk)

    async def end(self) -> None:
        if self._chunked:
            await self._write(b"0\r\n\r\n")
        self._finished = True

    async def send_continue(self) -> None:
        """100 Continue: the key passed, now the client may send its body."""
        if self.expects_continue and not self.continued:
            self.continued = True
            await self._write(_CONTINUE)

    # --------------------------------------------------------------------------

    @staticmethod
    def _takes_body(status: int) -> bool:
        return status >= 200 and status not in NO_BODY_STATUS

    async def _write(self, data: bytes) -> None:
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)
        if conn.writing_paused:
            await drain(conn)


class _ChunkedEnd:
    """Where a chunked body ends in the bytes that follow its head: only to cut the bytes at the
    message boundary before the parser sees them. llhttp does the parsing and refuses what is not
    valid; when the two disagree, the connection is refused rather than read on."""

    __slots__ = ("_left", "_line", "_state")
    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._left = 0
        self._line = b""

    def scan(self, data: bytes, pos: int) -> tuple[int, bool]:
        """The index where this body's bytes in `data` (from `pos`) end, and whether the body ends there."""
        end = len(data)
        while pos < end:
            state = self._state
            if state == self._DATA or state == self._DATA_END:
                take = min(self._left, end - pos)
                pos += take
                self._left -= take
                if not self._left:
                    if state == self._DATA:
                        self._state, self._left = self._DATA_END, 2
                    else:
                        self._state = self._SIZE
                continue
            newline = data.find(b"\n", pos)
            stop = end if newline < 0 else newline + 1
            if len(self._line) < 64:
                self._line += data[pos : min(stop, pos + 64)]
            pos = stop
            if newline < 0:
                break
            line, self._line = self._line, b""
            if state == self._TRAILER:
                if line == b"\r\n":
                    return pos, True
                continue
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return pos, True  # not a chunk size: the parser refuses it; nothing after it is read
            if size:
                self._state, self._left = self._DATA, size
            else:
                self._state = self._TRAILER
        return pos, False


class _ServerConnection(BaseProtocol):
    """One client connection: the bytes are cut at message boundaries and parsed into a queue,
    one task answers it in order."""

    __slots__ = ("_body", "_body_left", "_body_seen", "_chunks", "_current", "_head_bytes", "_head_lines",
                 "_head_started", "_head_tail", "_limit", "_limit_payload", "_pending", "_queue", "_server",
                 "_task", "_timer", "_waiter", "busy", "closing", "last_active", "lost", "remote",
                 "trusted")  # fmt: skip

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._server = server
        # (message, its body, its validated Content-Length), or (a refusal, EMPTY_PAYLOAD, None)
        self._queue: collections.deque[tuple[RawRequestMessage | BaseException, StreamReader, int | None]] = (
            collections.deque()
        )
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._current: StreamReader = EMPTY_PAYLOAD  # the body of the request being handled
        self._timer: asyncio.TimerHandle | None = None
        self._pending = b""  # bytes not yet cut, held while a body's reader is slow (the parser is paused)
        # the head being received: its bytes and lines so far, when its first byte came, its last 3 bytes
        self._head_bytes = 0
        self._head_lines = 0
        self._head_started: float | None = None
        self._head_tail = b""
        # the body being received: its payload, the bytes of it still to come (Content-Length) or
        # where its chunks end, and when a byte of it last came (or when nobody was waiting for one)
        self._body: StreamReader | None = None
        self._body_left: int | None = None
        self._chunks: _ChunkedEnd | None = None
        self._body_seen = 0.0
        self._limit_payload: StreamReader | None = None
        self._limit = 0
        self.remote: str | None = None
        self.trusted = False
        self.busy = False
        self.closing = False
        self.lost = False
        self.last_active = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # sets TCP_NODELAY
        server = self._server
        if len(server.connections) >= server.limits.max_connections:
            server.reject()
            self.closing = self.lost = True
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self.trusted = bool(server.trusted_proxies) and trusted_peer(self.remote, server.trusted_proxies)
        self._parser = self._new_parser()
        self.last_active = self._loop.time()
        server.connections.add(self)
        self._task = self._loop.create_task(self._serve())

    def _new_parser(self) -> HttpRequestParser:
        limits = self._server.limits
        return HttpRequestParser(
            self,
            self._loop,
            READ_LIMIT,
            max_line_size=MAX_REQUEST_LINE,
            max_headers=limits.max_headers,
            max_field_size=MAX_FIELD,  # one field: nginx's and aiohttp's 8 KiB; the whole head: max_header_bytes
            auto_decompress=False,
        )

    # reading -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # refused, stopped, or an upgrade we do not follow: nothing more is read
            return
        now = self._loop.time()
        if data:
            self.last_active = now
        if self._pending:
            data, self._pending = self._pending + data, b""
        elif not data:
            # resume_reading(): the parser goes on with the body bytes it held back when the body's
            # reader was slow (only body bytes: what followed them was kept uncut in _pending).
            self._feed(b"", body=True)
        pos, end = 0, len(data)
        while pos < end and self._parser is not None:
            if reading_paused(self):  # a body's reader is slow: the rest waits, uncut, until it resumes
                self._pending = data[pos:] if pos else data
                break
            if self._body is None:
                pos = self._cut_head(data, pos, now)
            else:
                pos = self._cut_body(data, pos, now)
        if len(self._queue) >= MAX_QUEUED and not buffer_paused(self):
            pause_for_buffer(self)
        waiter = self._waiter
        if waiter is not None and self._queue and not waiter.done():
            waiter.set_result(None)
        if self._timer is None and self._parser is not None:
            if self._head_started is not None:
                self._arm(self._head_started + self._server.limits.header_timeout_seconds)
            elif self._body is not None:
                self._arm(self._body_seen + self._server.limits.body_timeout_seconds)

    def _cut_head(self, data: bytes, pos: int, now: float) -> int:
        """Feeds the bytes of a head up to its end (or all of them, when it does not end in `data`)."""
        end = -1
        tail = self._head_tail
        if tail:  # the empty line may straddle two reads
            found = (tail + data[pos : pos + 3]).find(_HEAD_END)
            if found >= 0:
                end = pos + found + 4 - len(tail)
        if end < 0:
            found = data.find(_HEAD_END, pos)
            end = found + 4 if found >= 0 else len(data)
        limits = self._server.limits
        self._head_bytes += end - pos
        self._head_lines += data.count(b"\n", pos, end)
        # A head of N fields has N + 2 line ends; both bounds hold before the parser holds a byte more.
        if self._head_bytes > limits.max_header_bytes or self._head_lines > limits.max_headers + 2:
            self._stop(HeadersTooLarge())
            return len(data)
        if self._head_started is None:
            self._head_started = now
        self._head_tail = data[end - 3 : end] if end - pos >= 3 else (tail + data[pos:end])[-3:]
        self._feed(data[pos:end] if pos or end < len(data) else data, body=False)
        return end

    def _cut_body(self, data: bytes, pos: int, now: float) -> int:
        """Feeds the bytes of the body being received, up to its end."""
        if self._chunks is None:
            assert self._body_left is not None
            end = min(len(data), pos + self._body_left)
            self._body_left -= end - pos
            done = not self._body_left
        else:
            end, done = self._chunks.scan(data, pos)
        self._body_seen = now
        body = self._body
        self._feed(data[pos:end] if pos or end < len(data) else data, body=True)
        if body is not None and body is self._limit_payload and body.total_bytes > self._limit:
            self._too_large(body)
        if done and self._parser is not None:
            if self._chunks is not None:
                # aiohttp's C parser keeps a chunked body's trailer fields and hands them to the next
                # request as headers of its own (X-Injected: 1 from the trailer of the one before):
                # a fresh parser for what follows. Trailers are not forwarded (the body is re-framed).
                self._parser = self._new_parser()
            self._body = self._chunks = self._body_left = None
            self._head_started = None
        return end

    def _feed(self, piece: bytes, *, body: bool) -> None:
        parser = self._parser
        assert parser is not None
        try:
            messages, upgraded, _tail = parser.feed_data(piece)
        except Exception as exc:
            self._stop(exc)
            return
        if messages and body:  # the parser found a message where the cut saw body bytes: trust neither
            self._stop(FramingRefused("the body's end is ambiguous"))
            return
        for message, payload in messages:
            try:
                length = body_framing(message)
            except FramingRefused as exc:
                self._stop(exc)  # its body is never parsed, nor anything after it
                return
            self._queue.append((message, payload, length))
            self._head_bytes = self._head_lines = 0
            self._head_started = None
            self._head_tail = b""
            if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                self._body = payload
                self._body_left = length
                self._chunks = _ChunkedEnd() if length is None else None
                self._body_seen = self._loop.time()
        if upgraded:  # the request is answered as a plain one, then the connection closes
            self._stop(None)

    def _stop(self, refusal: BaseException | None) -> None:
        """Nothing more is parsed on this connection; `refusal` is answered after the requests before it."""
        self._parser = None
        self._pending = b""
        self._disarm()
        body = self._body
        self._body = self._chunks = self._body_left = None
        self._head_started = None
        if body is not None and not body.is_eof() and body.exception() is None:
            # It broke inside a body: the refusal is that request's, its reader gets it (a parser's
            # error is answered 400 by the forwarder) and its answer closes the connection.
            if isinstance(refusal, HttpProcessingError):
                body.set_exception(refusal)
            elif isinstance(refusal, FramingRefused):
                body.set_exception(BadHttpMessage("the request body's end is ambiguous"))
            else:
                body.set_exception(BodyBroken("the request body was cut short"))
            refusal = None
        if refusal is not None:
            self._queue.append((refusal, EMPTY_PAYLOAD, None))
        # else: the request whose body broke is answered after those before it, with `Connection: close`
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def limit_body(self, payload: StreamReader, max_bytes: int) -> None:
        if payload.total_bytes > max_bytes:
            self._too_large(payload)
        elif not payload.is_eof():
            self._limit_payload, self._limit = payload, max_bytes

    def _too_large(self, payload: StreamReader) -> None:
        self._limit_payload = None
        payload.set_exception(BodyTooLarge())
        if self._parser is not None:
            if payload is not self._body:
                self._body = None  # its body is complete: the BodyBroken of _stop is not for it
            self._stop(None)

    # deadlines: one timer per connection, armed only while a head or a body is incomplete -------

    def _arm(self, when: float) -> None:
        self._timer = self._loop.call_at(when, self._deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline(self) -> None:
        self._timer = None
        if self._parser is None:
            return
        now = self._loop.time()
        limits = self._server.limits
        if self._head_started is not None:
            if buffer_paused(self):  # we stopped reading (pipelined requests queued): not the client's delay
                self._head_started = now
            deadline = self._head_started + limits.header_timeout_seconds
            if now >= deadline:
                log.info("request head incomplete after %.1f s", limits.header_timeout_seconds)
                self._stop(HeadTimeout())
                return
            self._arm(deadline)
            return
        body = self._body
        if body is None or body.is_eof():
            return
        if reading_paused(self) or not reader_waiting(body):  # nobody is waiting for the client's bytes
            self._body_seen = now
        deadline = self._body_seen + limits.body_timeout_seconds
        if now >= deadline:
            body.set_exception(BodyTimeout())
            self._body = None
            self._stop(None)
            return
        self._arm(deadline)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True  # it stays in the server's set until its task ends: the drain waits for it
        self._disarm()
        parser, self._parser = self._parser, None
        self._pending = b""
        if parser is not None:
            with contextlib.suppress(Exception):
                parser.feed_eof()
        # The parser's feed_eof may raise (a truncated body) before telling the payload: every body
        # still expected, the one being read included, ends in an error its reader sees.
        for payload in [self._current, *(payload for _message, payload, _length in self._queue)]:
            if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                payload.set_exception(ConnectionResetError("the client closed the connection"))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        super().connection_lost(exc)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        self.closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def cancel(self) -> asyncio.Task[None] | None:
        task = self._task
        if task is None or task.done():
            return None
        task.cancel()
        return task

    @property
    def idle(self) -> bool:
        return not self.busy and not self._queue

    async def _serve(self) -> None:
        handler = self._server.handler
        try:
            while not self.lost:
                if not self._queue:
                    if self.closing:
                        break
                    self._waiter = self._loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                message, payload, length = self._queue.popleft()
                if buffer_paused(self) and not self._queue:
                    resume_for_buffer(self)
                if not isinstance(message, RawRequestMessage):
                    self._refuse(message)
                    break
                request = Request(self, message, payload, length)
                self._current = payload
                self.busy = True
                try:
                    await handler(request)
                except Exception as exc:  # the handler has its own guard; this is the last line
                    log.error("request handler failed: %s", type(exc).__name__)
                    request.close_after()
                finally:
                    self.busy = False
                    self.last_active = self._loop.time()
                if not (request._finished and request.keep_alive) or self.lost:
                    break
                if payload is not EMPTY_PAYLOAD and not payload.is_eof() and not await self._drop_body(payload):
                    break
        except asyncio.CancelledError:
            pass  # the shutdown's deadline: the handler recorded its own end
        finally:
            self.close()
            self._server.connections.discard(self)

    async def _drop_body(self, payload: StreamReader) -> bool:
        """Read and drop the rest of a body nobody read; True when the connection may go on."""
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                while await payload.readany():
                    pass
        except Exception:  # too slow (TimeoutError), the client left, a broken body: close instead
            return False
        return not self.closing

    def _refuse(self, exc: BaseException) -> None:
        # The parser's message may quote the bytes it refused (a header carrying a key):
        # log the type only, answer the spec 5 body without any of it.
        code: errors.ErrorCode = exc.code if isinstance(exc, Refusal) else "invalid_request"
        if not isinstance(exc, Refusal):
            log.info("request refused by the HTTP parser: %s", type(exc).__name__)
        elif not isinstance(exc, HeadTimeout):
            log.info("request refused: %s", type(exc).__name__)
        request_id = errors.new_request_id()
        status, reason, head, body = errors.wire(errors.Denial(code), request_id)
        if self._server.body_header is not None:
            head += self._server.body_header + b": " + body + b"\r\n"
        self.send(b"HTTP/1.1 %d %s\r\n%bDate: %b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                  % (status, reason.encode(), head, http_date(time.time()), len(body), body))  # fmt: skip
        self._server.on_refused(request_id, self.remote, code)


class Server:
    """The proxy listener: `start` to listen, `shutdown` to drain and close (SIGTERM)."""

    def __init__(
        self,
        handler: Handler,
        on_refused: Refused = lambda *_: None,
        *,
        limits: LimitsConfig | None = None,
        trusted_proxies: Iterable[Network] = (),
        body_header: bytes | None = None,
    ) -> None:
        self.handler = handler
        # A header that repeats the body of the listener's own refusals (the verify listener's
        # X-Gateway-Error-Body: nginx's auth_request passes on headers, never a body).
        self.body_header = body_header
        self.on_refused = on_refused
        self.limits = limits or LimitsConfig()
        self.trusted_proxies: tuple[Network, ...] = tuple(trusted_proxies)
        self.connections: set[_ServerConnection] = set()
        self.rejected = 0  # connections closed on accept: limits.max_connections were open
        self._rejected_logged = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> _ServerConnection:
        assert self.loop is not None
        return _ServerConnection(self, self.loop)

    @property
    def port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    def reject(self) -> None:
        """A connection over limits.max_connections, closed on accept: counted, logged at most once a second."""
        self.rejected += 1
        now = time.monotonic()
        if now - self._rejected_logged >= 1.0:
            self._rejected_logged = now
            log.warning(
                "connection limit reached: %d open, new ones closed on accept (%d so far)",
                self.limits.max_connections,
                self.rejected,
            )

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> None:
        self.loop = asyncio.get_running_loop()
        server = await self.loop.create_server(
            self, host, port, reuse_port=reuse_port or None, backlog=backlog, family=socket.AF_UNSPEC
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close client connections idle longer than the keep-alive timeout (one timer for all of them).
        A connection with part of a head is not idle to this: the head's own deadline governs it."""
        keepalive = self.limits.keepalive_seconds
        period = min(5.0, keepalive / 2)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            deadline = loop.time() - keepalive
            for conn in [c for c in self.connections if c.idle and c.last_active < deadline]:
                conn.close()

    async def shutdown(self, drain_seconds: float) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish for up to
        `drain_seconds` (their answers say `Connection: close`), then cut what is left."""
        if self.loop is None:  # never started
            return
        for server in self._servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.closing = True
            if conn.idle:
                conn.close()
        tasks = [conn.task for conn in self.connections if conn.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=drain_seconds)
        tasks = [task for conn in list(self.connections) if (task := conn.cancel()) is not None]
        if tasks:  # let the cancelled handlers record their end
            await asyncio.wait(tasks, timeout=1.0)
        for conn in list(self.connections):
            conn.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
