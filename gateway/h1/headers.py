"""Which headers cross the gateway, in each direction (spec 6), pure.

Order matters: hop-by-hop headers (and every header the client named in
`Connection`) go first, then the client's Authorization and X-Gateway-*
headers, and only then does the gateway set its own identity headers, so a
client cannot use `Connection: X-Gateway-Key-Id` to strip them.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
from collections.abc import Iterable
from typing import Final

from gateway.config import MAX_SAFE_LENGTH

# RFC 9110 7.6.1, plus the de-facto ones proxies drop.
HOP_BY_HOP: Final = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
# Set by the gateway, never copied from the client (and Content-Length: see upstream_request_head).
_REQUEST_DROP: Final = HOP_BY_HOP | {
    "host", "expect", "x-request-id", "x-forwarded-proto", "x-forwarded-host",
}  # fmt: skip
# Headers a client could use to pose as someone else (spec 6), believed only from trusted_proxies;
# and every incoming X-Forwarded-* with them.
POSING: Final = frozenset({"forwarded", "x-real-ip", "x-original-url", "x-rewrite-url"})
GATEWAY_HEADER_PREFIX: Final = "x-gateway-"
_DROP_BYTES: Final = frozenset(h.encode() for h in _REQUEST_DROP)
_POSING_BYTES: Final = frozenset(h.encode() for h in POSING)
_UNTRUSTED_DROP_BYTES: Final = _DROP_BYTES | _POSING_BYTES
_PREFIX_BYTES: Final = GATEWAY_HEADER_PREFIX.encode()
_FORWARDED_PREFIX: Final = b"x-forwarded-"

# Statuses whose responses never carry a body, whatever their framing lines say (RFC 9110 6.4.1).
NO_BODY_STATUS: Final = frozenset({204, 304})

RawHeaders = tuple[tuple[bytes, bytes], ...]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_peer(address: str | None, networks: Iterable[Network]) -> bool:
    """Whether an address (a peer's, or one hop of X-Forwarded-For) is in `trusted_proxies`:
    surrounding white space and an IPv6 zone are ignored, an IPv4-mapped IPv6 address counts as
    IPv4, and anything that is not an address is not trusted."""
    if address is None:
        return False
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.strip().split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


@functools.lru_cache(maxsize=2)
def _date_of(second: int) -> bytes:
    return email.utils.formatdate(second, usegmt=True).encode()


def http_date(now: float) -> bytes:
    """The Date header's value (RFC 9110 6.6.1), formatted once a second."""
    return _date_of(int(now))


def _connection_named(raw: RawHeaders) -> set[bytes]:
    """The header names a message's `Connection` lines list (hop-by-hop for this message too)."""
    return {t.strip().lower() for n, v in raw if n.lower() == b"connection" for t in v.split(b",")}


def upstream_request_headers(
    raw: RawHeaders,
    *,
    forward_authorization: bool,
    key_id: str | None,
    key_owner: str | None = None,
    request_id: str,
    peer: str | None,
    scheme: str,
    trusted: bool = False,
) -> list[tuple[bytes, bytes]]:
    """The client's raw header lines, filtered, then the gateway's own; bytes as they came.

    `trusted`: the peer is in trusted_proxies, so its Forwarded, X-Real-IP, X-Original-URL,
    X-Rewrite-URL and X-Forwarded-* lines pass (X-Forwarded-For gets the peer appended); from
    anyone else they are dropped and X-Forwarded-For is the peer alone."""
    drop = _DROP_BYTES if trusted else _UNTRUSTED_DROP_BYTES
    named = _connection_named(raw)
    if named:
        drop = drop | named
    out: list[tuple[bytes, bytes]] = []
    forwarded_for: list[bytes] = []
    host: bytes | None = None
    for name, value in raw:
        lower = name.lower()
        if lower in drop:
            if lower == b"host" and host is None:
                host = value
            continue
        # `X_Gateway_Key_Id` too: CGI/WSGI upstreams read '_' and '-' alike (and X_Forwarded_For).
        folded = lower.replace(b"_", b"-")
        if folded.startswith(_PREFIX_BYTES):
            continue
        if lower == b"authorization" and not forward_authorization:
            continue
        if folded.startswith(_FORWARDED_PREFIX) or folded in _POSING_BYTES:
            if not trusted:
                continue
            if lower == b"x-forwarded-for":
                forwarded_for.append(value)
                continue
        out.append((name, value))
    if key_id is not None:  # the gateway's identity headers: the key's id and owner, never the key
        out.append((b"X-Gateway-Key-Id", key_id.encode()))
        if key_owner is not None:
            out.append((b"X-Gateway-Key-Owner", key_owner.encode()))
    out.append((b"X-Request-Id", request_id.encode()))
    if peer:
        forwarded_for.append(peer.encode())
    if forwarded_for:
        out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    out.append((b"X-Forwarded-Proto", scheme.encode()))
    if host:
        out.append((b"X-Forwarded-Host", host))
    return out


def upstream_request_head(
    method: str,
    path: str,
    raw: RawHeaders,
    *,
    host: bytes,
    forward_authorization: bool,
    key_id: str | None,
    key_owner: str | None = None,
    request_id: str,
    peer: str | None,
    scheme: str,
    has_body: bool,
    body_length: int | None = None,
    trusted: bool = False,
) -> tuple[bytes, bool]:
    """The request line and headers for the upstream, and whether the body goes chunked.

    The framing is the gateway's own, never the client's lines: a body with a (validated)
    length goes with `Content-Length: body_length`, a body without one (the client sent it
    chunked) is re-framed as chunked, and a request without a body gets `Content-Length: 0`
    when the client declared that (a POST with an empty body), else no framing line.
    """
    headers = upstream_request_headers(
        raw,
        forward_authorization=forward_authorization,
        key_id=key_id,
        key_owner=key_owner,
        request_id=request_id,
        peer=peer,
        scheme=scheme,
        trusted=trusted,
    )
    # The path keeps the client's own bytes (aiohttp decoded them with surrogateescape).
    lines = [f"{method} {path} HTTP/1.1\r\nHost: ".encode("utf-8", "surrogateescape"), host]
    for name, value in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            continue  # the framing is the gateway's own (below), never the client's line
        lines += (b"\r\n", name, b": ", value)
    chunked = False
    if has_body and body_length is not None:
        lines.append(b"\r\nContent-Length: %d\r\n\r\n" % body_length)
    elif has_body:
        chunked = True
        lines.append(b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    elif any(len(n) == 14 and n.lower() == b"content-length" for n, _ in raw):
        lines.append(b"\r\nContent-Length: 0\r\n\r\n")
    else:
        lines.append(b"\r\n\r\n")
    return b"".join(lines), chunked


_HOP_BY_HOP_BYTES: Final = frozenset(h.encode() for h in HOP_BY_HOP)


# The response's framing lines: never copied, the gateway states the length itself.
_RESPONSE_DROP: Final = _HOP_BY_HOP_BYTES | {b"content-length", b"transfer-encoding"}
_FROM_HEADERS: Final = -1  # client_response_head's default: the length the headers state


def _stated_length(raw: RawHeaders) -> int | None:
    """The one Content-Length of `raw` as a plain decimal (spec 6), None when there is none;
    ValueError for a malformed, repeated or out-of-range one, or one beside Transfer-Encoding."""
    values = [v for n, v in raw if n.lower() == b"content-length"]
    if not values:
        return None
    value = values[0]
    if (
        len(values) > 1
        or any(n.lower() == b"transfer-encoding" for n, _ in raw)
        or not value.isdigit()  # bytes: ASCII digits only
        or (value.startswith(b"0") and value != b"0")
        or len(value) > 16
        or int(value) > MAX_SAFE_LENGTH
    ):
        raise ValueError("a Content-Length the gateway cannot honour exactly")
    return int(value)


def client_response_head(
    raw: RawHeaders, request_id: str, date: bytes, length: int | None = _FROM_HEADERS
) -> tuple[bytes, bool]:
    """The upstream's header lines for our client, minus hop-by-hop ones, as one block; and
    whether it carries a Content-Length. Adds X-Request-Id and Date when the upstream sent none.

    The upstream's framing lines (Content-Length, Transfer-Encoding) are never copied: `length`,
    the body's length as checked on the upstream's bytes, is written anew as the one
    Content-Length; None writes none (the listener frames the body, or there is none). By default
    it is the one plain-decimal Content-Length `raw` states (ValueError for any other)."""
    if length == _FROM_HEADERS:
        length = _stated_length(raw)
    drop = _RESPONSE_DROP
    named = _connection_named(raw)
    if named:
        drop = drop | named
    lines: list[bytes] = []
    has_request_id = has_date = False
    for name, value in raw:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"x-request-id":
            has_request_id = True
        elif lower == b"date":
            has_date = True
        lines += (name, b": ", value, b"\r\n")
    if length is not None:
        lines.append(b"Content-Length: %d\r\n" % length)
    if not has_request_id:
        lines += (b"X-Request-Id: ", request_id.encode(), b"\r\n")
    if not has_date:  # RFC 9110 6.6.1: a recipient with a clock adds the one the sender left out
        lines += (b"Date: ", date, b"\r\n")
    return b"".join(lines), length is not None
