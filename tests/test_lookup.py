"""Single flight and the generation rule (gateway/keytable/lookup.py, spec 8), as pure decision logic.

KeyLookup reads keys through `store.get_by_hash`; here that is a fake key reader whose every read
blocks on an asyncio.Event until the test releases it, so a read is "in flight" for exactly as long
as the test says, with no Redis and no sleeps. tests/test_fastpath.py keeps one test of single
flight through a real Redis (held by CLIENT PAUSE) and shows the rest on the request path;
tests/test_coherence.py shows the stale-refill race against a real Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable
from typing import TypeVar

import pytest
from redis.exceptions import TimeoutError as RedisTimeout

from gateway.keytable.cache import MISS, KeyCache
from gateway.keytable.lease import Coherence
from gateway.keytable.lookup import AuthUnavailable, KeyLookup
from gateway.keytable.record import KeyRecord

WAIT = 5.0  # the most any step may take before the test calls it a hang
T = TypeVar("T")


def key_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class FakeReader:
    """The key table as KeyLookup reads it. A read records itself, answers from `table` as it was
    when the read began (the reply Redis would have sent), and is held until its key is released."""

    def __init__(self) -> None:
        self.table: dict[str, KeyRecord] = {}
        self.reads: list[str] = []
        self.waiting: dict[str, int] = {}
        self.fail: dict[str, BaseException] = {}
        self._release: dict[str, asyncio.Event] = {}
        self._changed = asyncio.Event()

    def gate(self, h: str) -> asyncio.Event:
        return self._release.setdefault(h, asyncio.Event())

    def release(self, h: str) -> None:
        self.gate(h).set()

    async def until_waiting(self, h: str, count: int = 1) -> None:
        """Until `count` reads of `h` are held (no polling: each read wakes this)."""
        async with asyncio.timeout(WAIT):
            while self.waiting.get(h, 0) < count:
                self._changed.clear()
                await self._changed.wait()

    async def get_by_hash(self, h: str) -> KeyRecord | None:
        self.reads.append(h)
        answer = self.table.get(h)
        self.waiting[h] = self.waiting.get(h, 0) + 1
        self._changed.set()
        try:
            await self.gate(h).wait()
        finally:
            self.waiting[h] -= 1
        if h in self.fail:
            raise self.fail[h]
        return answer


def coherent() -> Coherence:
    coherence = Coherence(lease_seconds=3600)  # the lease (tests/test_lease.py) never ends here
    coherence.restored()
    return coherence


def lookup_with(reader: FakeReader, *, serve_stale_seconds: float = 0, ttl: float = 30) -> tuple[KeyLookup, KeyCache]:
    """A lookup over `reader`; ttl=0 caches nothing, so only single flight can save a read."""
    cache = KeyCache(ttl, ttl, 100)
    return KeyLookup(reader, cache, coherent(), serve_stale_seconds), cache  # type: ignore[arg-type]


def record(h: str) -> KeyRecord:
    return KeyRecord(id="k_" + h[:8], hash=h, name="n", owner="acme")


async def bounded(aw: Awaitable[T]) -> T:
    async with asyncio.timeout(WAIT):
        return await aw


async def test_concurrent_lookups_of_one_key_share_one_read() -> None:
    reader = FakeReader()
    lookup, cache = lookup_with(reader)
    h = key_hash("one")
    reader.table[h] = record(h)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(lookup.find(h)) for _ in range(20)]
        await reader.until_waiting(h)  # every lookup was runnable before the first read woke us: all have joined
        assert reader.reads == [h], "a lookup did not join the read in flight"
        reader.release(h)
    assert [t.result() for t in tasks] == [reader.table[h]] * 20
    assert reader.reads == [h]
    assert cache.get(h) == reader.table[h]  # and the answer is cached: the next lookup reads nothing
    assert await lookup.find(h) == reader.table[h]
    assert reader.reads == [h]


async def test_an_unknown_key_shares_one_read_and_is_remembered_as_unknown() -> None:
    reader = FakeReader()
    lookup, _ = lookup_with(reader)
    h = key_hash("unknown")
    tasks = [asyncio.ensure_future(lookup.find(h)) for _ in range(10)]
    await reader.until_waiting(h)
    reader.release(h)
    assert await bounded(asyncio.gather(*tasks)) == [None] * 10
    assert await lookup.find(h) is None
    assert reader.reads == [h]


async def test_lookups_of_distinct_keys_each_read() -> None:
    reader = FakeReader()
    lookup, _ = lookup_with(reader)
    hashes = [key_hash(f"distinct-{i}") for i in range(10)]
    tasks = [asyncio.ensure_future(lookup.find(h)) for h in hashes]
    for h in hashes:
        await reader.until_waiting(h)  # every read is held at once: none waited for another
    for h in hashes:
        reader.release(h)
    assert await bounded(asyncio.gather(*tasks)) == [None] * 10
    assert sorted(reader.reads) == sorted(hashes)


async def test_a_read_begun_before_an_eviction_is_not_joined_and_its_answer_is_not_cached() -> None:
    """The generation rule: A's read began before the eviction, so B (after it) reads for itself and
    gets the new state; A gets the answer it asked for, served to A only and never cached."""
    reader = FakeReader()
    lookup, cache = lookup_with(reader)
    h = key_hash("generation")
    old = reader.table[h] = record(h)
    a = asyncio.ensure_future(lookup.find(h))
    await reader.until_waiting(h)  # A's read has the old state and is held
    new = reader.table[h] = old.bump(enabled=False)
    cache.evict(h)  # the invalidation lands while A's read is in flight
    b = asyncio.ensure_future(lookup.find(h))
    await reader.until_waiting(h, 2)  # B did not join A's read: it is a second read
    reader.release(h)
    assert await bounded(a) == old
    assert await bounded(b) == new
    assert reader.reads == [h, h]
    assert cache.get(h) == new  # B's answer, read after the eviction, may be cached; A's never was


async def test_a_read_begun_before_an_eviction_never_caches_even_when_it_ends_last() -> None:
    reader = FakeReader()
    lookup, cache = lookup_with(reader)
    h = key_hash("late")
    old = reader.table[h] = record(h)
    a = asyncio.ensure_future(lookup.find(h))
    await reader.until_waiting(h)
    cache.evict(h)
    reader.table[h] = old.bump(enabled=False)
    reader.release(h)
    assert await bounded(a) == old
    assert cache.get(h) is MISS


async def test_a_lookup_after_the_read_began_but_before_any_eviction_joins_it() -> None:
    """The other side of the rule: a flight of the current generation is joined."""
    reader = FakeReader()
    lookup, cache = lookup_with(reader, ttl=0)  # nothing cached: B's answer can only come from A's read
    h = key_hash("join")
    reader.table[h] = record(h)
    cache.evict(key_hash("another key"))  # an eviction *before* A's read: A's flight is current
    a = asyncio.ensure_future(lookup.find(h))
    await reader.until_waiting(h)
    b = asyncio.ensure_future(lookup.find(h))
    await asyncio.sleep(0)  # one loop step, no time: B runs up to the shared future and waits there
    reader.release(h)
    assert await bounded(a) == await bounded(b) == reader.table[h]
    assert reader.reads == [h]


async def test_a_failed_shared_read_makes_every_waiter_answer_auth_unavailable() -> None:
    reader = FakeReader()
    lookup, _ = lookup_with(reader)
    h = key_hash("failing")
    reader.fail[h] = RedisTimeout("the read timed out")
    tasks = [asyncio.ensure_future(lookup.find(h)) for _ in range(5)]
    await reader.until_waiting(h)  # the others ran before the read woke us: they have joined it
    reader.release(h)
    results = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    assert all(isinstance(r, AuthUnavailable) for r in results), results
    assert reader.reads == [h]


async def test_a_failed_shared_read_serves_a_stale_entry_to_every_waiter_when_allowed() -> None:
    reader = FakeReader()
    lookup, cache = lookup_with(reader, serve_stale_seconds=60)
    h = key_hash("stale")
    rec = record(h)
    cache.put(h, rec, cache.generation)
    lookup.coherence.lost()  # incoherent: the cache is not read, only kept for a stale answer
    reader.fail[h] = RedisTimeout("down")
    tasks = [asyncio.ensure_future(lookup.find(h)) for _ in range(3)]
    await reader.until_waiting(h)
    reader.release(h)
    assert await bounded(asyncio.gather(*tasks)) == [rec] * 3
    assert reader.reads == [h]


async def test_when_the_reading_lookup_is_cancelled_a_waiter_reads_for_itself() -> None:
    reader = FakeReader()
    lookup, _ = lookup_with(reader)
    h = key_hash("cancelled")
    reader.table[h] = record(h)
    leader = asyncio.ensure_future(lookup.find(h))
    await reader.until_waiting(h)
    follower = asyncio.ensure_future(lookup.find(h))
    await asyncio.sleep(0)  # one loop step, no time: the follower joins the leader's flight
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    await reader.until_waiting(h)  # the follower's own read
    reader.release(h)
    assert await bounded(follower) == reader.table[h]
    assert reader.reads == [h, h]
