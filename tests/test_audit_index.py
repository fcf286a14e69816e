"""The audit trail without a Redis key per key (issue 15): one global stream plus a bucketed index.

Against the session's real redis-server and in-process gateways:

- a key's create and changes leave no Redis key of the key's own: its entries are in the global
  stream, their ids in one field of a shared index hash, and `GET /v1/audit?key_id=` answers them,
  newest first, with the same ids the global listing shows, paged by cursor;
- a table written in the layout before the index (a stream `audit:<id>` per key beside the global
  one, under the same ids) keeps its trail: read as it is, merged with entries written since, and
  moved into the index by `migrate_audit` (run by replicas at startup until one pass completed)
  without changing any answer, and merging in id order with a stream an older replica wrote after;
- the memory the audit costs a key is measured: well under the ~4.7 KB a per-key stream cost.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from redis.asyncio import Redis

from gateway.keytable.store import AuditEntry, KeyStore
from tests.conftest import Gateway


async def key_audit(gw: Gateway, key_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """Every entry of one key through the admin API, page by page (`limit` a page)."""
    out: list[dict[str, Any]] = []
    query = f"?key_id={key_id}&limit={limit}"
    while True:
        async with await gw.admin_call("GET", "/v1/audit" + query, token="admin") as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        out += body["entries"]
        if body["next_cursor"] is None:
            return out
        query = f"?key_id={key_id}&limit={limit}&cursor={body['next_cursor']}"


async def everything(gw: Gateway) -> list[dict[str, Any]]:
    async with await gw.admin_call("GET", "/v1/audit?limit=100", token="admin") as r:
        assert r.status == 200
        entries: list[dict[str, Any]] = (await r.json())["entries"]
        return entries


def prefix_of(gw: Gateway) -> str:
    return gw.replica.store.prefix


async def test_a_keys_trail_is_in_the_global_stream_and_the_index_with_no_redis_key_of_its_own(
    gw: Gateway, redis: Redis
) -> None:
    a = await gw.create_key(name="a")
    b = await gw.create_key(name="b")
    for n in range(3):
        for path in ("disable", "enable"):
            async with await gw.admin_call("POST", f"/v1/keys/{a['id']}/{path}", json={"reason": f"r{n}"}) as r:
                assert r.status == 200, await r.text()
    prefix = prefix_of(gw)
    names = {name.decode() async for name in redis.scan_iter(match=prefix + "*", count=1000)}
    for key in (a, b):  # no name has the id in it but P id:<id>, written only while the id index's
        # migration has not run (tests/test_id_index.py)
        assert {n for n in names if key["id"] in n} <= {prefix + "id:" + key["id"]}, names
    assert not [n for n in names if n.startswith(prefix + "audit:")]

    trail = await key_audit(gw, a["id"], limit=2)  # four pages
    assert [e["action"] for e in trail] == ["enable", "disable"] * 3 + ["create"]
    assert {e["key_id"] for e in trail} == {a["id"]}
    # The same entries, under the same ids, as the global listing shows.
    by_id = {e["id"]: e for e in await everything(gw)}
    assert [by_id[e["id"]] for e in trail] == trail
    assert [e["action"] for e in await key_audit(gw, b["id"])] == ["create"]
    # The index holds the ids, oldest first, in one field of one shared hash.
    stored = await redis.hget(gw.replica.store.audit_index(a["id"]), a["id"])
    assert stored is not None and stored.decode().split() == [e["id"] for e in reversed(trail)]
    assert await key_audit(gw, "key_" + "0" * 20) == []
    # A value not written by the gateway: what does not parse is skipped, the rest still answers.
    await redis.hset(gw.replica.store.audit_index(a["id"]), a["id"], "junk " + stored.decode() + " 1-x")
    assert await key_audit(gw, a["id"], limit=2) == trail


async def test_bulk_import_indexes_each_entry_where_the_api_finds_it(gw: Gateway) -> None:
    lines = b"\n".join(b'{"key": "legacy_%s"}' % secrets.token_hex(16).encode() for _ in range(30))
    async with await gw.admin_call("POST", "/v1/keys/import", token="developer", data=lines) as r:
        results = [line for line in (await r.read()).splitlines() if line]
    assert len(results) == 30
    imported = [e for e in await everything(gw) if e["action"] == "import"]
    assert len(imported) == 30
    for entry in imported[:5]:
        assert await key_audit(gw, entry["key_id"]) == [entry]


async def write_old_layout(redis: Redis, prefix: str, key_id: str, action: str) -> str:
    """An audit entry as versions before the index wrote it: the same id in both streams."""
    fields = AuditEntry(actor="old-version", action=action, key_id=key_id).fields(time.time())
    entry_id = (await redis.xadd(prefix + "audit", fields)).decode()  # type: ignore[arg-type]
    await redis.xadd(prefix + "audit:" + key_id, fields, id=entry_id)  # type: ignore[arg-type]
    return entry_id


async def test_a_trail_in_the_old_layout_is_read_merged_and_migrated_without_changing_an_answer(
    gw: Gateway, redis: Redis
) -> None:
    prefix = prefix_of(gw)
    deadline = time.monotonic() + 5
    while not await redis.exists(prefix + "audit-moved"):  # the replica's own move at startup is over
        assert time.monotonic() < deadline, "the startup move of old audit streams did not finish"
        await asyncio.sleep(0.01)
    key = await gw.create_key(name="old")
    await redis.delete(gw.replica.store.audit_index(key["id"]))  # as if created by the old version:
    old_ids = [await write_old_layout(redis, prefix, key["id"], action) for action in ("create", "disable")]
    async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/disable", json={"reason": "new"}) as r:
        assert r.status == 200
    expected = ["disable", "disable", "create"]
    before = await key_audit(gw, key["id"], limit=1)  # a cursor crossing from the index into the old stream
    assert [e["action"] for e in before] == expected
    assert [e["id"] for e in before[1:]] == old_ids[::-1]

    store: KeyStore = gw.replica.store
    await redis.delete(prefix + "audit-moved")  # as before the first start of this version
    assert await store.migrate_audit() == 1
    assert not await redis.exists(prefix + "audit:" + key["id"])
    assert await key_audit(gw, key["id"], limit=1) == before

    # An older replica still running writes its stream again: read at once where it is; later
    # starts do not scan again, a move run anyway merges it.
    late = await write_old_layout(redis, prefix, key["id"], "revoke")
    after = await key_audit(gw, key["id"])
    assert [e["action"] for e in after] == ["revoke", *expected] and after[0]["id"] == late
    assert await store.migrate_audit() == 0
    assert await redis.exists(prefix + "audit:" + key["id"])
    await redis.delete(prefix + "audit-moved")
    assert await store.migrate_audit() == 1
    assert await key_audit(gw, key["id"]) == after
    stored = (await redis.hget(store.audit_index(key["id"]), key["id"])).decode().split()  # type: ignore[union-attr]
    assert stored == [e["id"] for e in reversed(after)]


async def test_the_audit_of_a_key_costs_a_few_hundred_bytes_not_a_stream(gw: Gateway, redis: Redis) -> None:
    store: KeyStore = gw.replica.store
    n = 2000
    before = (await redis.info("memory"))["used_memory"]
    for i in range(n):  # the change scripts' own audit() (append_audit runs it alone)
        key_id = f"key_{i:020x}"
        await store.append_audit([AuditEntry("ops", "create", key_id), AuditEntry("ops", "disable", key_id)])
    per_key = ((await redis.info("memory"))["used_memory"] - before) / n
    # Measured ~400 B here (2,000 keys spread over the index's buckets); a stream per key was ~4.7 KB.
    assert per_key < 1000, per_key
