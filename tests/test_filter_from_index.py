"""The key filter built from the id index instead of a SCAN (issue 15: a replica ready in 3 s on 1M keys).

Against the session's real redis-server, and real replicas in process:

- on a table whose ids are moved (`ids-bucketed` "moved") and whose index holds every listed id,
  a replica builds its filter without a single SCAN (INFO commandstats) and the filter equals the
  one the scan builds, with keys made every way (create, import, a rotation's successor and the
  rotated-away key in its grace period, a revoked key);
- each condition that is not met takes the scan, with the same filter: the marker absent, the
  marker "moving", an id listed that the index does not hold (what a replica of an earlier version
  writes after the move: `id:<id>` and `ids`, no index field), an index value that is not 32
  bytes, and a create whose index field lands in a bucket the pass has already read (the count
  read after the pass is then one more than the fields read: never a false match);
- keys created on another replica while a replica's full build reads the index are never absent
  from it afterwards (they are announced to it: its delta set), whichever way the build went;
- a table of the layout before the index (`id:<id>` strings, no index) is still built by the scan;
- a table smaller than KeyStore.index_min keys is built by the scan (cheaper there), complete or not;
- a read of the index cancelled midway leaves no reply on its connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from gateway.keytable import record as keys
from gateway.keytable.keyfilter import KnownKeys
from gateway.keytable.record import KeyRecord
from gateway.keytable.store import KeyStore
from tests.conftest import Gateway, migrations_over
from tests.test_known import WAIT, filter_ready, new_prefix, proxy, random_key, settle, two_replicas, until
from tests.test_known_scale import made_on, scans


@pytest.fixture(autouse=True)
def index_at_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The index path at the tables of these tests (below KeyStore.index_min a SCAN is cheaper)."""
    monkeypatch.setattr(KeyStore, "index_min", 0)


async def built(store: KeyStore, *, scan: bool = False) -> KnownKeys:
    """A filter built as a replica builds it (hash_prefixes), or from the SCAN alone."""
    known = KnownKeys()
    assert await known.rebuild(store.scanned_prefixes() if scan else store.hash_prefixes())
    return known


def same(a: KnownKeys, b: KnownKeys) -> bool:
    return np.array_equal(a._sorted, b._sorted) and a._delta == b._delta


async def a_moved_table(gateway_factory: Callable[..., Any], redis: Redis) -> tuple[Gateway, list[str]]:
    """A replica on a new table with keys made every way, the id and audit moves done."""
    gw: Gateway = await gateway_factory(**{"redis.prefix": new_prefix()})
    await filter_ready(gw)
    made = await made_on(gw)  # create, import, rotation (both keys)
    revoked = await gw.create_key(name="to-revoke")
    async with await gw.admin_call("POST", f"/v1/keys/{revoked['id']}/revoke", json={}) as r:
        assert r.status == 200, await r.text()
    made.append(revoked["key"])
    await migrations_over(gw.replica)  # the id and audit moves, run once at its start
    state = await redis.get(gw.replica.store.prefix + "ids-bucketed")
    assert state is not None and state.startswith(b"moved"), state
    return gw, made


async def test_a_complete_index_builds_the_filter_without_a_scan_and_equal_to_the_scans(
    gateway_factory: Callable[..., Any], redis: Redis
) -> None:
    gw_a, made = await a_moved_table(gateway_factory, redis)
    prefix = gw_a.replica.store.prefix
    store = KeyStore(redis, prefix)
    before = await scans(redis)
    from_index = await built(store)
    assert store.filter_source == "index"
    assert await scans(redis) == before, "the index path ran a SCAN"
    from_scan = await built(store, scan=True)
    assert await scans(redis) > before
    assert same(from_index, from_scan)
    assert len(from_index) == len(made)  # the rotated-away key included (in its grace period)
    assert not any(from_index.absent(keys.digest(k)) for k in made)

    # A replica started on the table takes that path too: no SCAN from its start to its filter ready.
    before = await scans(redis)
    gw_b: Gateway = await gateway_factory(**{"redis.prefix": prefix})
    known_b = await filter_ready(gw_b)
    assert gw_b.replica.store.filter_source == "index"
    assert gw_b.replica.subscriber.rebuilds["scan"] == 1  # the subscriber's count of full builds
    assert await scans(redis) == before, "a replica's start on a moved table scanned the key space"
    assert same(known_b, from_scan)
    for key in made:
        assert await proxy(gw_b, key) != (401, "key_not_found")
    assert await proxy(gw_b, random_key()) == (401, "key_not_found")


async def older_replicas_create(redis: Redis, prefix: str) -> str:
    """What a replica of the version before the id index writes for a new key after the move:
    its record, `id:<id>` and its `ids` member (no index field). The key."""
    key = random_key()
    record = KeyRecord(id=keys.new_id(), hash=keys.digest(key), name="old-replica", created_at=time.time())
    await redis.set(f"{prefix}k:{record.hash}", record.to_json())
    await redis.set(f"{prefix}id:{record.id}", record.hash)
    await redis.zadd(f"{prefix}ids", {record.id: record.created_at})
    return key


async def not_32_bytes(redis: Redis, prefix: str) -> str:
    """An index value that is not a key's 32 bytes (its hex, say) where the record is listed."""
    key = random_key()
    record = KeyRecord(id=keys.new_id(), hash=keys.digest(key), name="hex", created_at=time.time())
    await redis.set(f"{prefix}k:{record.hash}", record.to_json())
    await redis.hset(KeyStore(redis, prefix).id_index(record.id), record.id, record.hash)
    await redis.zadd(f"{prefix}ids", {record.id: record.created_at})
    return key


@pytest.mark.parametrize("condition", ["marker absent", "marker moving", "older replica's create", "not 32 bytes"])
async def test_each_condition_not_met_takes_the_scan_with_the_same_filter(
    gateway_factory: Callable[..., Any], redis: Redis, condition: str
) -> None:
    gw, made = await a_moved_table(gateway_factory, redis)
    prefix = gw.replica.store.prefix
    marker = prefix + "ids-bucketed"
    if condition == "marker absent":
        await redis.delete(marker)
    elif condition == "marker moving":
        await redis.set(marker, "moving")
    elif condition == "older replica's create":
        made.append(await older_replicas_create(redis, prefix))
    else:
        made.append(await not_32_bytes(redis, prefix))
    store = KeyStore(redis, prefix)
    before = await scans(redis)
    known = await built(store)
    assert store.filter_source == "scan"
    assert await scans(redis) > before
    assert same(known, await built(store, scan=True))
    assert not any(known.absent(keys.digest(k)) for k in made)


async def test_a_create_in_a_bucket_already_read_is_a_mismatch_never_a_false_match(
    gateway_factory: Callable[..., Any], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listed key whose record the pass cannot have seen (its field written, with its `ids`
    member, into a bucket after that bucket was read): the ZCARD after the pass counts it, the
    fields read do not. The pass takes buckets 1,024 a batch, two batches ahead: the key is written
    once the first batch's replies are read, into bucket 0000 (executed long before)."""
    gw, _ = await a_moved_table(gateway_factory, redis)
    prefix = gw.replica.store.prefix
    store = KeyStore(redis, prefix)
    writer = Redis(port=redis.connection_pool.connection_kwargs["port"])
    key = random_key()
    key_id = next(i for i in (keys.new_id() for _ in range(1_000_000)) if store.id_index(i).endswith(":0000"))
    real_connection = store._own_connection
    written = asyncio.Event()

    async def hooked() -> Any:
        conn = await real_connection()
        real_read, count = conn.read_response, 0

        async def read_response(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count == 1025 and not written.is_set():  # the first batch read; bucket 0000 long done
                await writer.set(f"{prefix}k:{keys.digest(key)}", b"{}")
                await writer.hset(store.id_index(key_id), key_id, bytes.fromhex(keys.digest(key)))
                await writer.zadd(f"{prefix}ids", {key_id: time.time()})
                written.set()
            return await real_read(*args, **kwargs)

        conn.read_response = read_response
        return conn

    monkeypatch.setattr(store, "_own_connection", hooked)
    try:
        assert await store.indexed_prefixes() is None
        assert written.is_set()
        assert await store.indexed_prefixes() is not None  # read again, complete: it matches
    finally:
        await writer.aclose()


async def test_keys_created_during_a_full_build_from_the_index_are_never_absent(
    gateway_factory: Callable[..., Any], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's subscription breaks and B builds its filter in full (no checkpoint to catch up from);
    once its read of the index has begun, A creates keys (each create returns once B has
    acknowledged it). Before the first HVALS (index path), in the middle (either path): none is ever
    absent from B's filter, and B accepts each."""
    gw_a, gw_b = await two_replicas(gateway_factory)
    known_b = await filter_ready(gw_b)
    await filter_ready(gw_a)
    await migrations_over(gw_a.replica, gw_b.replica)
    store_b = gw_b.replica.store
    created: list[str] = []
    sources: list[str] = []
    # The creates come before the first batch is sent (the index path, then: every field is read),
    # and before the third is (two of 65,536 / 1,024 batches sent: either path).
    for at in (1, 3):
        real_connection = store_b._own_connection
        done = asyncio.Event()

        async def hooked(at: int = at, real_connection: Any = real_connection, done: asyncio.Event = done) -> Any:
            conn = await real_connection()
            real_send, count = conn.send_packed_command, 0

            async def send_packed_command(*args: Any, **kwargs: Any) -> Any:
                nonlocal count
                count += 1
                if count == at and not done.is_set():
                    done.set()
                    await until("A is subscribed", lambda: gw_a.replica.coherence.coherent)
                    for n in range(3):
                        created.append((await gw_a.create_key(name=f"during-build-{at}-{n}"))["key"])
                return await real_send(*args, **kwargs)

            conn.send_packed_command = send_packed_command
            return conn

        monkeypatch.setattr(store_b, "_own_connection", hooked)
        sessions = gw_b.replica.subscriber.sessions
        known_b.checkpoint = None  # the next session builds in full
        try:
            assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 2
            await until(
                "B rebuilt", lambda s=sessions: gw_b.replica.subscriber.sessions > s and known_b.ready, WAIT * 2
            )
        finally:
            await settle(gw_a, gw_b)
        assert done.is_set(), "the build did not read the index"
        sources.append(store_b.filter_source)
        for key in created:
            assert not known_b.absent(keys.digest(key)), f"a key created during the build is absent ({sources})"
            assert await proxy(gw_b, key) == (200, None)
    assert sources[0] == "index", sources


async def test_a_table_of_the_layout_before_the_index_is_built_by_the_scan(
    gateway_factory: Callable[..., Any], redis: Redis
) -> None:
    """`id:<id>` strings and `ids`, no index and no marker, as an earlier version left it (written
    here directly): a replica's filter comes from the scan, and holds every key."""
    prefix = new_prefix()
    made = [random_key() for _ in range(50)]
    async with redis.pipeline(transaction=False) as pipe:
        for key in made:
            rec = KeyRecord(id=keys.new_id(), hash=keys.digest(key), name="old", created_at=time.time())
            pipe.set(f"{prefix}k:{rec.hash}", rec.to_json())
            pipe.set(f"{prefix}id:{rec.id}", rec.hash)
            pipe.zadd(f"{prefix}ids", {rec.id: rec.created_at})
        await pipe.execute()
    store = KeyStore(redis, prefix)
    known = await built(store)
    assert store.filter_source == "scan"
    assert len(known) == len(made)
    gw: Gateway = await gateway_factory(**{"redis.prefix": prefix})
    known_gw = await filter_ready(gw)
    assert gw.replica.store.filter_source == "scan"
    assert not any(known_gw.absent(keys.digest(k)) for k in made)
    assert await proxy(gw, made[0]) == (200, None)
    assert len(known_gw) == len(made)


async def test_a_read_of_the_index_stopped_midway_leaves_no_reply_for_the_next_command(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled with HVALS replies in flight (a break ends the rebuild task), the index read's
    connection is closed, not given back to the pool with them unread: one connection in the pool,
    so the next command would get the same one and read an HVALS reply."""
    client = Redis(port=redis.connection_pool.connection_kwargs["port"], max_connections=1)
    prefix = new_prefix()
    try:
        await client.set(prefix + "ids-bucketed", "moved test")
        await client.set(prefix + "probe", "the probe's value")
        store = KeyStore(client, prefix)
        real_connection = store._own_connection
        reading = asyncio.Event()

        async def hooked() -> Any:
            conn = await real_connection()
            real_read, count = conn.read_response, 0

            async def read_response(*args: Any, **kwargs: Any) -> Any:
                nonlocal count
                count += 1
                if count == 10:
                    reading.set()
                    await asyncio.Event().wait()  # held here until cancelled, replies unread
                return await real_read(*args, **kwargs)

            conn.read_response = read_response
            return conn

        monkeypatch.setattr(store, "_own_connection", hooked)
        task = asyncio.create_task(store.indexed_prefixes())
        await asyncio.wait_for(reading.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await client.get(prefix + "probe") == b"the probe's value"
        monkeypatch.setattr(store, "_own_connection", real_connection)
        assert await store.indexed_prefixes() == []  # an empty table, complete: nothing to hold
        assert await client.get(prefix + "probe") == b"the probe's value"
    finally:
        await client.delete(prefix + "ids-bucketed", prefix + "probe")
        await client.aclose()


async def test_a_table_smaller_than_index_min_is_built_by_the_scan(
    gateway_factory: Callable[..., Any], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, made = await a_moved_table(gateway_factory, redis)
    store = KeyStore(redis, gw.replica.store.prefix)
    monkeypatch.setattr(KeyStore, "index_min", len(made) + 1)
    before = await scans(redis)
    known = await built(store)
    assert store.filter_source == "scan"
    assert await scans(redis) > before
    monkeypatch.setattr(KeyStore, "index_min", len(made))
    assert same(await built(store), known)
    assert store.filter_source == "index"
