"""A subscription on another server than the commands: its trust must lapse (spec 8, 13).

After a failover the command pool follows the sentinels to the new master, but the subscription
may still be on the demoted master, which goes on answering (a partition, a sentinel slow to
tell). That server never hears the changes the new master publishes. If it could renew the
replica's lease, the replica would go on serving a disabled key from its cache after the disable
was answered. The lease is renewed only by probes the replica publishes through its command
client and hears on its subscription (gateway/coherence/subscriber.py), so a subscription on the
wrong server hears none and its trust lapses.

Real redis-servers: A holds the table; a relay in front of A sends one new connection, the
subscription's reconnect, to B instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from tests.conftest import Gateway, RedisProcess, free_port
from tests.relays import Relay


class Diverting(Relay):
    """A relay to Redis A; the next new connection after `divert_next` is set goes to B instead."""

    def __init__(self, a_port: int, b_port: int) -> None:
        super().__init__(a_port)
        self.b_port = b_port
        self.divert_next = False
        self.diverted = 0

    def port(self) -> int:
        if not self.divert_next:
            return self.redis_port
        self.divert_next, self.diverted = False, self.diverted + 1
        return self.b_port


async def test_a_subscription_left_on_another_server_cannot_keep_a_disabled_key_served(
    gateway_factory: Callable[..., Any], redis_server: RedisProcess, redis: Redis, tmp_path: Path
) -> None:
    other = RedisProcess(free_port(), tmp_path / "b")  # the server the subscription strays to
    other.start()
    relay = Diverting(redis_server.port, other.port)
    await relay.start()
    try:
        gw: Gateway = await gateway_factory(redis_url=relay.url)
        admin: Gateway = await gateway_factory(**{"redis.prefix": gw.replica.store.prefix})  # on A, directly
        coherence, subscriber = gw.replica.coherence, gw.replica.subscriber
        key = await admin.create_key(name="split")
        async with await gw.call("GET", "/api/x", key=key["key"]) as r:
            assert r.status == 200

        # The subscription breaks and comes back on B; the commands stay on A.
        sessions = subscriber.sessions
        relay.divert_next = True
        assert int(await redis.client_kill_filter(_type="pubsub")) >= 1
        deadline = time.monotonic() + 10
        while not (subscriber.sessions > sessions and coherence.coherent):
            assert time.monotonic() < deadline, "the subscription did not come back"
            await asyncio.sleep(0.005)
        assert relay.diverted == 1
        async with await gw.call("GET", "/api/x", key=key["key"]) as r:
            assert r.status == 200  # read from A, cached while trusted

        async with await admin.admin_call("POST", f"/v1/keys/{key['id']}/disable", json={"reason": "split"}) as r:
            assert r.status == 200, await r.text()
        # Answered: from now on, for longer than a lease, the key is refused every time.
        statuses = []
        until = time.monotonic() + 2 * gw.replica.config.redis.lease_seconds + 0.5
        while time.monotonic() < until:
            async with await gw.call("GET", "/api/x", key=key["key"]) as r:
                statuses.append(r.status)
            await asyncio.sleep(0.01)
        assert set(statuses) <= {403, 503}, statuses
    finally:
        await relay.close()
        other.kill()
