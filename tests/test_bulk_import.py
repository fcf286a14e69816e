"""Bulk import (spec 13): `POST /v1/keys/import`, NDJSON in, one result per line out.

Against a real redis-server and the in-process gateway: what the table, the audit log and the
proxy show afterwards, not only what the endpoint answered.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import orjson

from gateway.admin.api import IMPORT_BATCH, IMPORT_MAX_LINE
from gateway.keytable.record import digest
from tests.conftest import Gateway


def plaintext() -> str:
    return "legacy_" + secrets.token_urlsafe(24)


async def bulk(gw: Gateway, lines: list[bytes], *, token: str = "developer") -> tuple[int, list[dict[str, Any]]]:
    async with await gw.admin_call("POST", "/v1/keys/import", token=token, data=b"\n".join(lines) + b"\n") as r:
        raw = await r.read()
        if r.headers.get("Content-Type", "").startswith("application/x-ndjson"):
            return r.status, [orjson.loads(line) for line in raw.splitlines() if line]
        return r.status, [orjson.loads(raw)]


async def proxied(gw: Gateway, key: str) -> int:
    async with await gw.call("GET", "/api/x", key=key) as r:
        await r.read()
        return r.status


async def test_a_bulk_import_answers_each_line_and_the_keys_work_at_once(gw: Gateway) -> None:
    existing = plaintext()
    await gw.create_key(key=existing)
    keys = [plaintext() for _ in range(IMPORT_BATCH + 20)]  # two batches
    by_digest = plaintext()
    # A replica that saw a key before it existed caches "unknown": the import must evict that.
    assert await proxied(gw, keys[-1]) == 401
    lines = [orjson.dumps({"key": k, "owner": "acme", "scopes": ["billing:read"]}) for k in keys]
    lines += [
        orjson.dumps({"key_sha256": digest(by_digest), "name": "by-digest"}),
        orjson.dumps({"key": existing}),
        orjson.dumps({"key": keys[0]}),  # repeats an earlier line
        b"",  # blank: no result
        b"{not json",
        orjson.dumps({"name": "no key"}),
        orjson.dumps({"key": plaintext(), "colour": "red"}),
    ]
    status, results = await bulk(gw, lines)
    assert status == 200
    n = len(keys)
    assert [r["line"] for r in results] == [*range(1, n + 4), *range(n + 5, n + 8)]
    assert [r["result"] for r in results[: n + 1]] == ["imported"] * (n + 1)
    assert [r["result"] for r in results[n + 1 :]] == ["exists", "exists", "rejected", "rejected", "rejected"]
    assert "not valid JSON" in results[-3]["detail"] or "JSON" in results[-3]["detail"]
    assert "key_sha256" in results[-2]["detail"]
    assert "colour" in results[-1]["detail"]

    # In force at once, on this replica (which had cached the last key as unknown), with the fields.
    for key in (keys[0], keys[-1], by_digest):
        assert await proxied(gw, key) == 200
    async with await gw.admin_call("GET", f"/v1/keys/{results[0]['id']}", token="viewer") as r:
        record = await r.json()
    assert (record["owner"], record["scopes"], record["imported"]) == ("acme", ["billing:read"], True)
    async with await gw.admin_call("GET", f"/v1/audit?key_id={results[0]['id']}", token="admin") as r:
        entries = (await r.json())["entries"]
    assert [(e["action"], e["actor"]) for e in entries] == [("import", "ops-developer")]


async def test_a_line_too_long_ends_the_answer_with_an_error_and_keeps_the_lines_before_it(gw: Gateway) -> None:
    first = plaintext()
    lines = [orjson.dumps({"key": first}), orjson.dumps({"key": plaintext(), "name": "x" * IMPORT_MAX_LINE})]
    status, results = await bulk(gw, lines)
    assert status == 200
    assert results[0]["result"] == "imported"
    assert results[-1]["error"]["code"] == "invalid_request" and "longer than" in results[-1]["error"]["detail"]
    assert await proxied(gw, first) == 200


async def test_bulk_import_needs_the_developer_role_and_never_echoes_a_key(gw: Gateway) -> None:
    key = plaintext()
    status, (body,) = await bulk(gw, [orjson.dumps({"key": key})], token="viewer")
    assert (status, body["error"]["code"]) == (403, "insufficient_permissions")
    status, results = await bulk(gw, [orjson.dumps({"key": key + "\x00"})])
    assert results[0]["result"] == "rejected" and key not in orjson.dumps(results).decode()


async def test_concurrent_bulk_imports_of_the_same_keys_import_each_exactly_once(gw: Gateway) -> None:
    keys = [plaintext() for _ in range(300)]
    lines = [orjson.dumps({"key": k}) for k in keys]
    answers = await asyncio.gather(bulk(gw, lines), bulk(gw, lines[::-1]))
    imported = [r for _status, results in answers for r in results if r["result"] == "imported"]
    assert len(imported) == len(keys)
    assert len({r["id"] for r in imported}) == len(keys)


async def test_redis_failing_mid_import_ends_the_answer_with_store_unavailable_and_the_first_batch_stands(
    gw: Gateway, monkeypatch: Any
) -> None:
    """The first batch's results are sent once it is in force; when the store fails on the second,
    the answer ends with a store_unavailable line (the status is long sent), and nothing of the
    second batch was imported. The failure is the store's exception, raised where Redis's would be."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    store = gw.replica.store
    real = store.insert_many
    calls = 0

    async def failing_second(*args: Any, **kw: Any) -> list[bool]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RedisConnectionError("gone")
        return await real(*args, **kw)

    monkeypatch.setattr(store, "insert_many", failing_second)
    keys = [plaintext() for _ in range(IMPORT_BATCH + 5)]
    status, results = await bulk(gw, [orjson.dumps({"key": k}) for k in keys])
    assert status == 200
    assert [r["result"] for r in results[:IMPORT_BATCH]] == ["imported"] * IMPORT_BATCH
    assert results[-1]["error"]["code"] == "store_unavailable" and len(results) == IMPORT_BATCH + 1
    assert await proxied(gw, keys[0]) == 200
    assert await proxied(gw, keys[-1]) == 401
    # Before anything was sent, the same failure is a plain 503.
    calls = 1
    status, (body,) = await bulk(gw, [orjson.dumps({"key": plaintext()})])
    assert (status, body["error"]["code"]) == (503, "store_unavailable")


async def test_concurrent_imports_write_one_batch_at_a_time_per_replica_and_every_line_lands(
    gw: Gateway, monkeypatch: Any
) -> None:
    """A client's concurrent imports (the CLI sends 16 at once) must not queue their Lua
    transactions in Redis, where each waits behind the others on its command timeout: a 2-CPU CI
    run under load saw `store_unavailable` that way. The replica writes one batch at a time."""
    store = gw.replica.api.store
    write = store.insert_many
    in_redis = 0
    most = 0

    async def counted(*args: Any, **kwargs: Any) -> list[bool]:
        nonlocal in_redis, most
        in_redis += 1
        most = max(most, in_redis)
        try:
            return await write(*args, **kwargs)
        finally:
            in_redis -= 1

    monkeypatch.setattr(store, "insert_many", counted)
    requests = [[orjson.dumps({"key": plaintext(), "name": "c"}) for _ in range(IMPORT_BATCH + 7)] for _ in range(8)]
    answers = await asyncio.gather(*(bulk(gw, lines) for lines in requests))
    assert [status for status, _ in answers] == [200] * len(requests)
    results = [r["result"] for _, lines in answers for r in lines]
    assert results == ["imported"] * sum(len(lines) for lines in requests)
    assert most == 1, f"{most} import batches were in Redis at once"
