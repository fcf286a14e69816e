"""Every answer the gateway gives itself: codes, statuses and the one renderer (spec 5).

A denial is a value, not an exception: the request path returns a `Denial` and
`render` turns it into a response. Nothing here echoes a key or a header value.
"""

from __future__ import annotations

import functools
import re
import secrets
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Literal

import orjson

if TYPE_CHECKING:  # render() imports it: the CLI uses the codes without loading aiohttp's server
    from aiohttp import web

ERROR_TYPE_BASE: Final = "https://gateway.dev/errors/"
WWW_AUTHENTICATE: Final = 'Bearer realm="gateway"'
ADMIN_WWW_AUTHENTICATE: Final = 'Bearer realm="gateway-admin"'


# Every code the gateway answers with (spec 5), the proxy's then the admin API's: a typo in a
# code is a type error, and KINDS below must give each one its status and words (a test checks
# that the two name the same set).
ErrorCode = Literal[
    "missing_key",
    "malformed_key",
    "key_not_found",
    "key_disabled",
    "key_revoked",
    "key_expired",
    "insufficient_permissions",
    "invalid_request",
    "route_not_found",
    "method_not_allowed",
    "auth_unavailable",
    "upstream_unavailable",
    "upstream_timeout",
    "payload_too_large",
    "body_too_large",
    "request_timeout",
    "headers_too_large",
    "too_many_requests",
    "internal_error",
    # rate limits and credits (spec 12)
    "rate_limited",
    "usage_exceeded",
    "ratelimit_unavailable",
    # admin API
    "missing_token",
    "invalid_token",
    "not_found",
    "key_exists",
    "key_rotated",
    "store_unavailable",
    "not_ready",
    "reenable_not_allowed",
    # operator console (HTML pages show the code and words; gateway/console)
    "csrf_rejected",
]


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    title: str
    detail: str


# code -> (status, title, detail). The proxy table of spec 5, then the admin API's own.
KINDS: Final[dict[ErrorCode, ErrorKind]] = {
    "missing_key": ErrorKind(
        401, "Unauthorized", "This route requires an API key in the Authorization header: Bearer <key>"
    ),
    "malformed_key": ErrorKind(401, "Unauthorized", "The Authorization header must be of the form: Bearer <key>"),
    "key_not_found": ErrorKind(401, "Unauthorized", "The API key used for authentication is not valid"),
    "key_disabled": ErrorKind(403, "Forbidden", "The API key used for authentication has been disabled"),
    "key_revoked": ErrorKind(403, "Forbidden", "The API key used for authentication has been revoked"),
    "key_expired": ErrorKind(401, "Unauthorized", "The API key used for authentication has expired"),
    "insufficient_permissions": ErrorKind(
        403, "Forbidden", "The credential used lacks a permission this resource requires"
    ),
    "invalid_request": ErrorKind(400, "Bad Request", "The request is malformed"),
    "route_not_found": ErrorKind(404, "Not Found", "No route matches this path"),
    "method_not_allowed": ErrorKind(405, "Method Not Allowed", "This method is not allowed on this route"),
    "auth_unavailable": ErrorKind(503, "Service Unavailable", "The key table cannot be reached; try again shortly"),
    "upstream_unavailable": ErrorKind(
        502, "Bad Gateway", "The upstream service could not be reached or answered badly"
    ),
    "upstream_timeout": ErrorKind(504, "Gateway Timeout", "The upstream service did not answer in time"),
    "payload_too_large": ErrorKind(413, "Payload Too Large", "The request body is too large"),
    "body_too_large": ErrorKind(413, "Content Too Large", "The request body is larger than this route accepts"),
    "request_timeout": ErrorKind(408, "Request Timeout", "The request was not received in time"),
    "headers_too_large": ErrorKind(
        431, "Request Header Fields Too Large", "The request head is larger than this gateway accepts"
    ),
    "too_many_requests": ErrorKind(429, "Too Many Requests", "Too many failed attempts; retry later"),
    "internal_error": ErrorKind(500, "Internal Server Error", "The gateway failed to handle this request"),
    "rate_limited": ErrorKind(
        429, "Too Many Requests", "A rate limit of this API key is used up for now; retry after the time given"
    ),
    "usage_exceeded": ErrorKind(429, "Too Many Requests", "The credits of this API key are used up"),
    "ratelimit_unavailable": ErrorKind(
        503, "Service Unavailable", "The rate limit of this API key cannot be checked now; try again shortly"
    ),
    # admin API
    "missing_token": ErrorKind(
        401, "Unauthorized", "The admin API requires a token in the Authorization header: Bearer <token>"
    ),
    "invalid_token": ErrorKind(401, "Unauthorized", "The admin token is not valid"),
    "not_found": ErrorKind(404, "Not Found", "No such resource"),
    "key_exists": ErrorKind(409, "Conflict", "A key with this value is already in the table"),
    "key_rotated": ErrorKind(409, "Conflict", "This key has been rotated already; rotate its successor instead"),
    "store_unavailable": ErrorKind(
        503,
        "Service Unavailable",
        "The key table could not be reached; read the key to see whether the change was made, then retry",
    ),
    "not_ready": ErrorKind(503, "Service Unavailable", "The gateway cannot serve authenticated traffic yet"),
    "reenable_not_allowed": ErrorKind(
        409, "Conflict", "This gateway does not allow re-enabling a disabled key (keys.allow_reenable is false)"
    ),
    "csrf_rejected": ErrorKind(
        403, "Forbidden", "The form's CSRF token is missing or wrong, or it came from another site; reload and retry"
    ),
}

_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def new_request_id() -> str:
    """`req_` and 16 hex digits: 64 random bits."""
    return "req_" + secrets.token_hex(8)


def request_id_from(client_value: str | None) -> str:
    """The client's X-Request-Id when it is well-formed, else a new one."""
    if client_value is not None and _REQUEST_ID_OK.fullmatch(client_value):
        return client_value
    return new_request_id()


@dataclass(frozen=True, slots=True)
class Denial:
    """A decision not to forward: a code from KINDS, an optional detail and status override."""

    code: ErrorCode
    detail: str | None = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


def body(code: ErrorCode, request_id: str, *, detail: str | None = None, status: int | None = None) -> bytes:
    kind = KINDS[code]
    status = status or kind.status
    # A status override (keys.disabled_status: 401) takes the title of its own status.
    title = kind.title if status == kind.status else HTTPStatus(status).phrase
    return orjson.dumps(
        {
            "meta": {"requestId": request_id},
            "error": {
                "code": code,
                "title": title,
                "detail": detail or kind.detail,
                "status": status,
                "type": ERROR_TYPE_BASE + code,
            },
        }
    )


def rendered(denial: Denial, request_id: str, *, realm: str = WWW_AUTHENTICATE) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the answer to `denial`: the one place they are decided."""
    status = denial.status or KINDS[denial.code].status
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id, "Cache-Control": "no-store",
               **denial.headers}  # fmt: skip
    if status == 401:
        headers["WWW-Authenticate"] = realm
    return status, headers, body(denial.code, request_id, detail=denial.detail, status=status)


_ID_MARK: Final = "rid-0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # stands for the request id in a template


@functools.lru_cache(maxsize=512)
def _template(code: ErrorCode, detail: str | None, status: int | None, headers: tuple[tuple[str, str], ...]) -> tuple[
    int, str, tuple[bytes, bytes], tuple[bytes, bytes]
]:  # fmt: skip
    status, fields, payload = rendered(Denial(code, detail, status, dict(headers)), _ID_MARK)
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items()).encode("latin-1")
    h1, h2 = head.split(_ID_MARK.encode())
    b1, b2 = payload.split(_ID_MARK.encode())
    return status, HTTPStatus(status).phrase, (h1, h2), (b1, b2)


def wire(denial: Denial, request_id: str) -> tuple[int, str, bytes, bytes]:
    """The proxy's answer to `denial` as bytes: status, reason, header lines, body. The same
    answer as `rendered`, from a template per kind of denial, so a flood of refusals does not
    pay for JSON and header rendering each time. Request ids are safe in both places: ours are
    hex, a client's is kept only when it matches `_REQUEST_ID_OK`."""
    status, reason, (h1, h2), (b1, b2) = _template(
        denial.code, denial.detail, denial.status, tuple(denial.headers.items()) if denial.headers else ()
    )
    rid = request_id.encode()
    return status, reason, h1 + rid + h2, b1 + rid + b2


def render(denial: Denial, request_id: str, *, realm: str = WWW_AUTHENTICATE) -> web.Response:
    """The admin API's answer (an aiohttp response) for `denial`."""
    from aiohttp import web

    status, headers, payload = rendered(denial, request_id, realm=realm)
    return web.Response(status=status, body=payload, headers=headers)
