"""The key filter at scale (issue 15): the sorted 64-bit array, its delta set, and the numpy scan.

- KeyStore.hash_prefixes, against the session's real redis-server: over several SCAN replies it
  yields the first 64 bits of every record's hash, each exactly (top bit set included), and skips
  names that are not a record of this table (upper-case or short digests, a nested prefix's keys),
  the prefix matched literally, glob characters included;
- KnownKeys: no hash it was given is ever "absent" (through the rebuild, the delta set and every
  merge of the delta into the array), neighbours of a held 64-bit value are absent (the values are
  compared exactly, never as floats), it holds about 8 bytes a key, and a rebuild interrupted by a
  break leaves it not ready;
- the change log: a replica whose subscription broke while keys were created, imported and
  rotated in on another replica catches up from the global audit stream without a single SCAN
  and accepts every such key; with an entry of the log removed meanwhile it falls back to the full
  scan (and still accepts them); the log says "cannot tell" across Redis processes, after a trim,
  and past its limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import orjson
import pytest
from redis.asyncio import Redis

from gateway.keytable import record as keys
from gateway.keytable.keyfilter import KnownKeys, Prefixes
from gateway.keytable.store import KeyStore
from tests.conftest import Gateway, command_calls, migrations_over
from tests.test_known import WAIT, filter_ready, hold_resubscription, proxy, random_key, settle, two_replicas, until

# Writes n records' names server-side (fast): hash i = sha1(seed..i) .. first 24 hex of sha1('x'..seed..i).
FILL = """
for i = 1, tonumber(ARGV[3]) do
  local h = redis.sha1hex(ARGV[2] .. i) .. string.sub(redis.sha1hex('x' .. ARGV[2] .. i), 1, 24)
  redis.call('SET', ARGV[1] .. 'k:' .. h, '{}')
end
"""


def filled_hashes(seed: str, n: int) -> list[str]:
    def sha1(text: str) -> str:
        return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    return [sha1(f"{seed}{i}") + sha1(f"x{seed}{i}")[:24] for i in range(1, n + 1)]


async def collect(batches: AsyncIterator[Prefixes]) -> list[int]:
    return [int(x) for batch in [b async for b in batches] for x in batch.tolist()]


async def test_hash_prefixes_yields_every_records_first_64_bits_and_only_this_tables(redis: Redis) -> None:
    prefix = f"ks[{secrets.token_hex(3)}]*:"
    seed = secrets.token_hex(4)
    n = 5000
    await redis.eval(FILL, 0, prefix, seed, n)  # type: ignore[misc]
    top = "ff" * 8 + "00" * 24  # top bit set: exactly 2^64 - 1 in its first 64 bits
    await redis.set(prefix + "k:" + top, "{}")
    not_ours = [
        prefix + "k:" + "A" * 64,  # upper case: not a digest this table writes
        prefix + "k:" + "a" * 63,
        prefix + "k:" + "a" * 65,
        prefix + "k:nested:" + "b" * 64,
        prefix.replace("*", "x") + "k:" + "c" * 64,  # a prefix the glob would match, were it not escaped
    ]
    for name in not_ours:
        await redis.set(name, "{}")
    store = KeyStore(redis, prefix)
    batches = [b async for b in store.hash_prefixes(count=500)]
    assert len(batches) > 3, "the table must take several SCAN replies"
    got = sorted(int(x) for batch in batches for x in batch.tolist())
    expected = sorted([int(h[:16], 16) for h in filled_hashes(seed, n)] + [2**64 - 1])
    # SCAN may return a name twice; each present once at least, nothing else.
    assert sorted(set(got)) == expected
    # The same table as `hashes` (the readable scan the webhooks use) sees it.
    assert {int(h[:16], 16) async for h in store.hashes()} == set(expected)


def digest(n: int) -> str:
    return hashlib.sha256(n.to_bytes(8, "big")).hexdigest()


async def batches_of(hashes: list[str], size: int) -> AsyncIterator[Prefixes]:
    for start in range(0, len(hashes), size):
        yield np.array([int(h[:16], 16) for h in hashes[start : start + size]], np.uint64)


async def test_no_hash_given_is_ever_absent_through_rebuilds_deltas_and_merges() -> None:
    known = KnownKeys()
    table = [digest(i) for i in range(100_000)]
    assert await known.rebuild(batches_of(table + table[:10], 7000)) is True  # duplicates, as SCAN may give
    assert len(known) == len(table)
    # Announced keys: some new, some re-announcements of keys it holds; several merges of the delta.
    announced = [digest(i) for i in range(90_000, 110_000)]
    for n, key_hash in enumerate(announced):
        known.add(key_hash)
        if n % 997 == 0:
            assert not any(known.absent(h) for h in announced[: n + 1])
    held = table + announced
    assert len(known) == 110_000
    assert not any(known.absent(h) for h in held)
    assert known.refused == 0
    strangers = [digest(i) for i in range(200_000, 210_000)]
    assert all(known.absent(h) for h in strangers)
    assert known.refused == len(strangers)
    assert known.nbytes / len(known) <= 16

    # A second rebuild (a resubscription) keeps everything, announced keys included.
    assert await known.rebuild(batches_of(table, 50_000)) is True
    assert len(known) == 110_000 and not any(known.absent(h) for h in held)


async def test_values_are_compared_exactly_at_the_top_of_the_64_bit_range() -> None:
    known = KnownKeys()
    top = "ffffffffffffff00" + "0" * 48
    assert await known.rebuild(batches_of([top, "8000000000000000" + "0" * 48], 10)) is True
    known.add("ffffffffffffff10" + "0" * 48)  # into the delta
    for held in (top, "8000000000000000" + "1" * 48, "ffffffffffffff10" + "f" * 48):
        assert not known.absent(held)
    # Neighbours a float64 comparison could not tell apart from the held values.
    for neighbour in ("ffffffffffffff01", "fffffffffffffeff", "8000000000000001", "7fffffffffffffff"):
        assert known.absent(neighbour + "0" * 48), neighbour


async def test_a_break_during_a_batched_rebuild_leaves_it_not_ready() -> None:
    known = KnownKeys()
    table = [digest(i) for i in range(10_000)]

    async def broken() -> AsyncIterator[Prefixes]:
        n = 0
        async for batch in batches_of(table, 1000):
            n += 1
            if n == 3:
                known.lost()
            yield batch

    assert await known.rebuild(broken()) is False
    assert not known.ready and not any(known.absent(h) for h in [*table[:10], digest(10**6)])
    assert await known.rebuild(batches_of(table, 1000)) is True
    assert not any(known.absent(h) for h in table) and known.absent(digest(10**6))


# The change log: a resubscription catches up instead of scanning -------------------------------


async def scans(redis: Redis) -> int:
    return await command_calls(redis, "scan")


async def out_and_back(
    gw_b: Gateway,
    gw_a: Gateway,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[], Awaitable[list[str]]],
) -> list[str]:
    """B's subscription breaks (every pub/sub connection is killed; B's comes back only once
    `meanwhile` has run, A's at once); returns the keys `meanwhile` made while B was away."""
    sessions_b = gw_b.replica.subscriber.sessions
    entered, release = hold_resubscription(gw_b, monkeypatch)
    try:
        assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 2
        await asyncio.wait_for(entered.wait(), WAIT)
        await until("A is back", lambda: gw_a.replica.coherence.coherent and gw_a.replica.lookup.known.ready)
        made = await meanwhile()
        assert not gw_b.replica.lookup.known.ready
    finally:
        release.set()
        await settle(gw_a, gw_b)
    await until("B is back", lambda: gw_b.replica.subscriber.sessions > sessions_b and gw_b.replica.lookup.known.ready)
    return made


async def made_on(gw: Gateway) -> list[str]:
    """Keys made every way a key is made: create, bulk import, and a rotation's successor."""
    made = [(await gw.create_key(name="while-away"))["key"]]
    imported = ["legacy_" + secrets.token_urlsafe(24) for _ in range(3)]
    body = b"".join(orjson.dumps({"key": k}) + b"\n" for k in imported)
    async with await gw.admin_call("POST", "/v1/keys/import", token="developer", data=body) as r:
        assert r.status == 200
    rotated = await gw.create_key(name="to-rotate")
    async with await gw.admin_call("POST", f"/v1/keys/{rotated['id']}/rotate", json={"grace_seconds": 600}) as r:
        assert r.status in (200, 201), await r.text()
        successor = (await r.json())["key"]
    return [*made, *imported, rotated["key"], successor]


async def test_a_resubscribing_replica_catches_up_from_the_change_log_without_a_scan(
    gateway_factory: Callable[..., Any], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw_a, gw_b = await two_replicas(gateway_factory)
    known_b = await filter_ready(gw_b)
    assert known_b.checkpoint is not None, "the first build must remember where the log stood"
    await filter_ready(gw_a)
    await migrations_over(gw_a.replica, gw_b.replica)  # each scans the database once (runtime/replica.py)
    rebuilds = dict(gw_b.replica.subscriber.rebuilds)
    size = len(known_b)
    scans_before = await scans(redis)

    made = await out_and_back(gw_b, gw_a, redis, monkeypatch, lambda: made_on(gw_a))

    assert gw_b.replica.subscriber.rebuilds == {"scan": rebuilds["scan"], "catch_up": rebuilds["catch_up"] + 1}
    assert await scans(redis) == scans_before, "a replica rescanned the table"
    assert len(known_b) == size + len(made)
    for key in made:
        assert not known_b.absent(keys.digest(key))
        assert await proxy(gw_b, key) == (200, None)
    assert await proxy(gw_b, random_key()) == (401, "key_not_found")


async def test_a_log_with_an_entry_removed_falls_back_to_the_full_scan(
    gateway_factory: Callable[..., Any], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw_a, gw_b = await two_replicas(gateway_factory)
    known_b = await filter_ready(gw_b)
    rebuilds = dict(gw_b.replica.subscriber.rebuilds)
    stream = gw_a.replica.store.audit_stream

    async def meanwhile() -> list[str]:
        made = await made_on(gw_a)
        first_after = (await redis.xrange(stream, min="(" + known_b.checkpoint.entry, count=1))[0][0]  # type: ignore[union-attr]
        assert await redis.xdel(stream, first_after) == 1  # what it said (the create) is lost to the log
        return made

    made = await out_and_back(gw_b, gw_a, redis, monkeypatch, meanwhile)
    assert gw_b.replica.subscriber.rebuilds == {"scan": rebuilds["scan"] + 1, "catch_up": rebuilds["catch_up"]}
    for key in made:
        assert await proxy(gw_b, key) == (200, None)


async def test_the_log_cannot_tell_across_redis_processes_removals_or_past_its_limit(redis: Redis) -> None:
    prefix = f"kl{secrets.token_hex(4)}:"
    store = KeyStore(redis, prefix)
    empty = await store.checkpoint()
    assert empty is not None and (empty.entry, empty.added) == ("0-0", 0)
    await redis.xadd(prefix + "audit", {"key_id": "key_1", "action": "create"})
    await redis.set(prefix + "id:key_1", "a" * 64)
    one = await store.checkpoint()
    assert one is not None and one.added == 1
    assert await store.hashes_since(empty, one) == ["a" * 64]
    assert await store.hashes_since(one, one) == []
    assert await store.hashes_since(dataclasses.replace(empty, server="another"), one) is None
    for n in (2, 3):
        await redis.xadd(prefix + "audit", {"key_id": f"key_{n}", "action": "create"})
        await redis.set(prefix + f"id:key_{n}", str(n) * 64)
    three = await store.checkpoint()
    assert three is not None
    assert sorted(await store.hashes_since(one, three) or []) == ["2" * 64, "3" * 64]
    assert await store.hashes_since(empty, three, limit=2) is None  # a scan is cheaper
    assert await redis.xtrim(prefix + "audit", maxlen=1, approximate=False) == 2
    assert await store.hashes_since(empty, three) is None


def test_names_of_other_lengths_that_add_up_to_ours_do_not_shift_the_decoding() -> None:
    """A 63- and a 65-digit name (not the gateway's) in one SCAN reply add up to two of ours: only
    the records are decoded, each to its own first 64 bits. The same for id index values."""
    from gateway.keytable.store import _index_prefixes, _prefixes

    head = b"P k:"
    ours = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
    names = [head + ours[0].encode(), head + b"a" * 63, head + b"a" * 65, *(head + h.encode() for h in ours[1:])]
    assert sorted(int(x) for x in _prefixes(names, len(head)).tolist()) == sorted(int(h[:16], 16) for h in ours)
    values = [bytes.fromhex(ours[0]), b"x" * 31, b"y" * 33, *(bytes.fromhex(h) for h in ours[1:])]
    assert sorted(int(x) for x in _index_prefixes(values).tolist()) == sorted(int(h[:16], 16) for h in ours)
