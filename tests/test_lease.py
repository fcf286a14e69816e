"""Spec 8, trust as a lease: a replica whose subscription goes silent without closing stops
answering from its cache before a disable's answer, which reports it `fenced`.

The lease arithmetic is tested with a fake clock. The test that counts runs three real
`gateway serve` processes (as tests/test_replicas.py does) on one redis-server; the third reaches
Redis only through a TCP relay written here, which can freeze the bytes in both directions without
closing a socket (a half-open link). Clients send the key to all three replicas the whole time,
and a recording upstream notes when each request arrives and with which key id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.keytable import record as keys
from gateway.keytable.lease import (
    CLOCK_RATE_MARGIN,
    IN_FLIGHT_MARGIN,
    Coherence,
    lease_lapsed_by,
    membership_trusted_until,
)
from gateway.keytable.record import KeyRecord
from gateway.runtime.replica import Replica
from tests.conftest import AdminTokens, Gateway, RedisProcess
from tests.kernel_stamps import stamped_request, stamped_rfile
from tests.relays import LoopThread, Relay
from tests.test_replicas import (
    START_TIMEOUT,
    Cluster,
    EchoHandler,
    Hammer,
    Node,
    gateway_config,
    hammering,
    redis_process,
    serving,
    start_gateway,
    stop_gateway,
    wait_ready,
    wait_until,
)

LEASE = 1.0  # redis.lease_seconds (the default)
# Long enough that the silent replica's health check never notices within a round, so only the
# lease can keep it from serving a disabled key (and its heartbeat keeps it in the live set).
HEALTH_CHECK_SECONDS = 3.0
DISABLES = 20
# The relay test's lease and ack wait: half the defaults, so its 20 partitioned rounds (each waits
# the lease out) take half the time; what it shows does not depend on their length.
RELAY_LEASE = 0.5
# Between one answer and a client's next request: about 300 requests a second to each replica,
# a request every few milliseconds around each answer, without keeping both CPUs busy.
HAMMER_PAUSE = 0.002


# the lease arithmetic, with a fake clock -------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_trust_runs_from_the_send_time_of_an_answered_ping_for_one_lease() -> None:
    clock = FakeClock()
    coherence = Coherence(clock, lease_seconds=LEASE)
    assert not coherence.coherent and coherence.remaining() == 0.0  # never subscribed

    coherence.restored(lease_from=999.5, member_until=math.inf)  # SUBSCRIBE sent 0.5 s ago
    assert coherence.coherent
    assert coherence.remaining() == pytest.approx(0.5)

    coherence.renew(999.9)  # a PING sent at 999.9, its reply read now (at 1000.0)
    assert coherence.lease_until == pytest.approx(999.9 + LEASE)
    clock.now = 999.9 + LEASE - 1e-6
    assert coherence.coherent
    clock.now = 999.9 + LEASE
    assert not coherence.coherent, "the lease counts from the send, not from the reply"
    assert coherence.broken_for() == pytest.approx(0.0)
    clock.now += 0.25
    assert coherence.broken_for() == pytest.approx(0.25)  # broken since the lease ran out

    coherence.renew(1000.5)  # a later reply (the link came back, nothing was missed)
    assert coherence.coherent and coherence.remaining() == pytest.approx(1000.5 + LEASE - clock.now)


def test_a_late_reply_to_an_old_ping_extends_only_to_its_own_send_time_plus_the_lease() -> None:
    clock = FakeClock()
    coherence = Coherence(clock, lease_seconds=LEASE)
    coherence.restored(lease_from=1000.0)
    coherence.renew(1000.75)
    coherence.renew(1000.25)  # an older PING answered later: shortens nothing, extends nothing
    assert coherence.lease_until == pytest.approx(1000.75 + LEASE)

    clock.now = 1003.0
    coherence.renew(1001.0)  # a reply, 2 s late, to a PING sent at 1001: trust ended at 1002
    assert not coherence.coherent
    coherence.renew(1002.5)
    assert coherence.coherent and coherence.lease_until == pytest.approx(1003.5)


def test_trust_ends_before_the_live_set_membership_can_expire_and_with_the_session() -> None:
    clock = FakeClock()
    coherence = Coherence(clock, lease_seconds=LEASE)
    ttl = 3.0
    coherence.restored(lease_from=1000.0, member_until=membership_trusted_until(999.0, ttl))
    member_end = 999.0 + ttl * (1 - CLOCK_RATE_MARGIN) - IN_FLIGHT_MARGIN
    assert member_end < 999.0 + ttl  # before Redis could expire the member (its TTL starts later)
    for t in (1000.5, 1001.0, 1001.5, 1002.0):  # the lease is renewed the whole time...
        coherence.renew(t)
    clock.now = member_end - 1e-6
    assert coherence.coherent
    clock.now = member_end
    assert not coherence.coherent, "...but no heartbeat succeeded: the membership bound ends the trust"
    coherence.membership(membership_trusted_until(1001.8, ttl))  # a heartbeat sent at 1001.8 succeeded
    assert coherence.coherent

    coherence.lost()  # a break: no lease or membership trusts the cache any more
    assert not coherence.coherent and coherence.remaining() == 0.0
    coherence.renew(clock.now)
    assert not coherence.coherent, "a reply on a broken session restores nothing"
    coherence.restored(lease_from=clock.now, member_until=membership_trusted_until(clock.now, ttl))
    assert coherence.coherent


def test_the_answer_waits_past_every_lease_granted_before_the_write() -> None:
    written = 500.0
    fenced_at = lease_lapsed_by(written, LEASE)
    assert fenced_at == pytest.approx(written + LEASE * (1 + CLOCK_RATE_MARGIN) + IN_FLIGHT_MARGIN)
    # The latest lease a replica can hold without having seen the evict: from a PING sent no later
    # than the write, on a clock running up to CLOCK_RATE_MARGIN slower than ours.
    latest = written + LEASE * (1 + CLOCK_RATE_MARGIN)
    assert fenced_at - latest == pytest.approx(IN_FLIGHT_MARGIN)
    assert 0.05 <= IN_FLIGHT_MARGIN <= 0.1
    assert fenced_at - written < 1.5, "a partitioned disable must answer within about 1.5 s"


# a relay that can freeze -----------------------------------------------------------------------


@dataclass
class _Link:
    subscription: bool = False  # the client sent SUBSCRIBE on it


class FreezingRelay:
    """A TCP relay on loopback to a redis-server (tests/relays.py), run by its own event loop in a thread.

    `freeze()` stops the bytes in both directions on the subscription connections (or, with
    everything=True, on every connection) without closing any socket: a held chunk waits, nothing
    more is read, and the kernel buffers fill as on a half-open link. `thaw()` lets it all through
    in order. When `freeze` returns, no further byte crosses a frozen connection."""

    def __init__(self, target_port: int) -> None:
        self.links: list[_Link] = []
        self._frozen: str | None = None  # None, "subscriptions" or "all"
        self._relay = _Freezable(target_port, self)
        self._background: LoopThread | None = None
        self._thawed: asyncio.Event | None = None

    def start(self) -> None:
        self._background = LoopThread("relay")
        self._call(self._start())

    def _call(self, coro: Any) -> Any:
        assert self._background is not None
        return self._background.run(coro, 10)

    async def _start(self) -> None:
        self._thawed = asyncio.Event()
        self._thawed.set()
        await self._relay.start()

    @property
    def url(self) -> str:
        return self._relay.url

    def freeze(self, *, everything: bool = False) -> None:
        self._call(self._set("all" if everything else "subscriptions"))

    def thaw(self) -> None:
        self._call(self._set(None))

    async def _set(self, frozen: str | None) -> None:
        assert self._thawed is not None
        self._frozen = frozen
        if frozen is None:
            self._thawed.set()
        else:
            self._thawed.clear()

    async def pipe(self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter, upward: bool) -> None:
        assert self._thawed is not None
        while data := await source.read(65536):
            if upward and b"SUBSCRIBE" in data:
                link.subscription = True
            while self._frozen == "all" or (self._frozen == "subscriptions" and link.subscription):
                await self._thawed.wait()
            sink.write(data)
            await sink.drain()

    def close(self) -> None:
        if self._background is None:
            return

        async def stop() -> None:
            await self._set(None)
            await self._relay.close()

        with contextlib.suppress(Exception):
            self._call(stop())
        self._background.stop()


class _Freezable(Relay):
    """The relay itself, on FreezingRelay's loop: each connection is a `_Link` it can hold."""

    def __init__(self, redis_port: int, owner: FreezingRelay) -> None:
        super().__init__(redis_port)
        self.owner = owner

    def _state(self, link: dict[str, object]) -> _Link:
        state = link.get("state")
        if state is None:
            state = link["state"] = _Link()
            self.owner.links.append(state)
        assert isinstance(state, _Link)
        return state

    async def up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: dict[str, object]) -> None:
        await self.owner.pipe(self._state(link), r, w, True)

    async def down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: dict[str, object]) -> None:
        await self.owner.pipe(self._state(link), r, w, False)


# a recording upstream ----------------------------------------------------------------------------


@dataclass
class Arrivals:
    lock: threading.Lock = field(default_factory=threading.Lock)
    by_key: dict[str, list[float]] = field(default_factory=dict)

    def record(self, key_id: str | None, at: float) -> None:
        """`at`: the kernel's receive time of the request's head (tests/kernel_stamps.py)."""
        with self.lock:
            self.by_key.setdefault(key_id or "-", []).append(at)

    def of(self, key_id: str) -> list[float]:
        with self.lock:
            return list(self.by_key.get(key_id, []))


@contextlib.contextmanager
def recording_upstream() -> Iterator[tuple[str, Arrivals]]:
    arrivals = Arrivals()

    class Recording(EchoHandler):
        def setup(self) -> None:
            super().setup()
            # Arrivals are stamped by the kernel as the bytes come, not when this thread gets the
            # CPU: other test processes keep both CPUs busy (see tests/kernel_stamps.py).
            self.rfile.close()  # the makefile() reader; the socket stays open
            self.rfile, self.stamps = stamped_rfile(self.connection)

        def arrived(self) -> None:
            assert self.stamps.stamp is not None
            arrivals.record(self.headers.get("X-Gateway-Key-Id"), self.stamps.stamp)

    with serving(Recording, stop_timeout=10, stamped=True) as url:
        yield url, arrivals


# one replica in process: the lease lapses, and an answered PING restores it -----------------------


@pytest.fixture
def relay(redis_server: RedisProcess) -> Iterator[FreezingRelay]:
    link = FreezingRelay(redis_server.port)
    link.start()
    yield link
    link.close()


def lease_gauge(replica: Replica) -> float:
    value = replica.metrics.registry.get_sample_value("gateway_cache_lease_remaining_seconds")
    assert value is not None
    return value


async def until(what: str, predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.002)


async def test_a_silent_subscription_ends_the_trust_within_the_lease_and_the_next_answered_ping_restores_it(
    relay: FreezingRelay, gateway_factory: Callable[..., Any], redis: Redis
) -> None:
    """Only the subscription freezes (commands still reach Redis); the health check is far off.
    The cache stops being trusted within one lease of the freeze: a change made behind its back
    is seen at once. When the link thaws, the replies to the pings come back in order after
    whatever was published meanwhile, so the same session trusts the same cache again."""
    lease = 0.4
    gw: Gateway = await gateway_factory(
        redis_url=relay.url, **{"redis.health_check_seconds": 10, "redis.lease_seconds": lease}
    )
    replica = gw.replica
    created = await gw.create_key()
    key, key_hash = created["key"], keys.digest(created["key"])
    prefix = replica.config.redis.prefix
    async with await gw.call("GET", "/api/x", key=key) as r:
        assert r.status == 200
    entry = replica.cache.get(key_hash)
    assert isinstance(entry, KeyRecord)
    sessions = replica.subscriber.sessions
    assert 0 < lease_gauge(replica) <= lease
    enabled_json, disabled_json = entry.to_json(), entry.bump(enabled=False).to_json()

    relay.freeze()
    frozen_at = time.monotonic()
    await until("the trust did not end", lambda: not replica.coherence.coherent)
    # It ended at the lease's end (not when this loop, maybe late, looked): that is at most a lease
    # after the freeze, since the last probe heard was sent before it.
    assert replica.coherence.lease_until <= frozen_at + lease, replica.coherence.lease_until - frozen_at
    assert lease_gauge(replica) == 0
    assert replica.subscriber.sessions == sessions, "the health check (10 s) has not noticed anything"
    assert replica.cache.get(key_hash) is entry  # still held, but not trusted:
    await redis.set(f"{prefix}k:{key_hash}", disabled_json)  # a change behind the cache's back
    async with await gw.call("GET", "/api/x", key=key) as r:
        assert (r.status, (await r.json())["error"]["code"]) == (403, "key_disabled")
    async with gw.session.get(gw.admin_url + "/readyz") as r:
        assert r.status == 503
    await redis.set(f"{prefix}k:{key_hash}", enabled_json)

    relay.thaw()
    await until("the trust did not come back", lambda: replica.coherence.coherent)
    assert replica.subscriber.sessions == sessions, "no resubscription was needed"
    assert replica.cache.get(key_hash) is entry, "nothing was missed, so the cache was not cleared"
    assert 0 < lease_gauge(replica) <= lease
    await redis.set(f"{prefix}k:{key_hash}", disabled_json)  # behind its back again: now the cache answers
    async with await gw.call("GET", "/api/x", key=key) as r:
        assert r.status == 200
    await redis.set(f"{prefix}k:{key_hash}", enabled_json)


# the test that counts ----------------------------------------------------------------------------


@dataclass
class Round:
    partitioned: bool
    everything: bool  # the whole replica's Redis traffic frozen, not only its subscription
    elapsed: float  # the disable call, client side, seconds
    propagation: dict[str, Any]
    answered: float  # the kernel's receive time of the answer (CLOCK_REALTIME, as the arrivals)
    late: list[float]  # arrivals at the upstream with the key after the answer (seconds after it)
    closest: float  # the last arrival with the key before the answer, seconds before it
    served_frozen: int  # 200s the frozen replica answered for requests sent after the disable began


def disable_round(
    cluster: Cluster,
    arrivals: Arrivals,
    relay: FreezingRelay,
    *,
    index: int,
    partitioned: bool,
    everything: bool = False,
) -> Round:
    """A fresh key, cached and being served by all three replicas; (freeze;) disable; traffic goes
    on past the answer; (thaw). What reached the upstream with that key after the answer is noted."""
    created = cluster.create_key(via=index % 2)
    key, key_id = created["key"], created["id"]
    frozen_node = cluster.nodes[2]
    with hammering([(node, key) for node in cluster.nodes], pause=HAMMER_PAUSE) as hammers:
        wait_until(
            lambda: all(sum(s.status == 200 for s in h.sent) >= 5 for h in hammers),
            10,
            "the clients did not get 200s from every replica",
        )
        if partitioned:
            relay.freeze(everything=everything)
        started = time.monotonic()
        status, body, answered = stamped_disable(cluster, key_id, via=index % 2)  # never the frozen replica
        elapsed = time.monotonic() - started
        assert status == 200, body
        # Traffic on, well past the answer: anything the frozen replica still forwarded would show.
        time.sleep(0.3)
        relay.thaw()
    if partitioned:
        wait_ready(frozen_node, 15)
        wait_until(lambda: cluster.live_replicas() == 3, 10, "the thawed replica is not in the live set")
    errors = [e for h in hammers for e in h.errors]
    frozen_hammer: Hammer = hammers[2]
    assert not errors or partitioned, errors
    seen = arrivals.of(key_id)
    before = [t for t in seen if t <= answered]
    assert before, "no request with the key reached the upstream"
    return Round(
        partitioned=partitioned,
        everything=everything,
        elapsed=elapsed,
        propagation=body["propagation"],
        answered=answered,
        late=[t - answered for t in seen if t > answered],
        closest=answered - max(before),
        served_frozen=sum(s.status == 200 and s.at > started for s in frozen_hammer.sent),
    )


def stamped_disable(cluster: Cluster, key_id: str, via: int) -> tuple[int, Any, float]:
    """Cluster.disable, and when the kernel received its answer (tests/kernel_stamps.py)."""
    node = cluster.nodes[via]
    status, raw, answered = stamped_request(
        "POST",
        f"{node.admin_url}/v1/keys/{key_id}/disable",
        {"Authorization": f"Bearer {node.tokens.developer}", "Content-Type": "application/json"},
        json.dumps({"reason": "replicas test"}).encode(),
    )
    return status, json.loads(raw), answered


@contextlib.contextmanager
def cluster_with_relay(workdir: Path, tokens: AdminTokens) -> Iterator[tuple[Cluster, Arrivals, FreezingRelay]]:
    with (
        recording_upstream() as (upstream_url, arrivals),
        redis_process(workdir / "redis") as server,
    ):
        relay = FreezingRelay(server.port)
        relay.start()
        prefix = f"lease{secrets.token_hex(4)}:"
        nodes: list[Node] = []
        try:
            for i, url in enumerate((server.url, server.url, relay.url)):
                raw = gateway_config(upstream_url, tokens, url, prefix, health_check_seconds=HEALTH_CHECK_SECONDS)
                raw["redis"]["lease_seconds"] = RELAY_LEASE
                raw.setdefault("admin", {})["propagation_timeout_seconds"] = RELAY_LEASE
                nodes.append(start_gateway(workdir, f"replica{i}", raw, tokens))
            cluster = Cluster(nodes, server.url, prefix, None, tokens)
            cluster.wait_all_ready(START_TIMEOUT)
            wait_until(lambda: cluster.live_replicas() == 3, 10, "not every replica joined the live set")
            assert any(link.subscription for link in relay.links), "the third replica does not subscribe via the relay"
            yield cluster, arrivals, relay
        finally:
            relay.thaw()
            for node in nodes:
                stop_gateway(node)
            relay.close()


def figures(rounds: list[Round]) -> str:
    elapsed = [r.elapsed * 1000 for r in rounds]
    ms = [float(r.propagation["ms"]) for r in rounds]
    return (
        f"answer (client side) median {statistics.median(elapsed):.1f} ms, max {max(elapsed):.1f} ms; "
        f"propagation.ms median {statistics.median(ms):.1f}, max {max(ms):.1f}; "
        f"closest forwarded request before an answer {min(r.closest for r in rounds) * 1000:.1f} ms"
    )


@pytest.mark.slow
def test_a_replica_whose_subscription_goes_silent_is_fenced_by_its_lease_and_forwards_nothing_after_the_answer(
    tmp_path: Path, admin_tokens: AdminTokens
) -> None:
    with cluster_with_relay(tmp_path, admin_tokens) as (cluster, arrivals, relay):
        healthy = [disable_round(cluster, arrivals, relay, index=i, partitioned=False) for i in range(DISABLES)]
        # Every other round the replica's command connection freezes too (its heartbeat stalls,
        # it stays in the live set until its TTL); the others freeze only its subscription.
        partitioned = [
            disable_round(cluster, arrivals, relay, index=i, partitioned=True, everything=i % 2 == 1)
            for i in range(DISABLES)
        ]
        after = disable_round(cluster, arrivals, relay, index=0, partitioned=False)

    print(f"\nhealthy disables ({len(healthy)}): {figures(healthy)}")
    print(f"partitioned disables ({len(partitioned)}): {figures(partitioned)}")
    served = [r.served_frozen for r in partitioned]
    print(f"frozen replica's 200s for requests sent after the disable began (before its answer): {served}")

    for i, r in enumerate([*healthy, after]):
        assert r.late == [], f"healthy round {i}: the key reached the upstream {r.late} s after the answer"
        assert r.propagation == {**r.propagation, "replicas": 3, "confirmed": 3, "fenced": 0}, (i, r.propagation)
    for i, r in enumerate(partitioned):
        assert r.late == [], (
            f"partitioned round {i} (everything frozen: {r.everything}): the key reached the upstream "
            f"{[round(t * 1000, 1) for t in r.late]} ms after the answer {r.propagation}"
        )
        assert r.propagation == {**r.propagation, "replicas": 3, "confirmed": 2, "fenced": 1}, (i, r.propagation)
        # It waited for the lease to lapse, and no longer than half a second more.
        assert r.propagation["ms"] >= RELAY_LEASE * 1000, (i, r.propagation)
        assert r.elapsed < RELAY_LEASE + 0.5, (i, r.elapsed, r.propagation)
    # The lease is what fenced it: the frozen replica was still answering from its cache after
    # the freeze (so it did hold the key) in most rounds.
    assert sum(r.served_frozen > 0 for r in partitioned) >= DISABLES // 2, [r.served_frozen for r in partitioned]
    healthy_ms = sorted(r.elapsed * 1000 for r in healthy)
    assert statistics.median(healthy_ms) < 100, healthy_ms
    assert healthy_ms[-1] < 500, healthy_ms
