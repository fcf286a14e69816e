"""Key ids in bucketed hashes (issue 15: memory per key, and the replica's ready time).

Against the session's real redis-server (and in-process gateways for the admin API):

- a table written by this version keeps which key has an id in `P idix:<4 hex>` (32 bytes a key)
  and writes no `P id:<id>` once the move has run: read by id, listing, disable, rotate, revoke,
  the audit by key and the key filter's catch-up all find its keys;
- a table written by the version before (`P id:<id>` strings) keeps working unchanged under this
  one, and `migrate_ids` moves it into the index: idempotent, safe on two replicas at once, and
  without changing an answer;
- the key filter's scan, which sends each SCAN before it decodes the reply before it, leaves no
  reply unread on a connection it gives back when it is stopped midway;
- rolling upgrade: while a replica of the version before (which reads only `P id:<id>`) is live,
  writes go on writing `P id:<id>` too, and what that version runs to read a key by id (its script,
  verbatim from before this change) finds the keys this one writes; the move waits until no such
  replica is live. After it, that version's read by id finds no key (a 404, documented in
  docs/operations.md), while its request path (`P k:<sha256>`) is unchanged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import Redis

from gateway.keytable.record import KeyRecord, digest, generate, new_id
from gateway.keytable.store import AuditEntry, KeyStore
from gateway.runtime.replica import _migrate_audit
from tests.conftest import Gateway, RedisProcess
from tests.test_known_scale import FILL, filled_hashes

# What the version before this change ran to read a key by id (its store.py's _READ_BY_ID).
OLD_READ_BY_ID = """
local hash = redis.call('GET', ARGV[1] .. 'id:' .. ARGV[2])
if not hash then return false end
return {hash, redis.call('GET', ARGV[1] .. 'k:' .. hash) or false}
"""


class Written:
    """A change's announcement as the store asks for it (the channel message and the write time);
    nothing here is decided, only recorded."""

    def message(self, keys: list[tuple[str, int]]) -> bytes:
        return b"test"

    def written(self, at_us: int, live: dict[str, int] | None = None) -> None:
        pass


async def old_read(redis: Redis, prefix: str, key_id: str) -> Any:
    return await redis.eval(OLD_READ_BY_ID, 0, prefix, key_id)


async def write_old_record(redis: Redis, prefix: str, name: str) -> KeyRecord:
    """A key as the version before this change wrote it: the record, `P id:<id>`, the listing."""
    key = generate()
    record = KeyRecord(id=new_id(), hash=digest(key), name=name, created_at=time.time())
    await redis.set(f"{prefix}k:{record.hash}", record.to_json())
    await redis.set(f"{prefix}id:{record.id}", record.hash)
    await redis.zadd(f"{prefix}ids", {record.id: record.created_at})
    return record


async def moved(redis: Redis, prefix: str) -> None:
    """Until the replica's own move at startup is over (it runs once the key filter is built)."""
    deadline = time.monotonic() + 10
    while not (await redis.get(prefix + "ids-bucketed") or b"").startswith(b"moved"):
        assert time.monotonic() < deadline, "the startup move of key ids did not finish"
        await asyncio.sleep(0.01)


async def names_with(redis: Redis, prefix: str, text: str) -> set[str]:
    return {n.decode() async for n in redis.scan_iter(match=prefix + "*") if text in n.decode()}


async def test_keys_written_by_this_version_are_found_by_id_through_the_index_only(gw: Gateway, redis: Redis) -> None:
    store: KeyStore = gw.replica.store
    prefix = store.prefix
    await moved(redis, prefix)
    since = await store.checkpoint()
    key = await gw.create_key(name="indexed")
    async with await gw.admin_call(
        "POST", "/v1/keys/import", token="developer", data=b'{"key": "ext_abcdefgh12345678"}'
    ) as r:
        imported = [line for line in (await r.read()).splitlines() if line]
    assert len(imported) == 1 and b'"imported"' in imported[0], imported
    async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/rotate", json={}) as r:
        assert r.status == 201, await r.text()
        new_id_ = (await r.json())["id"]
    assert not [n async for n in redis.scan_iter(match=prefix + "id:*")]
    # 32 bytes in one field of a shared hash: the Redis key's name has no id in it.
    stored = await redis.hget(store.id_index(key["id"]), key["id"])
    record = await store.get_by_id(key["id"])
    assert record is not None and stored == bytes.fromhex(record.hash)
    assert await names_with(redis, prefix, key["id"]) == set()

    for key_id in (key["id"], new_id_):
        async with await gw.admin_call("GET", f"/v1/keys/{key_id}", token="viewer") as r:
            assert r.status == 200, await r.text()
    async with await gw.admin_call("GET", "/v1/keys?limit=1", token="viewer") as r:
        page = await r.json()
    listed = [k["id"] for k in page["keys"]]
    while page["next_cursor"]:
        async with await gw.admin_call("GET", f"/v1/keys?limit=1&cursor={page['next_cursor']}", token="viewer") as r:
            page = await r.json()
        listed += [k["id"] for k in page["keys"]]
    assert {key["id"], new_id_} <= set(listed) and len(listed) == 3
    async with await gw.admin_call("POST", f"/v1/keys/{new_id_}/disable", json={"reason": "x"}) as r:
        assert r.status == 200 and (await r.json())["enabled"] is False
    async with await gw.admin_call("POST", f"/v1/keys/{new_id_}/revoke", json={}) as r:
        assert r.status == 200, await r.text()
    async with await gw.admin_call("GET", f"/v1/audit?key_id={new_id_}", token="admin") as r:
        assert [e["action"] for e in (await r.json())["entries"]][:2] == ["revoke", "disable"]
    # The key filter's catch-up after a break finds the keys created since through the index.
    assert since is not None
    until = await store.checkpoint()
    assert until is not None
    found = await store.hashes_since(since, until)
    assert found is not None and record.hash in found and len(set(found)) == 3


async def test_a_table_of_the_layout_before_is_read_and_moved_without_changing_an_answer(
    gw: Gateway, redis: Redis
) -> None:
    store: KeyStore = gw.replica.store
    prefix = store.prefix
    await moved(redis, prefix)
    await redis.delete(prefix + "ids-bucketed")  # as before the first start of this version
    olds = [await write_old_record(redis, prefix, f"old{n}") for n in range(3)]
    await redis.set(prefix + "id:key_notours", "not a key hash")  # left alone by the move

    async def answers() -> list[Any]:
        out = []
        for old in olds:
            async with await gw.admin_call("GET", f"/v1/keys/{old.id}", token="viewer") as r:
                assert r.status == 200, await r.text()
                out.append((await r.json())["name"])
        async with await gw.admin_call("GET", "/v1/keys?limit=10", token="viewer") as r:
            out.append(sorted(k["id"] for k in (await r.json())["keys"]))
        return out

    before = await answers()
    assert before[:3] == ["old0", "old1", "old2"] and before[3] == sorted(o.id for o in olds)
    async with await gw.admin_call("POST", f"/v1/keys/{olds[0].id}/disable", json={"reason": "x"}) as r:
        assert r.status == 200, await r.text()
    assert (await store.get_by_id(olds[0].id)).enabled is False  # type: ignore[union-attr]
    assert set(await store._hashes_of([o.id for o in olds])) == {o.hash for o in olds}

    # Two replicas moving at once (the gate lets them both: no replica of the version before is live).
    other = KeyStore(redis, prefix)
    counts = await asyncio.gather(store.migrate_ids(gw.replica.replica_id), other.migrate_ids("r_two"))
    assert sum(c or 0 for c in counts) == 3, counts
    assert [n.decode() async for n in redis.scan_iter(match=prefix + "id:*")] == [prefix + "id:key_notours"]
    for old in olds:
        assert await redis.hget(store.id_index(old.id), old.id) == bytes.fromhex(old.hash)
    assert await answers() == before
    assert (await redis.get(prefix + "ids-bucketed") or b"").startswith(b"moved")
    assert not await redis.exists(prefix + "id-readers")
    assert await store.migrate_ids("r_three") == 0  # once a table: later starts do not scan


async def test_while_a_replica_of_the_version_before_is_live_writes_keep_its_layout_and_the_move_waits(
    redis: Redis,
) -> None:
    prefix = f"t{time.monotonic_ns()}:"
    store = KeyStore(redis, prefix)
    # A live replica that has not declared it reads the index: the version before this one.
    await redis.zadd(prefix + "replicas", {"r_old": time.time() * 1000 + 60_000})
    assert await store.migrate_ids("r_new") is None
    assert not await redis.exists(prefix + "ids-bucketed")

    record = KeyRecord(id=new_id(), hash=digest(generate()), name="during", created_at=time.time())
    audit = [AuditEntry(actor="t", action="create", key_id=record.id)]
    assert await store.insert(record, audit, Written())
    batch = [KeyRecord(id=new_id(), hash=digest(generate()), created_at=time.time()) for _ in range(2)]
    assert await store.insert_many(batch, [AuditEntry("t", "import", r.id) for r in batch], Written()) == [True] * 2
    for written in (record, *batch):
        # What the version before runs to read by id finds every key this version writes meanwhile.
        hash_, raw = await old_read(redis, prefix, written.id)
        assert hash_.decode() == written.hash and KeyRecord.from_json(raw) == written
        assert await store.get_by_id(written.id) == written

    # A second replica of this version declares itself; still waits for the old one.
    assert await KeyStore(redis, prefix).migrate_ids("r_new2") is None
    await redis.zrem(prefix + "replicas", "r_old")  # the last replica of the version before is gone
    assert await store.migrate_ids("r_new") == 3
    assert await redis.get(prefix + "ids-bucketed") is not None
    later = KeyRecord(id=new_id(), hash=digest(generate()), created_at=time.time())
    assert await store.insert(later, [AuditEntry("t", "create", later.id)], Written())
    assert not await redis.exists(prefix + "id:" + later.id)
    for written in (record, *batch, later):
        assert await store.get_by_id(written.id) == written
        # The version before, started after the move, no longer finds a key by id: a 404, never a
        # wrong key (documented in docs/operations.md). Its request path reads P k:<sha256> as before.
        assert await old_read(redis, prefix, written.id) is None
        assert KeyRecord.from_json(await redis.get(f"{prefix}k:{written.hash}")) == written  # type: ignore[arg-type]

    # A key the version before writes after the move (a replica started late) is still read by id.
    late = await write_old_record(redis, prefix, "late")
    assert await store.get_by_id(late.id) == late
    await redis.delete(*[n async for n in redis.scan_iter(match=prefix + "*")])


async def test_a_scan_stopped_midway_leaves_no_reply_for_the_next_command_on_its_connection(
    redis_server: RedisProcess,
) -> None:
    """The key filter's scan drives its connection by hand (the next SCAN is sent before a reply
    is decoded). Stopped midway (a break), that connection goes back to the pool with a SCAN in
    flight: it must be closed, not reused, or the next command would read the SCAN's reply.
    One connection in the pool, so the next command gets the same one if it is reused."""
    client = Redis.from_url(redis_server.url, max_connections=1)
    prefix = f"t{time.monotonic_ns()}:"
    try:
        await client.eval(FILL, 0, prefix, "seed", 3000)  # type: ignore[misc]
        await client.set(prefix + "probe", "the probe's value")
        store = KeyStore(client, prefix)
        scan = store.hash_prefixes(count=200)
        first = await anext(scan)
        assert len(first) > 0
        await scan.aclose()  # stopped with the next SCAN sent and its reply unread
        assert await client.get(prefix + "probe") == b"the probe's value"
        got = {int(x) for batch in [b async for b in store.hash_prefixes(count=200)] for x in batch.tolist()}
        assert got == {int(h[:16], 16) for h in filled_hashes("seed", 3000)}
        assert await client.get(prefix + "probe") == b"the probe's value"
    finally:
        await client.delete(*[n async for n in client.scan_iter(match=prefix + "*")])
        await client.aclose()


async def test_a_replica_started_beside_one_of_the_version_before_moves_the_ids_once_it_is_gone(
    gw: Gateway, redis: Redis
) -> None:
    """The startup task (runtime/replica.py) tries again while a replica of the version before is live."""
    store: KeyStore = gw.replica.store
    prefix = store.prefix
    await moved(redis, prefix)
    await redis.delete(prefix + "ids-bucketed")
    old = await write_old_record(redis, prefix, "old")
    await redis.zadd(prefix + "replicas", {"r_old": time.time() * 1000 + 60_000})
    task = asyncio.create_task(_migrate_audit(store, gw.replica.lookup.known, gw.replica.replica_id, retry=0.02))
    try:
        readers = prefix + "id-readers"
        deadline = time.monotonic() + 5
        while not await redis.hexists(readers, gw.replica.replica_id):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # several tries
        assert not task.done() and not await redis.exists(prefix + "ids-bucketed")
        assert await redis.get(prefix + "id:" + old.id) == old.hash.encode()
        await redis.zrem(prefix + "replicas", "r_old")
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert not await redis.exists(prefix + "id:" + old.id)
    assert (await store.get_by_id(old.id)) == old
