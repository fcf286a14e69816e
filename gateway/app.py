"""Assembling one replica: the shared parts, the proxy app and the admin app.

`build` takes its Redis client as an argument, so tests build the same apps
around a redis-server of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from .admin import AdminApi, build_admin_app
from .admin.auth import TokenVerifier
from .cache import KeyCache
from .config import Config
from .lookup import KeyLookup
from .metrics import Metrics
from .middleware import error_middleware
from .propagation import LocalPropagator, Propagator
from .proxy import Proxy
from .routing import RouteTable
from .store import KeyStore
from .upstream import Forwarder


@dataclass
class Replica:
    config: Config
    store: KeyStore
    cache: KeyCache
    lookup: KeyLookup
    propagator: Propagator
    metrics: Metrics
    proxy_app: web.Application
    admin_app: web.Application


def build(config: Config, redis: Redis) -> Replica:
    store = KeyStore(redis, config.redis.prefix)
    cache = KeyCache(config.cache.ttl_seconds, config.cache.negative_ttl_seconds, config.cache.max_entries)
    lookup = KeyLookup(store, cache)
    propagator = LocalPropagator(cache)
    metrics = Metrics()
    forwarder = Forwarder()

    proxy = Proxy(RouteTable(config.routes), lookup, forwarder, config.keys, metrics)
    proxy_app = web.Application(middlewares=[error_middleware])
    proxy_app.router.add_route("*", "/{tail:.*}", proxy.handle)

    async def upstream_pool(app: web.Application) -> AsyncIterator[None]:
        await forwarder.start()
        yield
        await forwarder.close()

    proxy_app.cleanup_ctx.append(upstream_pool)

    api = AdminApi(store, TokenVerifier(config.admin.tokens), propagator, config.keys, metrics)
    admin_app = build_admin_app(api)
    return Replica(config, store, cache, lookup, propagator, metrics, proxy_app, admin_app)
