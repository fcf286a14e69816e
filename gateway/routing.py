"""Path normalisation and route matching (spec 6), pure.

The raw request path is decoded and normalised once; the same normalised path
is both matched against route prefixes and forwarded upstream, so what the
gateway checks is exactly what the upstream sees.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

from gateway.config import Route

# Characters left as they are when the normalised path is re-encoded for the
# upstream: RFC 3986 pchar minus '%' (every '%' left after decoding is literal).
_PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN_ESCAPE: Final = re.compile(r"%(2[Ff]|5[Cc]|00)")


class UnsafePath(ValueError):
    """A path the gateway refuses to interpret (answered 400 invalid_request)."""


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # normalised, decoded
    query: str  # raw, without '?'


def split_target(raw_target: str) -> Target:
    """Split a request-target into a normalised path and the raw query.

    Absolute-form (`http://host/path`, RFC 9112 3.2.2) is accepted: its path is used.
    """
    scheme, sep, rest = raw_target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        raw_target = rest[cut:]
        if not raw_target.startswith("/"):
            raw_target = "/" + raw_target
    path, sep, query = raw_target.partition("?")
    path = path.partition("#")[0]
    return Target(normalise(path), query if sep else "")


@functools.lru_cache(maxsize=4096)  # pure: hot paths are normalised once, not per request
def normalise(raw_path: str) -> str:
    """Decode percent-escapes once and resolve '.', '..' and duplicate slashes.

    Raises UnsafePath for an encoded '/' or '\\', NUL, a bad escape, non-UTF-8
    bytes, a '..' above the root, a '..;' or '.;' segment, or a path that is not origin-form.
    """
    if not raw_path.startswith("/"):
        raise UnsafePath("the path must start with '/'")
    if _FORBIDDEN_ESCAPE.search(raw_path):
        raise UnsafePath("the path contains an encoded '/', '\\' or NUL")
    if _BAD_ESCAPE.search(raw_path):
        raise UnsafePath("the path contains an invalid percent-escape")
    try:
        decoded = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise UnsafePath("the path is not valid UTF-8 once decoded") from None
    if "\\" in decoded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise UnsafePath("the path contains a backslash or a control character")
    out: list[str] = []
    segments = decoded.split("/")[1:]
    for segment in segments:
        if ";" in segment and segment.partition(";")[0] in (".", ".."):
            # `..;x`: Tomcat, Jetty and Spring drop the parameter and then resolve the dot, an
            # upstream would climb where this path does not.
            raise UnsafePath("the path has a '.' or '..' segment with parameters")
        if segment in ("", "."):
            continue
        if segment == "..":
            if not out:
                raise UnsafePath("the path climbs above the root")
            out.pop()
            continue
        out.append(segment)
    trailing = decoded.endswith("/") or segments[-1] in (".", "..")
    path = "/" + "/".join(out)
    if trailing and out:
        path += "/"
    return path


def encode(path: str) -> str:
    """Percent-encode a normalised path for the upstream request line."""
    return quote(path, safe=_PATH_SAFE)


def _matches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


class RouteTable:
    """Longest-prefix match on segment boundaries, precomputed at config load."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = sorted(routes, key=lambda r: len(r.path_prefix), reverse=True)

    def match(self, path: str) -> Route | None:
        for route in self._routes:
            if _matches(route.path_prefix, path):
                return route
        return None


def upstream_path(route: Route, path: str) -> str:
    """The path sent upstream: the route prefix removed when strip_prefix is set."""
    if route.strip_prefix and route.path_prefix != "/":
        path = path[len(route.path_prefix) :] or "/"
        if not path.startswith("/"):
            path = "/" + path
    return path
