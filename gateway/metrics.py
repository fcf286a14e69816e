"""Prometheus metrics, one registry per process (prometheus-client), served on the admin `/metrics`.

Labels are route names, decision codes and fixed words: never a key, a token
or a raw path. The request path touches only pre-resolved label children (no
label lookup per request); the cache's counters are plain integers that a
collector reads at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Upstream exchanges on loopback take ~0.5 ms; a slow API takes seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class CacheStats(Protocol):
    """What the key cache counts (gateway.keytable.cache.KeyCache)."""

    hits: int
    negative_hits: int
    misses: int
    evicted_size: int
    expired: int
    invalidated: int
    cleared: int

    def __len__(self) -> int: ...


class _CacheCollector(Collector):
    def __init__(self, cache: CacheStats) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        c = self.cache
        lookups = CounterMetricFamily(
            "gateway_cache_lookups",
            "Key lookups answered by the in-process cache (hit: a known key; negative_hit: a cached "
            "unknown key) or sent to Redis (miss)",
            labels=["result"],
        )
        lookups.add_metric(["hit"], c.hits)
        lookups.add_metric(["negative_hit"], c.negative_hits)
        lookups.add_metric(["miss"], c.misses)
        yield lookups
        evictions = CounterMetricFamily(
            "gateway_cache_evictions",
            "Entries removed from the cache, by reason: size (LRU bound), expired (TTL), "
            "invalidated (a key change on the channel), cleared (whole cache, on resubscribe)",
            labels=["reason"],
        )
        evictions.add_metric(["size"], c.evicted_size)
        evictions.add_metric(["expired"], c.expired)
        evictions.add_metric(["invalidated"], c.invalidated)
        evictions.add_metric(["cleared"], c.cleared)
        yield evictions
        yield GaugeMetricFamily("gateway_cache_entries", "Entries in the key cache now", value=len(c))


class KnownStats(Protocol):
    """What the key filter counts (gateway.keytable.keyfilter.KnownKeys)."""

    ready: bool
    refused: int

    def __len__(self) -> int: ...


class _KnownCollector(Collector):
    def __init__(self, known: KnownStats) -> None:
        self.known = known

    def collect(self) -> Iterator[Metric]:
        k = self.known
        yield GaugeMetricFamily(
            "gateway_key_filter_ready",
            "1 while the key filter may refuse unknown keys without Redis",
            value=int(k.ready),
        )
        yield GaugeMetricFamily("gateway_key_filter_keys", "Key hashes in the key filter", value=len(k))
        yield CounterMetricFamily(
            "gateway_key_filter_refusals",
            "Unknown keys refused by the key filter without a Redis read",
            value=k.refused,
        )


class RateStats(Protocol):
    """What the rate-limit store counts (gateway.ratelimit.store.RateStore)."""

    round_trips: int
    ops: int


class _RateCollector(Collector):
    def __init__(self, store: RateStats) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "gateway_ratelimit_redis_round_trips",
            "Batches of rate-limit and credit checks sent to Redis (one round trip each)",
            value=self.store.round_trips,
        )
        yield CounterMetricFamily(
            "gateway_ratelimit_redis_ops",
            "Rate-limit and credit checks sent to Redis (requests without a local slice, and slice top-ups)",
            value=self.store.ops,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests",
            "Requests answered by the proxy, by route and decision code "
            "(forwarded, or the error code the gateway answered with); route '-' when none matched",
            ["route", "code"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "gateway_upstream_duration_seconds",
            "Time spent in the upstream exchange of a forwarded request, from sending it to the last "
            "byte of the response (a 502/504 counts up to the failure), by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "gateway_redis_errors",
            "Redis failures, by operation: lookup (a key read on the request path), subscription "
            "(the invalidation subscription broke), admin (an admin API read or write)",
            ["operation"],
            registry=self.registry,
        )
        self.admin_changes = Counter(
            "gateway_admin_changes",
            "Key changes made through the admin API, by action",
            ["action"],
            registry=self.registry,
        )
        self.invalidations = Counter(
            "gateway_invalidations",
            "Messages on the invalidation channel, by outcome: applied, or ignored_<reason> "
            "(malformed, unsigned, bad_signature)",
            ["outcome"],
            registry=self.registry,
        )
        self.coherent = Gauge(
            "gateway_cache_coherent",
            "1 while the invalidation subscription is live and the cache is trusted; "
            "0 while every key is read from Redis",
            registry=self.registry,
        )
        self.lease_remaining = Gauge(
            "gateway_cache_lease_remaining_seconds",
            "Seconds left of this replica's trust in its cache (the lease from its last answered "
            "subscription PING, bounded by its live-set membership); 0 while it reads every key from Redis",
            registry=self.registry,
        )
        self.migration_pending = Gauge(
            "gateway_layout_migration_pending",
            "1 while this replica's startup move of an earlier version's Redis layout (per-key audit "
            "streams, P id:<id> strings) is running or waiting for a replica of that version to leave; "
            "0 once it is done (or given up with a warning: Redis down)",
            registry=self.registry,
        )
        self.live_replicas = Gauge(
            "gateway_live_replicas",
            "Live replicas seen by this replica's last eviction wait",
            registry=self.registry,
        )
        self.propagation_seconds = Histogram(
            "gateway_propagation_seconds",
            "Time from a key change to every live replica's eviction confirmed",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.unconfirmed = Counter(
            "gateway_propagation_unconfirmed",
            "Key changes answered before every live replica confirmed (the wait timed out)",
            registry=self.registry,
        )
        self.fenced = Counter(
            "gateway_propagation_fenced",
            "Live replicas that a key change's answer did not hear confirm, answered for once their "
            "cache lease had certainly lapsed (summed over answers)",
            registry=self.registry,
        )
        self.reloads = Counter(
            "gateway_config_reloads",
            "SIGHUP reloads of the routes, by outcome: applied, or rejected (the old routes stay)",
            ["outcome"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "gateway_inflight_requests",
            "Proxy requests being handled now (SIGTERM waits for these to finish, up to lifecycle.drain_seconds)",
            registry=self.registry,
        )
        # Webhooks (gateway/webhooks/): labelled by the endpoint's configured name, never its URL.
        self.webhooks_delivered = Counter(
            "gateway_webhooks_delivered",
            "Webhook attempts the endpoint answered with a 2xx status, by endpoint name",
            ["endpoint"],
            registry=self.registry,
        )
        self.webhooks_retried = Counter(
            "gateway_webhooks_retried",
            "Webhook attempts that failed (another status, a timeout, no connection) and were scheduled "
            "again, by endpoint name",
            ["endpoint"],
            registry=self.registry,
        )
        self.webhooks_dropped = Counter(
            "gateway_webhooks_dropped",
            "Webhook events given up, by endpoint name and reason: expired (attempts failed for the whole "
            "retry horizon), queue_full (webhooks.max_queue events were waiting), too_large (payload over 64 KiB)",
            ["endpoint", "reason"],
            registry=self.registry,
        )
        self.webhooks_queued = Gauge(
            "gateway_webhooks_queued",
            "Webhook events waiting in Redis for delivery to the endpoint, as this replica last saw it",
            ["endpoint"],
            registry=self.registry,
        )
        self.ratelimit_store_error_decisions = Counter(
            "gateway_ratelimit_store_error_decisions",
            "Requests decided by a rate limit's on_store_error because Redis failed or did not answer "
            "in time, by route and decision (denied: 503 ratelimit_unavailable; allowed: passed unchecked)",
            ["route", "decision"],
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str], Counter] = {}
        self._upstream_children: dict[str, Histogram] = {}

    def watch_cache(self, cache: CacheStats) -> None:
        self.registry.register(_CacheCollector(cache))

    def watch_ratelimit(self, store: RateStats) -> None:
        self.registry.register(_RateCollector(store))

    def watch_known(self, known: KnownStats) -> None:
        self.registry.register(_KnownCollector(known))

    def request(self, route: str, code: str) -> None:
        child = self._request_children.get((route, code))
        if child is None:
            child = self._request_children[(route, code)] = self.requests.labels(route, code)
        child.inc()

    def upstream(self, route: str, seconds: float) -> None:
        child = self._upstream_children.get(route)
        if child is None:
            child = self._upstream_children[route] = self.upstream_seconds.labels(route)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
