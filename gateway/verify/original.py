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

The headers are believed only from a peer in `trusted_proxies`: from anyone else they are ignored
and the question is its own request line, so a client that reaches the verify listener directly
cannot ask about one request while sending another. Each proxy overwrites only the pair it sets
and passes a client's other pair through (Caddy forwards a client's `X-Original-URI`; nginx, with
a configuration that sets only `X-Original-*`, a client's `X-Forwarded-Uri`); so when both pairs
come they must name the same request, or the question is refused. A pair with a target and no
method (or the reverse), or a header sent twice, is refused too: the method decides as much as the
path does (a route's `methods`).
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


@dataclass(frozen=True, slots=True)
class Original:
    method: str
    target: str  # a request target as a client sent it: to be normalised like any other


def original(
    method: str, raw_target: str, headers: CIMultiDictProxy[str], *, trusted: bool, path_prefix: str = ""
) -> Original | Denial:
    """The request a verify question is about, or why it cannot be told (400 invalid_request)."""
    if trusted:
        asked: Original | None = None
        for target_name, method_name in _NAMED:
            targets, methods = headers.getall(target_name, ()), headers.getall(method_name, ())
            if not targets and not methods:
                continue
            if len(targets) != 1 or len(methods) != 1:
                return Denial("invalid_request", f"{target_name} and {method_name} must each come once")
            named = methods[0].strip()
            if not named or len(named) > _MAX_METHOD or not named.isascii() or not named.isalpha():
                return Denial("invalid_request", f"{method_name} is not an HTTP method")
            this = Original(named, targets[0].strip())
            if asked is not None and this != asked:
                return Denial("invalid_request", "X-Forwarded-* and X-Original-* name different requests")
            asked = this
        if asked is not None:
            return asked
    if path_prefix:
        if raw_target != path_prefix and not raw_target.startswith((path_prefix + "/", path_prefix + "?")):
            return Denial("route_not_found")
        raw_target = raw_target[len(path_prefix) :]
        if not raw_target.startswith("/"):
            raw_target = "/" + raw_target
    return Original(method, raw_target)


def already_normal(target: str) -> bool:
    """Whether `target`'s path has no `.`, `..` or empty segment once decoded (a trailing `/`
    aside). The proxy listener forwards the path it normalised, so what it checks is what goes
    upstream; in verify mode the asking proxy forwards the client's target as sent, and an upstream
    may read `/admin/../api` or `/admin//../api` otherwise than the gateway would (aiohttp's router
    does not resolve dot segments at all), so such a target is refused rather than decided on."""
    path = target.partition("?")[0].partition("#")[0]
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return True  # not UTF-8: normalising refuses it with its own reason
    segments = decoded.split("/")[1:]
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    return not any(segment in ("", ".", "..") for segment in segments)
