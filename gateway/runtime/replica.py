"""Assembling one replica: the shared parts, the proxy app, the admin app, and their lifetime.

`build` takes its Redis clients as arguments, so tests build the same replica
around a redis-server of their own. `Replica.running()` runs the invalidation
subscriber for as long as the replica serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from gateway.admin.api import AdminApi
from gateway.admin.app import build_admin_app
from gateway.admin.auth import TokenVerifier
from gateway.coherence.channel import Codec
from gateway.coherence.propagation import Propagator
from gateway.coherence.replicas import Registry
from gateway.coherence.subscriber import Subscriber
from gateway.config import Config
from gateway.console.app import mount as mount_console
from gateway.h1.client import Forwarder
from gateway.h1.server import Server
from gateway.keytable.cache import KeyCache
from gateway.keytable.keyfilter import KnownKeys
from gateway.keytable.lease import Coherence
from gateway.keytable.lookup import KeyLookup
from gateway.keytable.store import Durability, KeyStore
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.ratelimit.limiter import LEASE_SHARE, STORE_TIMEOUT, Limiter
from gateway.ratelimit.store import RateStore
from gateway.routing import RouteTable
from gateway.usage.counter import Counter
from gateway.usage.flusher import Flusher
from gateway.usage.policies import PolicyEngine
from gateway.usage.store import UsageStore
from gateway.verify.verifier import ERROR_BODY_HEADER, Verifier
from gateway.webhooks.service import Webhooks

log = logging.getLogger("gateway.replica")


@dataclass
class Replica:
    replica_id: str
    config: Config
    store: KeyStore
    cache: KeyCache
    coherence: Coherence
    lookup: KeyLookup
    propagator: Propagator
    subscriber: Subscriber
    registry: Registry
    metrics: Metrics
    api: AdminApi
    proxy: Proxy
    proxy_server: Server  # the lean HTTP/1.1 listener (h1/server.py): no router or middleware on the request path
    admin_app: web.Application
    verifier: Verifier | None = None  # with verify_server: the verify listener (config `verify`), when configured
    verify_server: Server | None = None
    webhooks: Webhooks | None = None  # config `webhooks`, when configured: its loops run inside running()
    usage: Flusher | None = None  # per-key usage counting and the policies (gateway/usage/)
    limiter: Limiter | None = None  # rate limits and credits (gateway/ratelimit/), shared by proxy and verifier

    def reload_routes(self, new: Config) -> list[str]:
        """Swap in `new`'s routes (SIGHUP); returns the sections that changed but need a restart."""
        self.proxy.routes = RouteTable(new.routes_for("proxy"))
        if self.verifier is not None:
            self.verifier.routes = RouteTable(new.routes_for("verify"))
        self.config = dataclasses.replace(self.config, routes=new.routes, policies=new.policies)
        if self.usage is not None:
            self.usage.engine.policies = new.policies
            self.api.usage_flush_seconds = self.usage.interval  # at most 5 s with policies
        return [name for name in _RESTART_SECTIONS if getattr(self.config, name) != getattr(new, name)]

    async def _migrate(self) -> None:
        """The startup migrations (`_migrate_audit`); `gateway_layout_migration_pending` is 1 from
        before this task starts until it ends."""
        try:
            await _migrate_audit(self.store, self.lookup.known, self.replica_id)
        finally:
            self.metrics.migration_pending.set(0)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The subscriber runs (and the replica is in the live set) and the upstream pool is open inside this block."""
        await self.proxy.forwarder.start()
        task = asyncio.get_running_loop().create_task(self.subscriber.run(), name="invalidation-subscriber")
        if self.usage is not None:
            self.usage.start()
        self.metrics.migration_pending.set(1)
        migration = asyncio.get_running_loop().create_task(self._migrate(), name="audit-migration")
        try:
            if self.webhooks is not None:
                await self.webhooks.start()
            yield
        finally:
            if self.usage is not None:  # the last write (and its policies) while still subscribed
                await self.usage.stop()
            if self.webhooks is not None:
                await self.webhooks.stop()
            await _cancel(migration)
            await _cancel(task)
            await self.proxy.forwarder.close()
            if self.limiter is not None:
                await self.limiter.close()  # the unspent slices go back to the window's budget
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.registry.leave(), 1.0)


# What a reload does not apply: listeners, Redis, cache, keys, admin, logging and lifecycle need a restart.
_RESTART_SECTIONS = ("listen", "admin", "redis", "cache", "keys", "logging", "lifecycle", "limits", "trusted_proxies",
                     "verify", "webhooks", "usage")  # fmt: skip


async def _migrate_audit(store: KeyStore, known: KnownKeys, replica_id: str, retry: float = 30.0) -> None:
    """Per-key audit streams of the layout before the audit index, moved into it (store.py). Best
    effort: until it has run, the audit API reads both layouts, so nothing is lost meanwhile.
    Its SCAN of the whole database waits for the key filter's (a first start on a large table
    would otherwise take twice as long to be ready), for at most two minutes. Then the same for the
    key ids (store.migrate_ids), again after 1, 2, 4, ... and at most every `retry` seconds while a
    replica of an earlier version is live."""
    for _ in range(2400):
        if not known.enabled or known.ready:
            break
        await asyncio.sleep(0.05)
    try:
        moved = await store.migrate_audit()
    except Exception as exc:  # Redis down at startup: the next start tries again
        log.warning("audit index migration not run (%s): old per-key streams are read as they are", type(exc).__name__)
    else:
        if moved:
            log.info("audit index migration: %d per-key audit stream(s) moved into the index", moved)
    # The id index (store.migrate_ids): waits while a replica of an earlier version is live. The
    # first waits are short: replicas started together declare themselves within a moment of each
    # other, and one that asked first need not wait `retry` for the others.
    delay = min(1.0, retry)
    while True:
        try:
            ids = await store.migrate_ids(replica_id)
        except Exception as exc:  # Redis down: both layouts go on being read and written; next start
            log.warning("id index migration not run (%s): ids are read from both layouts", type(exc).__name__)
            return
        if ids is not None:
            if ids:
                log.info("id index migration: %d key id(s) moved into the index", ids)
            return
        await asyncio.sleep(delay)
        delay = min(retry, delay * 2)


async def _cancel(task: asyncio.Task[None], seconds: float = 5.0) -> None:
    """Cancel until it ends: on Python 3.11 a cancel landing inside redis-py's
    internal wait_for can be swallowed, so one cancel() is not always enough."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not task.done() and asyncio.get_running_loop().time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: it was logged where it happened


def build(
    config: Config, redis: Redis, listen_redis: Redis, *, replica_id: str | None = None, writer: Redis | None = None
) -> Replica:
    """`redis` serves commands; `listen_redis` (retries off) holds the subscription; `writer` (a
    client with one connection) carries the changes and their WAIT when redis.min_replicas_acked is set."""
    replica_id = replica_id or "r_" + secrets.token_hex(6)
    prefix = config.redis.prefix
    metrics = Metrics()
    codec = Codec(config.redis.channel_secret)
    durability = None
    if config.redis.min_replicas_acked > 0:
        assert writer is not None, "redis.min_replicas_acked needs a writer client"
        durability = Durability(config.redis.min_replicas_acked, config.redis.min_replicas_timeout_seconds, writer)
    store = KeyStore(redis, prefix, durability=durability)
    cache = KeyCache(config.cache.ttl_seconds, config.cache.negative_ttl_seconds, config.cache.max_entries)
    coherence = Coherence(lease_seconds=config.redis.lease_seconds)
    metrics.watch_cache(cache)
    known = KnownKeys(enabled=config.cache.key_filter)
    metrics.watch_known(known)
    lookup = KeyLookup(store, cache, coherence, config.cache.serve_stale_seconds, metrics, known)
    health = config.redis.health_check_seconds
    registry = Registry(redis, prefix, replica_id, ttl_ms=int(health * 3000))
    propagator = Propagator(
        codec=codec,
        registry=registry,
        cache=cache,
        metrics=metrics,
        timeout_seconds=config.admin.propagation_timeout_seconds,
        lease_seconds=config.redis.lease_seconds,
    )
    subscriber = Subscriber(
        listen_client=listen_redis,
        redis=redis,
        prefix=prefix,
        codec=codec,
        cache=cache,
        coherence=coherence,
        registry=registry,
        metrics=metrics,
        on_ack=propagator.on_ack,
        health_check_seconds=health,
        known=known,
        table=store.hash_prefixes,
        changes=store,
    )

    # usage.enabled false: no counting on the request path, no flush, no policies, no usage figures in the API.
    counter = usage_store = usage = None
    if config.usage.enabled:
        counter = Counter(config.usage.max_keys, config.usage.max_addresses, config.trusted_proxies)
        usage_store = UsageStore(redis, prefix)
        engine = PolicyEngine(usage_store, store, propagator, metrics, replica_id, config.policies)
        usage = Flusher(counter, usage_store, engine, metrics, config.usage.flush_seconds)
    rates = RateStore(redis, prefix, timeout=STORE_TIMEOUT, share=LEASE_SHARE)
    metrics.watch_ratelimit(rates)
    limiter = Limiter(rates, metrics)
    forwarder = Forwarder()
    proxy = Proxy(RouteTable(config.routes_for("proxy")), lookup, config.keys, metrics, forwarder=forwarder,
                  usage=counter, limiter=limiter)  # fmt: skip
    proxy_server = Server(proxy.handle, proxy.refused, limits=config.limits, trusted_proxies=config.trusted_proxies)

    api = AdminApi(
        store,
        TokenVerifier(config.admin.tokens),
        propagator,
        coherence,
        config.keys,
        metrics,
        trusted_proxies=config.trusted_proxies,
        usage=usage_store,
        usage_flush_seconds=usage.interval if usage is not None else config.usage.flush_seconds,
        rates=rates,
    )
    admin_app = build_admin_app(api)
    if config.admin.console.enabled:
        mount_console(admin_app, api, config.admin.console, usage=usage_store)
    verifier = verify_server = None
    if config.verify is not None:
        verifier = Verifier(RouteTable(config.routes_for("verify")), lookup, config.keys, metrics,
                            path_prefix=config.verify.path_prefix, usage=counter, limiter=limiter)  # fmt: skip
        verify_server = Server(verifier.handle, verifier.refused, limits=config.limits,
                               trusted_proxies=config.trusted_proxies, body_header=ERROR_BODY_HEADER)  # fmt: skip
    webhooks = Webhooks(config.webhooks, store, metrics, replica_id) if config.webhooks is not None else None
    gates = [gate for gate in (proxy, verifier) if gate is not None]
    metrics.inflight.set_function(lambda: sum(gate.inflight for gate in gates))
    return Replica(
        replica_id, config, store, cache, coherence, lookup, propagator, subscriber, registry, metrics, api,
        proxy, proxy_server, admin_app, verifier, verify_server, webhooks, usage, limiter,
    )  # fmt: skip
