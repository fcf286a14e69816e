"""The one module that touches aiohttp's internals (issue 10).

The proxy listener (gateway/h1/server.py) and the upstream client
(gateway/h1/client.py) run on aiohttp's C HTTP parser (its llhttp binding), its
StreamReader and its BaseProtocol's flow control. aiohttp's maintainers call
these private: they may change in any release. Every such name the gateway
uses is imported or reached here, and nowhere else; the check below runs at
import time, so an aiohttp without them fails at start-up with one clear line
instead of on the first proxied request.

Supported: aiohttp `SUPPORTED`, >=3.14.4,<3.15. 3.14.4 is the first release
whose BaseProtocol has `_buffer_paused`, `_pause_reading_for_buffer` and
`_resume_reading_for_buffer` (3.14.3 lacks all three). The upper bound is the
next minor release, where aiohttp's internals change most; a later 3.14 patch
release is taken on trust (`make test` on a fresh clone installs the newest
one, and this check still guards its start-up). pyproject.toml declares the same
range (tests/test_compat.py checks that they agree and that the installed
aiohttp is inside it); `make test-lowest` runs the whole suite on 3.14.4 and the
lowest allowed version of every other dependency (constraints/lowest.txt). To
widen the range: run the suite on the new release, then move both bounds
together. docs/http-engine.md lists what is borrowed and why.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Final

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, HttpResponseParser, RawRequestMessage, RawResponseMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

SUPPORTED: Final = ">=3.14.4,<3.15"

__all__ = [
    "EMPTY_PAYLOAD",
    "SUPPORTED",
    "BadHttpMessage",
    "BaseProtocol",
    "HttpProcessingError",
    "HttpRequestParser",
    "HttpResponseParser",
    "LineTooLong",
    "RawRequestMessage",
    "RawResponseMessage",
    "StreamReader",
    "buffer_paused",
    "drain",
    "pause_for_buffer",
    "reader_waiting",
    "reading_paused",
    "resume_for_buffer",
]

# BaseProtocol members the gateway calls or reads; none is public API.
_PROTOCOL_MEMBERS: Final = (
    "_drain_helper",
    "_reading_paused",
    "_buffer_paused",
    "_pause_reading_for_buffer",
    "_resume_reading_for_buffer",
)


# StreamReader members the gateway reads; not public API either.
_READER_MEMBERS: Final = ("_waiter",)


class UnsupportedAiohttp(ImportError):
    """The installed aiohttp lacks a private member the HTTP engine relies on."""


def _check() -> None:
    missing = [name for name in _PROTOCOL_MEMBERS if not hasattr(BaseProtocol, name)]
    if missing:
        raise UnsupportedAiohttp(
            f"aiohttp {aiohttp.__version__} lacks BaseProtocol.{', .'.join(missing)}; "
            f"the gateway supports aiohttp {SUPPORTED}"
        )
    missing = [name for name in _READER_MEMBERS if not hasattr(StreamReader, name)]
    if missing:
        raise UnsupportedAiohttp(
            f"aiohttp {aiohttp.__version__} lacks StreamReader.{', .'.join(missing)}; "
            f"the gateway supports aiohttp {SUPPORTED}"
        )


_check()


def drain(protocol: BaseProtocol) -> Awaitable[None]:
    """Wait until the transport's write buffer is below its low-water mark."""
    return protocol._drain_helper()


def reading_paused(protocol: BaseProtocol) -> bool:
    """True while the protocol's transport is paused for a reader that is slow to take the data."""
    return protocol._reading_paused


def buffer_paused(protocol: BaseProtocol) -> bool:
    return protocol._buffer_paused


def pause_for_buffer(protocol: BaseProtocol) -> None:
    """Stop reading from the transport until `resume_for_buffer` (a queue the protocol owns is full)."""
    protocol._pause_reading_for_buffer()


def resume_for_buffer(protocol: BaseProtocol) -> None:
    protocol._resume_reading_for_buffer()


def reader_waiting(payload: StreamReader) -> bool:
    """True while a reader is waiting on the payload for bytes that have not come (its buffer is empty)."""
    return payload._waiter is not None
