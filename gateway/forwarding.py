"""Which headers cross the gateway, in each direction (spec 6), pure.

Order matters: hop-by-hop headers (and every header the client named in
`Connection`) go first, then the client's Authorization and X-Gateway-*
headers, and only then does the gateway set its own identity headers, so a
client cannot use `Connection: X-Gateway-Key-Id` to strip them.
"""

from __future__ import annotations

from typing import Final

from .keys import KeyRecord

# RFC 9110 7.6.1, plus the de-facto ones proxies drop.
HOP_BY_HOP: Final = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
# Set by the gateway, never copied from the client.
_REQUEST_DROP: Final = HOP_BY_HOP | {"host", "expect", "x-request-id", "x-forwarded-proto", "x-forwarded-host"}
GATEWAY_HEADER_PREFIX: Final = "x-gateway-"
_DROP_BYTES: Final = frozenset(h.encode() for h in _REQUEST_DROP)
_PREFIX_BYTES: Final = GATEWAY_HEADER_PREFIX.encode()

RawHeaders = tuple[tuple[bytes, bytes], ...]


def _connection_named(raw: RawHeaders) -> set[bytes]:
    """The header names a message's `Connection` lines list (hop-by-hop for this message too)."""
    return {t.strip().lower() for n, v in raw if n.lower() == b"connection" for t in v.split(b",")}


def upstream_request_headers(
    raw: RawHeaders,
    *,
    forward_authorization: bool,
    record: KeyRecord | None,
    request_id: str,
    peer: str | None,
    scheme: str,
) -> list[tuple[bytes, bytes]]:
    """The client's raw header lines, filtered, then the gateway's own; bytes as they came."""
    drop = _DROP_BYTES
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
        # `X_Gateway_Key_Id` too: CGI/WSGI upstreams read '_' and '-' alike.
        if lower.replace(b"_", b"-").startswith(_PREFIX_BYTES):
            continue
        if lower == b"authorization" and not forward_authorization:
            continue
        if lower == b"x-forwarded-for":
            forwarded_for.append(value)
            continue
        out.append((name, value))
    if record is not None:
        out.append((b"X-Gateway-Key-Id", record.id.encode()))
        if record.owner is not None:
            out.append((b"X-Gateway-Key-Owner", record.owner.encode()))
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
    record: KeyRecord | None,
    request_id: str,
    peer: str | None,
    scheme: str,
    has_body: bool,
) -> tuple[bytes, bool]:
    """The request line and headers for the upstream, and whether the body goes chunked.

    A body with a Content-Length keeps it; a body without one (the client sent it
    chunked) is re-framed as chunked, since Transfer-Encoding is hop-by-hop.
    """
    headers = upstream_request_headers(
        raw,
        forward_authorization=forward_authorization,
        record=record,
        request_id=request_id,
        peer=peer,
        scheme=scheme,
    )
    chunked = has_body and not any(n.lower() == b"content-length" for n, _ in headers)
    # The path keeps the client's own bytes (aiohttp decoded them with surrogateescape).
    lines = [f"{method} {path} HTTP/1.1\r\nHost: ".encode("utf-8", "surrogateescape"), host]
    for name, value in headers:
        lines += (b"\r\n", name, b": ", value)
    lines.append(b"\r\nTransfer-Encoding: chunked\r\n\r\n" if chunked else b"\r\n\r\n")
    return b"".join(lines), chunked


_HOP_BY_HOP_BYTES: Final = frozenset(h.encode() for h in HOP_BY_HOP)


def client_response_head(raw: RawHeaders, request_id: str, date: bytes) -> tuple[bytes, bool]:
    """The upstream's header lines for our client, minus hop-by-hop ones, as one block; and
    whether it carries a Content-Length. Adds X-Request-Id and Date when the upstream sent none."""
    drop = _HOP_BY_HOP_BYTES
    named = _connection_named(raw)
    if named:
        drop = drop | named
    lines: list[bytes] = []
    has_length = has_request_id = has_date = False
    for name, value in raw:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"content-length":
            has_length = True
        elif lower == b"x-request-id":
            has_request_id = True
        elif lower == b"date":
            has_date = True
        lines += (name, b": ", value, b"\r\n")
    if not has_request_id:
        lines += (b"X-Request-Id: ", request_id.encode(), b"\r\n")
    if not has_date:  # RFC 9110 6.6.1: a recipient with a clock adds the one the sender left out
        lines += (b"Date: ", date, b"\r\n")
    return b"".join(lines), has_length
