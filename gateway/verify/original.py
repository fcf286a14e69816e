"""Which request a verify question is about (pure).

Each proxy names the request it is about to forward in its own way:

- Traefik `ForwardAuth` and Caddy `forward_auth` send `X-Forwarded-Method` and `X-Forwarded-Uri`,
  overwriting whatever the client sent under those names.
- nginx `auth_request` sends what its configuration sets: docs/verify-proxies.md sets both
  `X-Forwarded-Method`/`X-Forwarded-Uri` and `X-Original-Method`/`X-Original-URI` (the common
  nginx recipe) to `$request_method` and `$request_uri`, the client's raw request target, which
  `proxy_pass` without a URI also forwards unchanged.
- Envoy's HTTP `ext_authz` sends the original method and path as its own request line, behind
  `path_prefix` when one is configured (`verify.path_prefix`).

Without `verify.path_prefix` the question must name its request in those headers, and they are
believed only from a peer in `trusted_proxies`: a question from anyone else, or one that names no
request, is refused 400 (never taken as a question about its own request line, which a catch-all
route would pass). Each proxy overwrites only the pair it sets and passes a client's other pair
through (Caddy forwards a client's `X-Original-URI`; nginx, with a configuration that sets only
`X-Original-*`, a client's `X-Forwarded-Uri`); so when both pairs come they must name the same
request, or the question is refused. A pair with a target and no method (or the reverse), a method
that is not upper-case letters, or a header sent twice, is refused too: the method decides as much
as the path does (a route's `methods`). With `verify.path_prefix` (Envoy) the request line is the
question and naming headers are not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from multidict import CIMultiDictProxy

from gateway.errors import Denial

# (target header, method header): Traefik's, Caddy's and nginx's; then the nginx recipe's.
_NAMED: Final = (("X-Forwarded-Uri", "X-Forwarded-Method"), ("X-Original-URI", "X-Original-Method"))
_MAX_METHOD: Final = 32
NAMING_HEADERS: Final = tuple(name for pair in _NAMED for name in pair)
UNTRUSTED: Final = "The verify listener takes questions only from a peer in trusted_proxies"
UNNAMED: Final = "The question must name its request: X-Forwarded-Method and X-Forwarded-Uri"
NOT_NORMAL: Final = "The path must arrive normalised (no '.', '..' or empty segments): the proxy forwards it as sent"


@dataclass(frozen=True, slots=True)
class Original:
    method: str
    target: str  # a request target as a client sent it: to be normalised like any other


def original(
    method: str, raw_target: str, headers: CIMultiDictProxy[str], *, trusted: bool, path_prefix: str = ""
) -> Original | Denial:
    """The request a verify question is about, or why it cannot be told (400 invalid_request).

    With `path_prefix` (Envoy), the question is the request line, behind that prefix (`/` for the
    line as it is), and naming headers are not looked at. Without it, the question must name its
    request in headers from a trusted peer: a question that names none, or names one from a peer
    outside trusted_proxies, is refused, never taken as a question about its own request line (a
    catch-all route would then pass `GET /verify` for whatever the proxy is about to forward)."""
    if path_prefix:
        if path_prefix != "/":
            if raw_target != path_prefix and not raw_target.startswith((path_prefix + "/", path_prefix + "?")):
                return Denial("route_not_found")
            raw_target = raw_target[len(path_prefix) :]
            if not raw_target.startswith("/"):
                raw_target = "/" + raw_target
        return Original(method, raw_target)
    if not trusted:
        return Denial("invalid_request", UNTRUSTED)
    asked: Original | None = None
    for target_name, method_name in _NAMED:
        targets, methods = headers.getall(target_name, ()), headers.getall(method_name, ())
        if not targets and not methods:
            continue
        if len(targets) != 1 or len(methods) != 1:
            return Denial("invalid_request", f"{target_name} and {method_name} must each come once")
        named = methods[0].strip()
        # Upper-case letters only: methods are case-sensitive, and a lower-case `trace` would pass
        # the CONNECT/TRACE rule (spec 6) while an upstream may take it as TRACE.
        if not named or len(named) > _MAX_METHOD or not (named.isascii() and named.isalpha() and named.isupper()):
            return Denial("invalid_request", f"{method_name} is not an HTTP method")
        this = Original(named, targets[0].strip())
        if asked is not None and this != asked:
            return Denial("invalid_request", "X-Forwarded-* and X-Original-* name different requests")
        asked = this
    if asked is None:
        return Denial("invalid_request", UNNAMED)
    return asked


def as_sent_problem(target: str) -> str | None:
    """Why `target` cannot be decided on as the asking proxy will forward it, or None.

    The proxy listener forwards the path it normalised, so what it checks is what goes upstream;
    in verify mode the asking proxy forwards the client's target as sent, and an upstream may read
    `/admin/../api` or `/admin//../api` otherwise than the gateway would (aiohttp's router does not
    resolve dot segments at all; RFC 3986 5.2.4 keeps the empty segment that collapsing slashes
    drops). So a target is decided on only when normalising would leave it as it is: no `.`, `..`
    or empty segment once decoded (a trailing `/` aside), no `..;` or `.;` (Tomcat, Jetty and
    Spring drop path parameters and then resolve the dot), and no raw `#` (not allowed in a
    request target; an upstream may keep what follows it as path)."""
    if "#" in target:
        return "The request target must not contain '#'"
    path = target.partition("?")[0]
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None  # not UTF-8: normalising refuses it with its own reason
    segments = decoded.split("/")[1:]
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if any(segment.partition(";")[0] in ("", ".", "..") for segment in segments):
        return NOT_NORMAL
    return None
