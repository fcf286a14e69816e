"""Prometheus metrics, one registry per process (prometheus-client).

Labels are route names and decision codes from a fixed set: never a key, a
token or a raw path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests",
            "Requests answered by the proxy, by route and decision code "
            "(forwarded, or the error code the gateway answered with)",
            ["route", "code"],
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

    def request(self, route: str, code: str) -> None:
        self.requests.labels(route, code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
