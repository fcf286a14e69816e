"""Where a replica's Redis connections go (spec 13): one address, or the master Redis Sentinel names.

Owns the redis-py clients a replica uses: the command client (lookups, admin writes, heartbeats,
acks) and the subscription's own client (retries off, so a break surfaces at once: see
coherence/subscriber.py). With Sentinel, both come from redis-py's `Sentinel.master_for`: every
new connection asks the sentinels for the current master, and a connection that finds its server
demoted (READONLY) fails instead of writing to a replica. A failover therefore looks to the replica
like any other break of the subscription (spec 8): the lease lapses, the cache is not trusted, the
subscriber reconnects (to the new master) and asks the sentinels where the master is, which makes
redis-py drop the command client's idle connections when it moved, so no lookup reads a demoted
master's stale table.

May import: config, redis-py. Nothing of the gateway's own above config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from gateway.config import RedisConfig, SentinelConfig

# Bounded waits: a dead or hung Redis must become a quick 503, not a hung request.
CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 2.0
SENTINEL_TIMEOUT = 0.5  # one sentinel's answer; the next one is asked after it
# A refused connection (no master, no sentinel) is retried this often, this soon: redis-py's default
# (3 retries, backoff up to 10 s) held an admin write or a /readyz ~11 s before its 503.
RETRIES = 2
RETRY_BACKOFF_BASE = 0.05
RETRY_BACKOFF_CAP = 0.25


@dataclass
class RedisTarget:
    """One Redis address (`url`) or a Sentinel-managed master; makes the replica's clients."""

    url: str | None = None
    sentinel: SentinelConfig | None = None
    password: str | None = field(default=None, repr=False)
    _sentinels: list[Sentinel] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def of(cls, config: RedisConfig, url: str | None) -> RedisTarget:
        """`url`: the embedded Redis's, when it is embedded."""
        return cls(url=url if config.sentinel is None else None, sentinel=config.sentinel, password=config.password)

    @property
    def mode(self) -> str:
        return "sentinel" if self.sentinel is not None else "single"

    def describe(self) -> str:
        """For a log line: no password, no URL (it may hold one)."""
        if self.sentinel is None:
            return "one address (redis.url)"
        where = ", ".join(f"{host}:{port}" for host, port in self.sentinel.sentinels)
        return f"sentinel master {self.sentinel.master_name!r} via {where}"

    def command_client(self) -> Redis:
        return self._client(health_check_interval=15)

    def listen_client(self) -> Redis:
        return self._client(retry=Retry(NoBackoff(), 0))

    def writer_client(self) -> Redis:
        """One connection: a change and its WAIT must share it (keytable/store.py, Durability)."""
        return self._client(max_connections=1, health_check_interval=15)

    def _client(self, **options: Any) -> Redis:
        options.update(socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT)
        options.setdefault("retry", Retry(ExponentialBackoff(cap=RETRY_BACKOFF_CAP, base=RETRY_BACKOFF_BASE), RETRIES))
        if self.password is not None:
            options["password"] = self.password
        if self.sentinel is None:
            assert self.url is not None
            return Redis.from_url(self.url, **options)
        sentinel_options: dict[str, Any] = {
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            "socket_timeout": SENTINEL_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),  # a sentinel that does not answer: the next one is asked
        }
        if self.sentinel.password is not None:
            sentinel_options["password"] = self.sentinel.password
        if self.sentinel.tls:
            sentinel_options["ssl"] = True
            options["ssl"] = True
        manager = Sentinel(list(self.sentinel.sentinels), sentinel_kwargs=sentinel_options, **options)  # type: ignore[no-untyped-call]
        self._sentinels.append(manager)
        client: Redis = manager.master_for(self.sentinel.master_name, redis_class=Redis, **options)
        return client

    async def aclose(self) -> None:
        """Close the connections to the sentinels (the clients close their own)."""
        for manager in self._sentinels:
            for client in manager.sentinels:
                await client.aclose()
        self._sentinels.clear()
