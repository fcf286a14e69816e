"""The naive baseline of benchmarks/bench.py: a plain aiohttp pass-through proxy.

What anyone would write first with aiohttp, with the obvious settings right: one
`ClientSession` with a keep-alive connector, no cookie jar (`DummyCookieJar`),
`auto_decompress=False`, both bodies streamed in 64 KiB chunks, no access log.
No key check, no routing: every request goes to the upstream with the same path.
It runs on the event loop the gateway runs on (`--loop`; bench.py passes the gateway's), so
the two aiohttp processes differ in what they do, not in the loop under them.

    .venv/bin/python benchmarks/naive_proxy.py --port 8090 --upstream http://127.0.0.1:9000 [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

CHUNK: Final = 64 * 1024
HOP_BY_HOP: Final = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
    )
)
SESSION: Final = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: Final = web.AppKey("upstream", str)


def _copy(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    return out


async def handle(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    url = request.app[UPSTREAM] + request.raw_path
    body = request.content if request.body_exists else None
    try:
        upstream = await session.request(
            request.method, url, headers=_copy(request.headers), data=body, allow_redirects=False
        )
    except (aiohttp.ClientError, OSError):
        return web.Response(status=502, text="bad gateway\n")
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=_copy(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=60)
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30),
    ) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port, no trailing slash")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop to run on")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    # bench.py reads this line from the log to check the loop it asked for.
    print(f"naive: event loop {type(loop).__module__}.{type(loop).__qualname__}", file=sys.stderr, flush=True)
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
