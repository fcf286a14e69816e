"""Which headers cross the gateway, in each direction (spec 6), pure.

Order matters: hop-by-hop headers (and every header the client named in
`Connection`) go first, then the client's Authorization and X-Gateway-*
headers, and only then does the gateway set its own identity headers, so a
client cannot use `Connection: X-Gateway-Key-Id` to strip them.
"""

from __future__ import annotations

from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

from .keys import KeyRecord

# RFC 9110 7.6.1, plus the de-facto ones proxies drop.
HOP_BY_HOP: Final = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
# Set by the gateway or its client library, never copied from the client.
_REQUEST_DROP: Final = HOP_BY_HOP | {"host", "expect", "x-request-id", "x-forwarded-proto", "x-forwarded-host"}
GATEWAY_HEADER_PREFIX: Final = "x-gateway-"


def _connection_named(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                named.add(token)
    return named


def upstream_request_headers(
    headers: CIMultiDictProxy[str],
    *,
    forward_authorization: bool,
    record: KeyRecord | None,
    request_id: str,
    peer: str | None,
    scheme: str,
    host: str | None,
) -> CIMultiDict[str]:
    drop = _REQUEST_DROP | _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    forwarded_for: list[str] = []
    for name, value in headers.items():
        lower = name.lower()
        # `X_Gateway_Key_Id` too: CGI/WSGI upstreams read '_' and '-' alike.
        if lower in drop or lower.replace("_", "-").startswith(GATEWAY_HEADER_PREFIX):
            continue
        if lower == "authorization" and not forward_authorization:
            continue
        if lower == "x-forwarded-for":
            forwarded_for.append(value)
            continue
        out.add(name, value)
    if record is not None:
        out["X-Gateway-Key-Id"] = record.id
        if record.owner is not None:
            out["X-Gateway-Key-Owner"] = record.owner
    out["X-Request-Id"] = request_id
    if peer:
        forwarded_for.append(peer)
    if forwarded_for:
        out["X-Forwarded-For"] = ", ".join(forwarded_for)
    out["X-Forwarded-Proto"] = scheme
    if host:
        out["X-Forwarded-Host"] = host
    return out


def client_response_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in drop)
    if "X-Request-Id" not in out:
        out["X-Request-Id"] = request_id
    return out
