"""When bytes reached a socket, as the kernel stamped them (SO_TIMESTAMPNS), not when a thread got
round to reading them.

A test that asks "did the upstream receive this request after the admin API answered?" compares two
moments. Stamped with `time.monotonic()` in the threads that read them, each moment lags its bytes
by however long that thread waited for a CPU and the GIL: with several test processes on two CPUs,
0.1-0.6 ms, enough to put a request the gateway wrote before the answer after it. The kernel stamps
each segment as it is queued on the receiving socket (on loopback, within the sender's write), so
both moments become independent of how busy the machine is. Both are CLOCK_REALTIME.

Linux only (SO_TIMESTAMPNS on TCP sockets, since 2.6.22).
"""

from __future__ import annotations

import http.client
import io
import socket
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # = SCM_TIMESTAMPNS
_TIMESPEC = struct.Struct("@ll")  # struct timespec: seconds, nanoseconds
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


class StampingReader(io.RawIOBase):
    """A socket's bytes, read with recvmsg; `stamp` is the kernel's receive time of the bytes the
    last read returned (of the newest segment among them). Wrap it in io.BufferedReader. Segments
    that arrived before SO_TIMESTAMPNS was set carry no stamp: set it on the listening socket (an
    accepted socket inherits it) or right after connect."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock = sock
        self.stamp: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        nbytes, ancillary, _flags, _address = self._sock.recvmsg_into([buffer], _ANCILLARY)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
                seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                self.stamp = seconds + nanoseconds / 1e9
        return nbytes


def stamped_rfile(sock: socket.socket) -> tuple[io.BufferedReader, StampingReader]:
    """A buffered reader over `sock` for a request handler's `rfile`, and its stamping raw reader.
    Valid for request/response traffic (no pipelining): each request's head then arrives in a read
    of its own, so `stamp` after reading a head is that head's arrival."""
    raw = StampingReader(sock)
    return io.BufferedReader(raw), raw


class _StampedResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the makefile() reader the base class opened; ours reads instead
        self.fp, self.reader = stamped_rfile(sock)


class _StampedConnection(http.client.HTTPConnection):
    response_class = _StampedResponse

    def connect(self) -> None:
        super().connect()  # stamped from the first segment on, before the request is even sent
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


@dataclass(frozen=True)
class Stamped:
    status: int
    body: bytes
    headers: dict[str, str]
    stamp: float  # the kernel's receive time of the answer's last bytes, CLOCK_REALTIME


def stamped_call(method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float = 30.0) -> Stamped:
    """One request on a fresh connection, and when its answer arrived."""
    parts = urlsplit(url)
    conn = _StampedConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        assert isinstance(response, _StampedResponse)
        stamp = response.reader.stamp
        assert stamp is not None, "the kernel stamped no segment of the answer (SO_TIMESTAMPNS unsupported?)"
        return Stamped(response.status, data, dict(response.getheaders()), stamp)
    finally:
        conn.close()


def stamped_request(
    method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float = 30.0
) -> tuple[int, bytes, float]:
    """One request on a fresh connection: (status, body, the kernel's receive time of the answer's
    last bytes, CLOCK_REALTIME)."""
    answer = stamped_call(method, url, headers, body, timeout)
    return answer.status, answer.body, answer.stamp
