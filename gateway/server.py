"""`gateway serve`: one replica's process, from config to listening sockets and back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis

from .app import build
from .config import Config
from .embedded import EmbeddedRedis

log = logging.getLogger("gateway")


def redis_client(url: str) -> Redis:
    # Bounded waits: a dead Redis must become a quick 503, not a hung request.
    return Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=15,
        decode_responses=False,
    )


@contextlib.asynccontextmanager
async def redis_for(config: Config) -> AsyncIterator[Redis]:
    embedded: EmbeddedRedis | None = None
    url = config.redis.url
    if url is None:
        embedded = EmbeddedRedis(config.redis.data_dir)
        url = await embedded.start()
    client = redis_client(url)
    try:
        yield client
    finally:
        await client.aclose()
        if embedded is not None:
            await embedded.stop()


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with redis_for(config) as redis:
        replica = build(config, redis)
        proxy = web.AppRunner(replica.proxy_app, access_log=None, handle_signals=False)
        admin = web.AppRunner(replica.admin_app, access_log=None, handle_signals=False)
        await proxy.setup()
        await admin.setup()
        try:
            await web.TCPSite(admin, config.admin.listen.host, config.admin.listen.port).start()
            await web.TCPSite(proxy, config.listen.host, config.listen.port).start()
            mode = "embedded" if config.redis.embedded else "external"
            log.info(
                "gateway listening: proxy %s:%d, admin %s:%d, %d route(s), redis %s",
                config.listen.host, config.listen.port,
                config.admin.listen.host, config.admin.listen.port,
                len(config.routes), mode,
            )  # fmt: skip
            for route in config.routes:
                log.info("route %s: %s -> %s (auth %s)", route.name, route.path_prefix, route.upstream, route.auth)
            await stop.wait()
            log.info("gateway stopping")
        finally:
            await proxy.cleanup()
            await admin.cleanup()
