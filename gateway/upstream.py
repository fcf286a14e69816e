"""Forwarding to the upstream (spec 6): pooled keep-alive connections, both bodies streamed.

Client-library errors are translated here, once: a timeout before the
response headers is 504 upstream_timeout, any other failure 502
upstream_unavailable. A failure after the response has started cannot change
its status, so the client connection is closed and the answer stays truncated.
"""

from __future__ import annotations

import logging
from typing import Final

import aiohttp
from aiohttp import web
from yarl import URL

from . import errors
from .config import Route
from .forwarding import client_response_headers, upstream_request_headers
from .keys import KeyRecord
from .routing import Target, encode, upstream_path

log = logging.getLogger("gateway.upstream")

CHUNK: Final = 64 * 1024
# Headers aiohttp's client would otherwise add on its own: the upstream sees the client's.
_SKIP_AUTO: Final = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def new_session(*, pool_size: int = 512, keepalive_seconds: float = 30.0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=pool_size, limit_per_host=0, keepalive_timeout=keepalive_seconds, ttl_dns_cache=60
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_SKIP_AUTO,
        timeout=aiohttp.ClientTimeout(total=None),
        read_bufsize=CHUNK,
    )


class Forwarder:
    """Holds the pooled upstream session between `start` and `close` (the app's lifetime)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        self._session = new_session()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the forwarder is not started")
        return self._session

    def _timeout(self, route: Route) -> aiohttp.ClientTimeout:
        t = self._timeouts.get(route.timeout_seconds)
        if t is None:
            # Bounds the connect and every wait for bytes, the response headers included.
            s = route.timeout_seconds
            t = aiohttp.ClientTimeout(total=None, sock_connect=s, sock_read=s)
            self._timeouts[s] = t
        return t

    async def forward(
        self,
        request: web.Request,
        route: Route,
        target: Target,
        record: KeyRecord | None,
        request_id: str,
    ) -> web.StreamResponse | errors.Denial:
        """Stream the exchange; a Denial (502/504) when no response could be started."""
        url = route.upstream + encode(upstream_path(route, target.path))
        if target.query:
            url += "?" + target.query
        headers = upstream_request_headers(
            request.headers,
            forward_authorization=route.forward_authorization,
            record=record,
            request_id=request_id,
            peer=request.remote,
            scheme=request.scheme,
            host=request.headers.get("Host"),
        )
        body = request.content if request.body_exists else None
        try:
            upstream = await self.session.request(
                request.method,
                URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=self._timeout(route),
            )
        except TimeoutError:
            log.warning("upstream timeout", extra={"route": route.name, "request_id": request_id})
            return errors.Denial("upstream_timeout")
        except (aiohttp.ClientError, OSError) as exc:
            log.warning(
                "upstream unavailable: %s",
                type(exc).__name__,
                extra={"route": route.name, "request_id": request_id},
            )
            return errors.Denial("upstream_unavailable")

        async with upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=client_response_headers(upstream.headers, request_id),
            )
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await response.write(chunk)
                await response.write_eof()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                # The status line is gone already: the only honest signal left is a cut connection.
                log.warning(
                    "upstream failed mid-response: %s",
                    type(exc).__name__,
                    extra={"route": route.name, "request_id": request_id},
                )
                if request.transport is not None:
                    request.transport.close()
            return response
