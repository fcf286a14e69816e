"""A recording upstream, and a raw client, for the framing tests (issue 10, spec 6).

`RecordingUpstream` is a plain asyncio HTTP/1.1 server on loopback that keeps,
per connection, every byte it read, and splits those bytes into requests by its
own strict reading of the framing (one plain-decimal Content-Length, or
`Transfer-Encoding: chunked` alone, CRLF line endings, no obs-fold, no CR/LF/NUL
in a value). What it records is what an upstream would believe it was sent: a
request the gateway framed wrongly shows up here as a request that should not
exist, or as one whose body holds the next client's bytes.

Modes:
- `normal`: reads the whole body, then answers.
- `early`: answers right after the head, before reading the body, keeps the
  connection open and then goes on reading the body and the next requests
  (as Node.js does). This is the upstream of the reported smuggling: a request
  forwarded with a length but without its body makes it read the next request
  written on the same connection as that body.
- scripted: `scripts[path]` is the exact bytes to answer a request for `path`
  with (a bad response for the response-side cases); the connection then stays
  open and reading, so only the gateway can decide not to use it again.

Every answer it makes itself carries `X-Upstream: recorder`, the connection id
(`X-Recorder-Conn`) and the request's `X-Test-Id`, so a client can tell an
upstream answer from one the gateway made, and on which connection it went.

The client side: `Client` (a raw socket that keeps every byte the gateway sent),
`read_answer` (one answer, strictly parsed), and `start_gateway` (a replica with
routes to a recorder, as tests/conftest.py builds one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

from tests.conftest import AdminTokens, Gateway, make_config, serve_replica, start_replica
from tests.loopback import LoopbackServer

WAIT = 8.0  # the most one step may take before a test calls it a hang
DONE_QUIET = 0.03  # once the gateway has nothing in flight: loop turns enough to read what it wrote
TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/(1\.[01])\r\n")
DECIMAL = re.compile(r"0|[1-9][0-9]*")
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n\x00]*)?\r\n")
MAX_SAFE = 2**53
TEST_ID = "X-Test-Id"


class Violation(Exception):
    """What the gateway wrote breaks HTTP/1.1 framing as a strict upstream reads it."""


@dataclass
class Recorded:
    """One request as the upstream read it."""

    conn: int
    seq: int  # its place on its connection, from 0
    wire: bytearray = field(default_factory=bytearray)  # every byte read for it: head and framed body
    method: str = ""
    target: str = ""
    version: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    head_done: bool = False
    framing: str = ""  # "none", "length" or "chunked"
    body: bytearray = field(default_factory=bytearray)  # the body, without its framing
    complete: bool = False
    error: str | None = None

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    @property
    def test_id(self) -> str | None:
        ids = self.values(TEST_ID)
        return ids[0] if len(ids) == 1 else None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def describe(self) -> str:
        state = "complete" if self.complete else f"INCOMPLETE ({self.error or 'cut short'})"
        return (
            f"conn {self.conn} #{self.seq} {self.method} {self.target} id={self.test_id} {self.framing} "
            f"body={len(self.body)}B {state}: {bytes(self.wire[:300])!r}"
        )


@dataclass
class UpstreamConnection:
    id: int
    raw: bytearray = field(default_factory=bytearray)  # every byte read on it, in order
    requests: list[Recorded] = field(default_factory=list)
    eof: bool = False  # the gateway closed it (or reset it)
    closed: bool = False  # it is closed, by either side
    busy: bool = False  # inside a request (its head started and its body not read whole)


class _Reads:
    """The connection's reader; every byte it returns is kept on the connection and the current request."""

    def __init__(self, reader: asyncio.StreamReader, conn: UpstreamConnection, owner: RecordingUpstream) -> None:
        self.reader = reader
        self.conn = conn
        self.owner = owner
        self.current: Recorded | None = None

    def _keep(self, data: bytes) -> bytes:
        if data:
            self.conn.raw += data
            self.owner.last_read = time.monotonic()
            if self.current is not None:
                self.current.wire += data
        return data

    async def line(self) -> bytes:
        try:
            data = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            data = exc.partial
        except asyncio.LimitOverrunError as exc:
            raise Violation(f"a line longer than the recorder's limit ({exc.consumed} bytes)") from exc
        return self._keep(data)

    async def some(self, n: int) -> bytes:
        return self._keep(await self.reader.read(n))

    async def exactly(self, n: int) -> bytes:
        try:
            return self._keep(await self.reader.readexactly(n))
        except asyncio.IncompleteReadError as exc:
            self._keep(exc.partial)
            raise


class RecordingUpstream(LoopbackServer):
    """The raw upstream; `url` to route to it, `requests` for what it read, `reset()` between cases."""

    close_timeout = 2.0
    close_errors = (Exception,)
    stream_limit = 1024 * 1024

    def __init__(self, mode: str = "normal") -> None:
        super().__init__()
        assert mode in ("normal", "early"), mode
        self.mode = mode
        self.scripts: dict[str, bytes] = {}  # path -> the exact bytes of a (bad) response for it
        self.connections: list[UpstreamConnection] = []
        self.errors: list[str] = []
        self.last_read = time.monotonic()
        self._writers: set[asyncio.StreamWriter] = set()
        self._next_id = 1

    def _closing(self) -> None:
        for writer in list(self._writers):
            writer.close()

    def reset(self) -> None:
        """Forget what was recorded (connections stay open: their later requests are recorded again)."""
        for conn in self.connections:
            conn.requests.clear()
            conn.raw.clear()
        self.connections = [c for c in self.connections if not c.closed]
        self.errors.clear()

    # what was read ----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        return [r for conn in self.connections for r in conn.requests]

    @property
    def raw(self) -> bytes:
        return b"".join(bytes(conn.raw) for conn in self.connections)

    def connection(self, conn_id: int) -> UpstreamConnection:
        (conn,) = [c for c in self.connections if c.id == conn_id]
        return conn

    async def settle(self, quiet: float = 0.15, most: float = 3.0, *, done: Callable[[], bool] | None = None) -> None:
        """Until nothing was read for `quiet` seconds and no open connection is inside a request
        (or `most` seconds passed: a request cut short stays on record as incomplete).

        `done` says the gateway (in this process, on this event loop) has nothing in flight, so
        every byte it will send here is written: then only the reads of those bytes are waited
        for, a few turns of the loop (DONE_QUIET), not a guess at how long the gateway may take."""
        deadline = time.monotonic() + most
        if done is not None:
            while time.monotonic() < deadline:
                if done():
                    quiet = min(quiet, DONE_QUIET)
                    break
                await asyncio.sleep(0.005)
        while time.monotonic() < deadline:
            busy = any(c.busy and not c.closed for c in self.connections)
            if not busy and time.monotonic() - self.last_read >= quiet:
                return
            await asyncio.sleep(0.005)

    async def wait_eof(self, conn_id: int, seconds: float = WAIT) -> None:
        deadline = time.monotonic() + seconds
        while not self.connection(conn_id).eof:
            assert time.monotonic() < deadline, f"the gateway did not close upstream connection {conn_id}"
            await asyncio.sleep(0.01)

    # serving ----------------------------------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = UpstreamConnection(self._next_id)
        self._next_id += 1
        self.connections.append(conn)
        reads = _Reads(reader, conn, self)
        try:
            while await self._one(reads, conn, writer):
                pass
        except (ConnectionError, OSError):
            conn.eof = True
        except asyncio.CancelledError:
            pass
        finally:
            conn.closed = True
            conn.busy = False
            self._writers.discard(writer)

    async def _one(self, reads: _Reads, conn: UpstreamConnection, writer: asyncio.StreamWriter) -> bool:
        """Reads and answers one request; False when the connection is done."""
        first = await reads.reader.read(1) if not reads.reader.at_eof() else b""
        if not first:
            conn.eof = True
            return False
        request = Recorded(conn.id, len(conn.requests))
        conn.requests.append(request)
        reads.current = request
        conn.busy = True
        reads._keep(first)
        try:
            rest = await reads.line()
            line = first + rest
            if not line.endswith(b"\n"):
                raise EOFError
            if not line.endswith(b"\r\n"):
                raise Violation("request line ends in a bare LF")
            m = REQUEST_LINE.fullmatch(line)
            if m is None:
                raise Violation(f"bad request line {line[:200]!r}")
            request.method, request.target, request.version = (g.decode("latin-1") for g in m.groups())
            await self._head(reads, request)
            length, chunked = self._framing(request)
            early = self.mode == "early" and request.path not in self.scripts
            if early:
                self._answer(writer, request)
            if chunked:
                await self._chunked_body(reads, request)
            elif length:
                await self._length_body(reads, request, length)
            request.complete = True
            conn.busy = False
            reads.current = None
            if not early:
                self._answer(writer, request)
            await writer.drain()
            return True
        except (EOFError, asyncio.IncompleteReadError):
            conn.eof = True
            request.error = request.error or "the connection ended inside the request"
            return False
        except Violation as exc:
            request.error = str(exc)
            self.errors.append(f"conn {conn.id} #{request.seq}: {exc}")
            with contextlib.suppress(Exception):
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return False

    async def _head(self, reads: _Reads, request: Recorded) -> None:
        while True:
            line = await reads.line()
            if not line.endswith(b"\n"):
                raise EOFError
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                raise Violation(f"a header line not ended by exactly CRLF: {line[:200]!r}")
            if line == b"\r\n":
                request.head_done = True
                return
            if line[:1] in (b" ", b"\t"):
                raise Violation(f"obs-fold line {line[:200]!r}")
            name, colon, value = line[:-2].partition(b":")
            if not colon or TOKEN.fullmatch(name) is None:
                raise Violation(f"bad header line {line[:200]!r}")
            value = value.strip(b" \t")
            if any(c in value for c in (0, 13, 10)):
                raise Violation(f"NUL, CR or LF in the value of {name!r}")
            request.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    @staticmethod
    def _framing(request: Recorded) -> tuple[int, bool]:
        lengths = request.values("Content-Length")
        codings = request.values("Transfer-Encoding")
        if codings:
            if lengths:
                raise Violation("Content-Length and Transfer-Encoding together")
            if codings != ["chunked"]:
                raise Violation(f"Transfer-Encoding other than one plain chunked: {codings!r}")
            request.framing = "chunked"
            return 0, True
        if lengths:
            if len(lengths) != 1 or DECIMAL.fullmatch(lengths[0]) is None:
                raise Violation(f"Content-Length not one plain decimal: {lengths!r}")
            request.framing = "length"
            return int(lengths[0]), False
        request.framing = "none"
        return 0, False

    @staticmethod
    async def _length_body(reads: _Reads, request: Recorded, length: int) -> None:
        left = length
        while left:
            data = await reads.some(min(left, 65536))
            if not data:
                raise EOFError
            request.body += data
            left -= len(data)

    @staticmethod
    async def _chunked_body(reads: _Reads, request: Recorded) -> None:
        while True:
            line = await reads.line()
            if not line.endswith(b"\n"):
                raise EOFError
            m = CHUNK_LINE.fullmatch(line)
            if m is None:
                raise Violation(f"bad chunk-size line {line[:100]!r}")
            size = int(m.group(1), 16)
            if size > MAX_SAFE:
                raise Violation(f"chunk size {size} above 2^53")
            if size == 0:
                break
            data = await reads.exactly(size + 2)
            if not data.endswith(b"\r\n"):
                raise Violation("chunk data not followed by CRLF")
            request.body += data[:-2]
        while True:  # trailers
            line = await reads.line()
            if not line.endswith(b"\n"):
                raise EOFError
            if not line.endswith(b"\r\n"):
                raise Violation("a trailer line ends in a bare LF")
            if line == b"\r\n":
                return

    def _answer(self, writer: asyncio.StreamWriter, request: Recorded) -> None:
        script = self.scripts.get(request.path)
        if script is not None:
            writer.write(script)
            return
        payload = json.dumps(
            {"conn": request.conn, "seq": request.seq, "id": request.test_id, "method": request.method}
        ).encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Upstream: recorder\r\n"
            f"X-Recorder-Conn: {request.conn}\r\nX-Recorder-Seq: {request.seq}\r\n"
            f"{TEST_ID}: {request.test_id}\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + (payload if request.method != "HEAD" else b""))


# --- what a test expects the upstream to have read ----------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """A request the upstream must have read exactly once: by its X-Test-Id."""

    test_id: str
    method: str
    path: str
    body: bytes = b""
    # The client's own end-to-end header lines, when the test checks them: the upstream must read
    # exactly these (in order) besides the ones the gateway sets (GATEWAY_SET).
    headers: tuple[tuple[str, str], ...] | None = None


# Headers the gateway writes itself (framing, Host, identity and forwarding headers).
GATEWAY_SET = frozenset(
    {"host", "content-length", "transfer-encoding", "x-request-id", "x-forwarded-for", "x-forwarded-proto",
     "x-forwarded-host", "x-gateway-key-id", "x-gateway-key-owner"}
)  # fmt: skip


def gateway_idle(gw: Gateway) -> Callable[[], bool]:
    """Whether the in-process gateway has nothing in flight: every client connection's handler has
    returned (a handler returns only once its upstream exchange, the rest of an early-answered
    upload included, is over) and nothing parsed waits to be handled."""
    server = gw.proxy.server
    return lambda: all(conn.idle for conn in server.connections)


def upstream_saw_exactly(
    recorder: RecordingUpstream, expected: Iterable[Sent], *, secrets: Iterable[str] = (), allow_cut: Iterable[str] = ()
) -> None:
    """The upstream read exactly the `expected` requests, each once, whole, with exactly its body,
    framed by the gateway (one Content-Length equal to the body's length, or chunked alone), with no
    client Authorization; no byte it read holds any of `secrets`. `allow_cut`: ids of uploads the
    gateway may have started and then aborted (read by the upstream as incomplete, never as whole)."""
    expected = list(expected)
    allowed_cut = set(allow_cut)
    everything = "\n  ".join(r.describe() for r in recorder.requests) or "(nothing)"
    assert not recorder.errors, f"the gateway wrote broken framing to the upstream: {recorder.errors}\n  {everything}"
    for secret in secrets:
        assert secret.encode() not in recorder.raw, f"the upstream read {secret!r}:\n  {everything}"
    incomplete = [r for r in recorder.requests if not r.complete]
    assert all(r.test_id in allowed_cut and r.head_done for r in incomplete), (
        f"the upstream holds a request it has not read whole (it would read what comes next as its rest):"
        f"\n  {everything}"
    )
    seen = Counter(r.test_id for r in recorder.requests if r.complete)
    wanted = Counter(s.test_id for s in expected)
    assert seen == wanted, f"upstream read {dict(seen)}, expected {dict(wanted)}:\n  {everything}"
    by_id = {r.test_id: r for r in recorder.requests if r.complete}
    for sent in expected:
        got = by_id[sent.test_id]
        assert (got.method, got.path) == (sent.method, sent.path), got.describe()
        assert bytes(got.body) == sent.body, f"{sent.test_id}: body {bytes(got.body)[:200]!r} != {sent.body[:200]!r}"
        lengths, codings = got.values("Content-Length"), got.values("Transfer-Encoding")
        if got.framing == "length":
            assert lengths == [str(len(sent.body))] and not codings, got.describe()
        elif got.framing == "none":
            assert not sent.body, got.describe()
        else:
            assert codings == ["chunked"] and not lengths, got.describe()
        assert not got.values("Authorization"), f"the client's Authorization reached the upstream: {got.describe()}"
        if sent.headers is not None:
            own = tuple((n, v) for n, v in got.headers if n.lower() not in GATEWAY_SET)
            assert own == sent.headers, f"{sent.test_id}: headers {own} != the client's {sent.headers}"


# --- the client side ----------------------------------------------------------------------------------------


def raw_request(method: str, target: str, headers: Iterable[str | bytes] = (), body: bytes = b"") -> bytes:
    """A request's bytes: the request line, `Host`, the given header lines as they are (no framing is
    added: the test writes Content-Length or Transfer-Encoding itself), the blank line, then `body`."""
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: gw"]
    lines += [h if isinstance(h, bytes) else h.encode("latin-1") for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(body: bytes, sizes: Iterable[int] = (), ext: bool = False) -> bytes:
    """`body` in chunked framing, cut at `sizes` (the rest in one chunk), then the last chunk."""
    out, at = bytearray(), 0
    for size in [*sizes, len(body)]:
        part = body[at : at + size]
        if part:
            out += b"%x%s\r\n%s\r\n" % (len(part), b";x=y" if ext else b"", part)
        at += len(part)
    return bytes(out) + b"0\r\n\r\n"


@dataclass
class Answer:
    status: int
    reason: str
    raw_headers: list[tuple[str, str]]
    body: bytes

    @property
    def headers(self) -> CIMultiDict[str]:
        return CIMultiDict(self.raw_headers)

    @property
    def code(self) -> str:
        assert self.headers.get("Content-Type", "").startswith("application/json"), (self.status, self.body[:300])
        code: str = json.loads(self.body)["error"]["code"]
        return code

    @property
    def from_upstream(self) -> bool:
        return self.status == 200 and self.headers.get("X-Upstream") == "recorder"

    @property
    def upstream_conn(self) -> int:
        assert self.from_upstream, (self.status, self.raw_headers, self.body[:300])
        return int(self.headers["X-Recorder-Conn"])

    @property
    def closes(self) -> bool:
        return "close" in [v.lower() for v in self.headers.getall("Connection", [])]


class _KeepWhatCame(asyncio.StreamReaderProtocol):
    """A connection that ends in an error (our write after the gateway closed: EPIPE) still lets the
    reader have every byte that came before it: a plain StreamReader would raise at once instead."""

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(None)


class Client:
    """A raw client connection to the gateway; `received` holds every byte the gateway sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = bytearray()

    @classmethod
    async def open(cls, port: int) -> Client:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20, loop=loop)
        transport, protocol = await loop.create_connection(lambda: _KeepWhatCame(reader, loop=loop), "127.0.0.1", port)
        return cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def _line(self) -> bytes:
        line = await self.reader.readline()
        self.received += line
        return line

    async def _exactly(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        self.received += data
        return data

    async def answer(self, *, head: bool = False, seconds: float = WAIT) -> Answer:
        """One answer, strictly framed (a 1xx has no body)."""
        async with asyncio.timeout(seconds):
            status_line = await self._line()
            assert status_line, "the gateway closed the connection instead of answering"
            assert status_line.endswith(b"\r\n"), status_line
            version, status, reason = status_line[:-2].decode("latin-1").split(" ", 2)
            assert version == "HTTP/1.1", status_line
            raw: list[tuple[str, str]] = []
            while (line := await self._line()) != b"\r\n":
                assert line.endswith(b"\r\n"), f"an answer's head was cut or has a bare LF: {line!r}"
                name, sep, value = line[:-2].decode("latin-1").partition(":")
                assert sep, line
                raw.append((name, value.strip()))
            headers = CIMultiDict(raw)
            code = int(status)
            if head or code < 200 or code in (204, 304):
                return Answer(code, reason, raw, b"")
            lengths, codings = headers.getall("Content-Length", []), headers.getall("Transfer-Encoding", [])
            assert not (lengths and codings), raw
            if codings:
                assert codings == ["chunked"], raw
                body = bytearray()
                while True:
                    size_line = await self._line()
                    m = CHUNK_LINE.fullmatch(size_line)
                    assert m is not None, f"a chunked answer was cut or broken: {size_line!r}"
                    size = int(m.group(1), 16)
                    if size == 0:
                        while (trailer := await self._line()) != b"\r\n":
                            assert trailer, "the connection closed inside the trailers"
                        return Answer(code, reason, raw, bytes(body))
                    data = await self._exactly(size + 2)
                    assert data.endswith(b"\r\n")
                    body += data[:-2]
            if lengths:
                assert len(lengths) == 1 and DECIMAL.fullmatch(lengths[0]), raw
                return Answer(code, reason, raw, await self._exactly(int(lengths[0])))
            data = await self.reader.read()
            self.received += data
            return Answer(code, reason, raw, data)

    async def closed_by_gateway(self, seconds: float = WAIT) -> bytes:
        """Waits for the gateway to close the connection; what it sent before (b"" when nothing)."""
        async with asyncio.timeout(seconds):
            try:
                data = await self.reader.read()
            except ConnectionError:  # reset, or our own write after its close failed
                data = b""
        self.received += data
        return data


# --- a gateway with routes to a recorder ---------------------------------------------------------------------

SMALL_LIMIT = 1000  # the `small` route's max_body_bytes
ROUTE_TIMEOUT = 3.0


def routes_to(url: str) -> list[dict[str, Any]]:
    common = {"upstream": url, "timeout_seconds": ROUTE_TIMEOUT}
    return [
        {"name": "public", "path_prefix": "/public", "auth": "none", **common},
        {"name": "api", "path_prefix": "/api", **common},
        {"name": "small", "path_prefix": "/small", "auth": "none", "max_body_bytes": SMALL_LIMIT, **common},
    ]


async def start_gateway(
    stack: contextlib.AsyncExitStack, redis_url: str, tokens: AdminTokens, recorder: RecordingUpstream
) -> Gateway:
    """A replica (proxy and admin listeners) whose routes all go to `recorder`: `/public` (auth: none),
    `/api` (a key required; Authorization not forwarded), `/small` (auth: none, max_body_bytes 1000)."""
    cfg = make_config(
        redis_url=redis_url,
        upstream_url=recorder.url,
        tokens=tokens.entries,
        overrides={"routes": routes_to(recorder.url)},
    )
    replica = await start_replica(cfg, stack)
    return await serve_replica(replica, stack, tokens)
