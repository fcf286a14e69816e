"""The seam between the upstream client and the client side: what forwarding needs of a request.

The upstream client (gateway/h1/client.py) reads the client's request and answers it only
through `Downstream`; it never sees the listener's classes (gateway/h1/server.py, whose
`Request` implements this protocol) nor its transport. A test can hand the client any object
with these members.

The failures a body stream may raise to its reader live here too, since both sides name them:
the listener puts them on the body, the client translates them (413, 408).
"""

from __future__ import annotations

from typing import Protocol

from gateway.h1.compat import StreamReader
from gateway.h1.headers import RawHeaders


class BodyTooLarge(Exception):
    """The request body grew past the route's max_body_bytes while it was read (413 body_too_large)."""


class BodyTimeout(Exception):
    """No byte of the request body arrived for limits.body_timeout_seconds (408 request_timeout)."""


class Downstream(Protocol):
    """One client request being forwarded, and the way to answer it.

    Reading: the request line and raw header lines as they came, the peer, the body stream
    (`content`; its reader gets BodyTooLarge, BodyTimeout, a parser error or a ConnectionError
    when the client's side fails). Answering: `reply` for a complete answer in one write, or
    `start`, `write`... and `end` to stream; `send_continue` for a client that asked for 100
    Continue; `close_after` when the connection must not carry another request after this
    answer; `abort` to cut the connection when a streamed answer cannot be finished honestly.
    The writers raise OSError (ConnectionError) when the client has gone.
    """

    @property
    def method(self) -> str: ...
    @property
    def version(self) -> tuple[int, int]: ...
    @property
    def raw_headers(self) -> RawHeaders: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def trusted(self) -> bool: ...  # the peer is in trusted_proxies
    @property
    def scheme(self) -> str: ...
    @property
    def content(self) -> StreamReader: ...
    @property
    def body_exists(self) -> bool: ...
    @property
    def body_length(self) -> int | None: ...  # the validated Content-Length; None: chunked or no body
    @property
    def keep_alive(self) -> bool: ...
    @property
    def responded(self) -> bool: ...  # the status line has gone (or the answer was given up)

    def reply(self, status: int, reason: str, head: bytes, body: bytes, *, has_length: bool = False) -> None: ...
    async def start(self, status: int, reason: str, head: bytes, *, has_length: bool) -> None: ...
    async def write(self, chunk: bytes) -> None: ...
    async def end(self) -> None: ...
    async def send_continue(self) -> None: ...
    def close_after(self) -> None: ...
    def abort(self) -> None: ...
