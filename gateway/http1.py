"""The proxy's listener: a lean HTTP/1.1 server on asyncio protocols (issue 5).

Requests are parsed by aiohttp's C parser (llhttp), as aiohttp's own server
does; what this module leaves out is everything a pass-through does not need
on its request path: the request and response objects, the router, the
middleware chain and the writer's per-header work. A complete answer goes to
the socket in one write; a streamed one is framed here (Content-Length,
chunked, or close-delimited for HTTP/1.0) with the transport's flow control.

One task per client connection reads the parsed requests in order (so
pipelined requests are answered in order) and calls the handler for each. The
handler answers through `Request.reply`, or `start`/`write`/`end` to stream.
Keep-alive follows RFC 9112 9.3: HTTP/1.1 unless `Connection: close`,
HTTP/1.0 only with `Connection: keep-alive`. A request body the handler did
not read (a refused upload) is read and dropped for up to `LINGER_SECONDS`
before the connection can carry another request, so the client sees its answer
rather than a reset. A request the parser refuses gets 400 `invalid_request`
and the connection is closed; nothing of the refused bytes is echoed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from multidict import CIMultiDictProxy

from . import errors
from .aiohttp_compat import (
    EMPTY_PAYLOAD,
    BaseProtocol,
    HttpRequestParser,
    RawRequestMessage,
    StreamReader,
    buffer_paused,
    drain,
    pause_for_buffer,
    resume_for_buffer,
)

log = logging.getLogger("gateway.http")

READ_LIMIT: Final = 2**16  # the request body's buffer before reading from the client pauses
KEEPALIVE_SECONDS: Final = 75.0  # an idle client connection is closed after this (aiohttp's and nginx's default)
LINGER_SECONDS: Final = 10.0  # how long an unread request body may take to arrive and be dropped
MAX_QUEUED: Final = 32  # pipelined requests parsed ahead of the one being handled, before reading pauses
_NO_BODY: Final = frozenset({204, 304})
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

Handler = Callable[["Request"], Awaitable[None]]
Refused = Callable[[str, "str | None"], None]  # (request id, client address): a request the parser refused


class BodyTooLarge(Exception):
    """The request body grew past the route's max_body_bytes while it was read (413 body_too_large)."""


class BodyTimeout(Exception):
    """No byte of the request body arrived for limits.body_timeout_seconds (408 request_timeout)."""


@functools.lru_cache(maxsize=2)
def _date_of(second: int) -> bytes:
    return email.utils.formatdate(second, usegmt=True).encode()


def http_date(now: float) -> bytes:
    """The Date header's value (RFC 9110 6.6.1), formatted once a second."""
    return _date_of(int(now))


class Request:
    """One parsed request and the way to answer it."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_finished",
        "body_exists",
        "body_length",
        "content",
        "continued",
        "expects_continue",
        "headers",
        "keep_alive",
        "method",
        "raw_headers",
        "raw_path",
        "remote",
        "responded",
        "version",
    )  # fmt: skip

    scheme: Final = "http"

    def __init__(self, conn: _ServerConnection, message: RawRequestMessage, payload: StreamReader) -> None:
        self._conn = conn
        self.method: str = message.method
        self.raw_path: str = message.path  # the client's bytes, decoded with surrogateescape
        self.version = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_headers = message.raw_headers
        self.content = payload
        self.body_exists = payload is not EMPTY_PAYLOAD
        # The body's validated Content-Length; None for no body or a chunked one (set by the listener).
        self.body_length: int | None = None
        self.remote = conn.remote
        self.keep_alive = not (message.should_close or message.upgrade)
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

    # answering ---------------------------------------------------------------

    def reply(self, status: int, reason: str, head: bytes, body: bytes, *, has_length: bool = False) -> None:
        """A complete answer in one write. `head` is header lines ending in CRLF, without framing;
        `has_length` says it carries the body's own Content-Length (a HEAD answer's, say)."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1", "replace")), head]
        if not has_length and self._takes_body(status) and self.method != "HEAD":
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(self._connection_line())
        lines.append(b"\r\n")
        if body and self.method != "HEAD" and status not in _NO_BODY:
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
                self.keep_alive = False
        lines.append(self._connection_line())
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
        return status >= 200 and status not in _NO_BODY

    def _connection_line(self) -> bytes:
        if self._conn.closing or (self.expects_continue and not self.continued):
            self.keep_alive = False  # a refused Expect: 100-continue upload never comes; close instead
        if not self.keep_alive:
            return b"Connection: close\r\n"
        if self.version < (1, 1):
            return b"Connection: keep-alive\r\n"
        return b""

    async def _write(self, data: bytes) -> None:
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)
        if conn.writing_paused:
            await drain(conn)


class _ServerConnection(BaseProtocol):
    """One client connection: the parser feeds a queue, one task answers it in order."""

    __slots__ = ("_current", "_queue", "_server", "_task", "_waiter", "busy", "closing", "last_active", "lost",
                 "remote")  # fmt: skip

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._server = server
        self._queue: collections.deque[tuple[Any, StreamReader]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._current: StreamReader = EMPTY_PAYLOAD  # the body of the request being handled
        self.remote: str | None = None
        self.busy = False
        self.closing = False
        self.lost = False
        self.last_active = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # sets TCP_NODELAY
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._parser = HttpRequestParser(self, self._loop, READ_LIMIT, auto_decompress=False)
        self.last_active = self._loop.time()
        self._server.connections.add(self)
        self._task = self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self.closing and not self.busy and not self._queue:
            return
        if data:
            self.last_active = self._loop.time()
        parser = self._parser
        if parser is None:  # refused, or an upgrade we do not follow: nothing more is read
            return
        try:
            messages, upgraded, _tail = parser.feed_data(data)
        except Exception as exc:
            self._parser = None
            self._queue.append((exc, EMPTY_PAYLOAD))
            messages, upgraded = [], False
        if messages:
            self._queue.extend(messages)
        if upgraded:
            self._parser = None  # the request is answered as a plain one, then the connection closes
        if len(self._queue) >= MAX_QUEUED:
            pause_for_buffer(self)
        waiter = self._waiter
        if waiter is not None and self._queue and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True  # it stays in the server's set until its task ends: the drain waits for it
        parser, self._parser = self._parser, None
        if parser is not None:
            with contextlib.suppress(Exception):
                parser.feed_eof()
        # The parser's feed_eof may raise (a truncated body) before telling the payload: every body
        # still expected, the one being read included, ends in an error its reader sees.
        for payload in [self._current, *(payload for _message, payload in self._queue)]:
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
                message, payload = self._queue.popleft()
                if buffer_paused(self) and not self._queue:
                    resume_for_buffer(self)
                if not isinstance(message, RawRequestMessage):
                    self._refuse(message)
                    break
                request = Request(self, message, payload)
                self._current = payload
                self.busy = True
                try:
                    await handler(request)
                except Exception as exc:  # the handler has its own guard; this is the last line
                    log.error("request handler failed: %s", type(exc).__name__)
                    request.keep_alive = False
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
        log.info("request refused by the HTTP parser: %s", type(exc).__name__)
        request_id = errors.new_request_id()
        status, reason, head, body = errors.wire(errors.Denial("invalid_request"), request_id)
        self.send(b"HTTP/1.1 %d %s\r\n%bDate: %b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                  % (status, reason.encode(), head, http_date(time.time()), len(body), body))  # fmt: skip
        self._server.on_refused(request_id, self.remote)


class Server:
    """The proxy listener: `start` to listen, `shutdown` to drain and close (SIGTERM)."""

    def __init__(
        self, handler: Handler, on_refused: Refused = lambda *_: None, *, keepalive_seconds: float = KEEPALIVE_SECONDS
    ) -> None:
        self.handler = handler
        self.on_refused = on_refused
        self.keepalive_seconds = keepalive_seconds
        self.connections: set[_ServerConnection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> _ServerConnection:
        assert self.loop is not None
        return _ServerConnection(self, self.loop)

    @property
    def port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> None:
        self.loop = asyncio.get_running_loop()
        server = await self.loop.create_server(
            self, host, port, reuse_port=reuse_port or None, backlog=backlog, family=socket.AF_UNSPEC
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close client connections idle longer than the keep-alive timeout (one timer for all of them)."""
        period = min(5.0, self.keepalive_seconds / 2)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            deadline = loop.time() - self.keepalive_seconds
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
