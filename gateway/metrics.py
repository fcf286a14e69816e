"""Prometheus metrics, one registry per process (prometheus-client).

Labels are route names and decision codes from a fixed set: never a key, a
token or a raw path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
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

    def request(self, route: str, code: str) -> None:
        self.requests.labels(route, code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
