"""A key change costs the admin call one Redis round trip to write (spec 13: the disable's latency),
plus one to read the record it changes: counted on the wire, per command the store sends, against a
real redis-server. Before, a disable took five (GET id, WATCH, GET, MULTI/EXEC, the live set)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Gateway, migrations_over


class Wire:
    """Every command the store's Redis client sends, in order (a pipeline counts as one trip)."""

    def __init__(self, gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []
        redis = gw.replica.store.redis
        execute, pipeline = redis.execute_command, redis.pipeline
        scripts = {s.sha: name for name, s in vars(gw.replica.store).items() if hasattr(s, "sha") and s.sha}
        self.scripts = scripts

        async def counted(*args: Any, **options: Any) -> Any:
            name = str(args[0]).upper()
            if name == "EVALSHA":
                name = f"EVALSHA {scripts.get(str(args[1]), args[1])}"
            self.sent.append(name)
            return await execute(*args, **options)

        def counted_pipeline(*args: Any, **options: Any) -> Any:
            self.sent.append("PIPELINE")
            return pipeline(*args, **options)

        monkeypatch.setattr(redis, "execute_command", counted)
        monkeypatch.setattr(redis, "pipeline", counted_pipeline)

    def of_the_store(self) -> list[str]:
        """What the change sent, less the replica's own background traffic (heartbeats, acks)."""
        return [c for c in self.sent if c.startswith("EVALSHA _") or not c.startswith(("EVALSHA", "PUBLISH"))]


async def test_a_disable_is_one_round_trip_to_read_and_one_to_write_and_announce(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await gw.create_key(name="trips")
    # Scripts are loaded on first use; warm them (a restarted Redis reloads them the same way).
    async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/disable", json={"reason": "warm"}) as r:
        assert r.status == 200
    async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/enable", json={}) as r:
        assert r.status == 200
    await migrations_over(gw.replica)  # the startup migration's scripts would be counted as the change's
    wire = Wire(gw, monkeypatch)
    assert wire.scripts, "the store registers its scripts"
    async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/disable", json={"reason": "count"}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["propagation"]["confirmed"] == body["propagation"]["replicas"] == 1
    assert wire.of_the_store() == ["EVALSHA _read_by_id", "EVALSHA _update"], wire.sent


async def test_a_create_is_one_round_trip(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    await gw.create_key(name="warm")
    await migrations_over(gw.replica)  # the startup migration's scripts would be counted as the change's
    wire = Wire(gw, monkeypatch)
    await gw.create_key(name="trips")
    assert wire.of_the_store() == ["EVALSHA _create"], wire.sent


async def test_a_change_that_lost_a_race_reads_again_and_writes_the_fresh_record(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compare and set: a record changed between the read and the write is read again, never
    overwritten with a stale copy (here the name is changed by a write slipped in between)."""
    key = await gw.create_key(name="before")
    store = gw.replica.store
    read = store._read_by_id
    slipped = False

    async def read_then_someone_writes(*args: Any, **options: Any) -> Any:
        nonlocal slipped
        got = await read(*args, **options)
        if not slipped and got:
            slipped = True
            raw = got[1].decode() if isinstance(got[1], bytes) else got[1]
            await store.redis.set(f"{store.prefix}k:{got[0].decode()}", raw.replace('"before"', '"renamed"'))
        return got

    monkeypatch.setattr(store, "_read_by_id", read_then_someone_writes)
    async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/disable", json={"reason": "race"}) as r:
        assert r.status == 200
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}", token="viewer") as r:
        record = await r.json()
    assert slipped
    assert (record["name"], record["enabled"]) == ("renamed", False)  # both writes kept
