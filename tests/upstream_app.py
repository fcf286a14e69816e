"""A real upstream for tests: echoes what it received, and misbehaves on request."""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web

UPLOAD_STARTED = web.AppKey("upload_started", asyncio.Event)
DOWNLOAD_GATE = web.AppKey("download_gate", asyncio.Event)
CHUNK = 64 * 1024


async def echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        length += len(chunk)
        digest.update(chunk)
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_length": length,
            "body_sha256": digest.hexdigest(),
        },
        headers={"X-Upstream": "echo"},
    )


async def redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/elsewhere", "X-Upstream": "redirect"})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(2)
    return web.json_response({"slow": True})


async def hop_headers(request: web.Request) -> web.Response:
    return web.Response(
        text="ok",
        headers={"Connection": "X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5", "X-Kept": "1"},
    )


async def upload(request: web.Request) -> web.Response:
    """Counts a streamed body; signals the test once the first bytes arrive."""
    length = 0
    digest = hashlib.sha256()
    async for chunk in request.content.iter_any():
        if length == 0:
            request.app[UPLOAD_STARTED].set()
        length += len(chunk)
        digest.update(chunk)
    return web.json_response({"body_length": length, "body_sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    """`mb` MiB of bytes; with gate=1 it pauses after the first MiB until the test opens the gate."""
    mb = int(request.query.get("mb", "1"))
    gated = request.query.get("gate") == "1"
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = mb * 1024 * 1024
    await response.prepare(request)
    block = bytes(range(256)) * (1024 * 4)  # 1 MiB
    for i in range(mb):
        await response.write(block)
        if i == 0 and gated:
            await asyncio.wait_for(request.app[DOWNLOAD_GATE].wait(), 10)
    await response.write_eof()
    return response


async def chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(5):
        await response.write(f"part{i};".encode())
    await response.write_eof()
    return response


def make_upstream() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPLOAD_STARTED] = asyncio.Event()
    app[DOWNLOAD_GATE] = asyncio.Event()
    app.router.add_route("*", "/api/redirect", redirect)
    app.router.add_route("*", "/slowroute/{tail:.*}", slow)
    app.router.add_route("*", "/api/hop-headers", hop_headers)
    app.router.add_route("*", "/api/upload", upload)
    app.router.add_route("*", "/api/download", download)
    app.router.add_route("*", "/api/chunked", chunked)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
