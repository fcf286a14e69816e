"""The admin API end to end (spec 4, 5, 7): a real gateway, a real redis-server, a real upstream."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import string
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.admin.auth import TokenVerifier
from tests.conftest import Gateway

RECORD_FIELDS = {
    "id", "name", "owner", "scopes", "meta", "start", "created_at", "expires_at",
    "enabled", "disabled_at", "disabled_by", "disabled_reason", "revoked",
}  # fmt: skip
URLSAFE = set(string.ascii_letters + string.digits + "-_")
KEY_ID = re.compile(r"key_[0-9a-f]{20}")
UNKNOWN_ID = "key_" + "0" * 20


# helpers ---------------------------------------------------------------------


async def answer(r: aiohttp.ClientResponse) -> tuple[int, dict[str, Any]]:
    async with r:
        return r.status, orjson.loads(await r.read())


async def admin(gw: Gateway, method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    return await answer(await gw.admin_call(method, path, **kw))


async def admin_raw(gw: Gateway, method: str, path: str, body: bytes, **kw: Any) -> aiohttp.ClientResponse:
    """A request with a body sent verbatim (not through the json= encoder)."""
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return await gw.admin_call(method, path, data=body, headers=headers, **kw)


async def proxy(gw: Gateway, key: str | None, path: str = "/api/ping") -> tuple[int, dict[str, Any]]:
    return await answer(await gw.call("GET", path, key=key))


async def show(gw: Gateway, key_id: str) -> dict[str, Any]:
    status, body = await admin(gw, "GET", f"/v1/keys/{key_id}", token="viewer")
    assert status == 200, body
    return body


async def assert_spec5_error(r: aiohttp.ClientResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """Status, Content-Type, X-Request-Id and the section 5 body; returns the body."""
    async with r:
        raw = await r.read()
        assert r.status == status, raw
        assert r.content_type == "application/json"
        request_id = r.headers.get("X-Request-Id")
        assert request_id
        headers = r.headers
    body: dict[str, Any] = orjson.loads(raw)
    assert set(body) == {"meta", "error"}
    assert body["meta"] == {"requestId": request_id}
    error = body["error"]
    assert set(error) == {"code", "title", "detail", "status", "type"}
    assert error["status"] == status
    assert isinstance(error["title"], str) and error["title"]
    assert isinstance(error["detail"], str) and error["detail"]
    assert isinstance(error["type"], str) and error["type"].endswith("/" + error["code"])
    if code is not None:
        assert error["code"] == code, body
    if status == 401:
        assert headers.get("WWW-Authenticate", "").startswith("Bearer ")
    return body


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


async def audit_entries(gw: Gateway, query: str = "") -> list[dict[str, Any]]:
    status, body = await admin(gw, "GET", "/v1/audit" + query, token="admin")
    assert status == 200, body
    entries: list[dict[str, Any]] = body["entries"]
    return entries


# create -----------------------------------------------------------------------


async def test_create_answers_201_with_the_key_once_and_the_full_record(gw: Gateway) -> None:
    body = {
        "name": "billing-prod",
        "owner": "acme",
        "scopes": ["billing:read", "billing:write"],
        "meta": {"team": "payments", "tier": 2, "tags": ["a", "b"]},
        "expires_at": "2031-05-06T07:08:09Z",
    }
    r = await gw.admin_call("POST", "/v1/keys", token="developer", json=body)
    status, created = await answer(r)
    assert status == 201, created
    assert RECORD_FIELDS <= set(created)
    assert "hash" not in created and "key_sha256" not in created
    key = created["key"]
    assert key.startswith("gw_")
    randomness = key[len("gw_") :]
    assert set(randomness) <= URLSAFE
    assert len(randomness) * 6 >= 128  # base64url: 6 bits a character
    assert KEY_ID.fullmatch(created["id"])
    assert created["name"] == "billing-prod"
    assert created["owner"] == "acme"
    assert created["scopes"] == ["billing:read", "billing:write"]
    assert created["meta"] == {"team": "payments", "tier": 2, "tags": ["a", "b"]}
    assert created["start"] and key.startswith(created["start"]) and len(created["start"]) < len(key) // 2
    assert created["enabled"] is True
    assert created["revoked"] is False
    assert created["disabled_at"] is None and created["disabled_by"] is None and created["disabled_reason"] is None
    assert parse_time(created["expires_at"]) == datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    age = datetime.now(UTC) - parse_time(created["created_at"])
    assert abs(age.total_seconds()) < 60

    # Shown once: a later read has the record but neither the key nor its digest.
    r = await gw.admin_call("GET", f"/v1/keys/{created['id']}", token="viewer")
    async with r:
        assert r.status == 200
        text = await r.text()
    shown = orjson.loads(text)
    assert "key" not in shown
    assert key not in text
    assert hashlib.sha256(key.encode()).hexdigest() not in text
    assert {f: shown[f] for f in RECORD_FIELDS} == {f: created[f] for f in RECORD_FIELDS}
    status, listing = await admin(gw, "GET", "/v1/keys", token="viewer")
    assert status == 200
    listed = orjson.dumps(listing).decode()
    assert key not in listed and hashlib.sha256(key.encode()).hexdigest() not in listed

    # The created key works on the proxy, with its scopes.
    status, echo = await proxy(gw, key, "/billing/invoices")
    assert status == 200, echo
    assert dict(echo["headers"])["X-Gateway-Key-Id"] == created["id"]


async def test_created_keys_are_distinct_and_random(gw: Gateway) -> None:
    made = [await gw.create_key(name=f"k{i}") for i in range(5)]
    assert len({m["key"] for m in made}) == 5
    assert len({m["id"] for m in made}) == 5
    # No shared randomness beyond the prefix and the chance of a common first character.
    tails = [m["key"][3:] for m in made]
    assert len({t[:4] for t in tails}) == 5


async def test_create_with_an_empty_body_makes_a_working_key(gw: Gateway) -> None:
    r = await gw.admin_call("POST", "/v1/keys", token="developer")
    status, created = await answer(r)
    assert status == 201, created
    assert created["key"].startswith("gw_")
    assert created["scopes"] == [] and created["meta"] == {}
    assert (await proxy(gw, created["key"]))[0] == 200


async def test_a_custom_prefix_starts_the_key_and_its_start(gw: Gateway) -> None:
    created = await gw.create_key(name="acme", prefix="acme_")
    assert created["key"].startswith("acme_")
    assert len(created["key"]) - len("acme_") >= 22
    assert created["start"].startswith("acme_")
    assert (await proxy(gw, created["key"]))[0] == 200


async def test_a_key_created_with_an_expiry_is_refused_once_it_has_passed(gw: Gateway) -> None:
    soon = datetime.now(UTC).timestamp() + 1.0
    expires_at = datetime.fromtimestamp(soon, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    created = await gw.create_key(name="short-lived", expires_at=expires_at)
    assert abs(parse_time(created["expires_at"]).timestamp() - soon) < 0.01
    assert (await proxy(gw, created["key"]))[0] == 200
    await asyncio.sleep(max(0.0, soon - datetime.now(UTC).timestamp()) + 0.15)
    await assert_spec5_error(await gw.call("GET", "/api/ping", key=created["key"]), 401, "key_expired")
    assert (await show(gw, created["id"]))["enabled"] is True  # expired by clock, not disabled


# import -----------------------------------------------------------------------


def legacy_key() -> str:
    return "legacy-" + secrets.token_urlsafe(24)


async def test_importing_a_plaintext_key_makes_it_work_and_never_shows_it(gw: Gateway) -> None:
    key = legacy_key()
    r = await gw.admin_call("POST", "/v1/keys", token="developer", json={"key": key, "name": "old", "owner": "o"})
    async with r:
        assert r.status == 201
        text = await r.text()
    record = orjson.loads(text)
    assert "key" not in record
    assert key not in text
    assert RECORD_FIELDS <= set(record)
    assert record["name"] == "old" and record["owner"] == "o" and record["enabled"] is True
    status, echo = await proxy(gw, key)
    assert status == 200, echo
    assert dict(echo["headers"])["X-Gateway-Key-Id"] == record["id"]


@pytest.mark.parametrize("upper", [False, True], ids=["lowercase-hex", "uppercase-hex"])
async def test_importing_by_sha256_makes_the_key_with_that_digest_work(gw: Gateway, upper: bool) -> None:
    key = legacy_key()
    digest = hashlib.sha256(key.encode()).hexdigest()
    r = await gw.admin_call(
        "POST", "/v1/keys", token="developer", json={"key_sha256": digest.upper() if upper else digest}
    )
    status, record = await answer(r)
    assert status == 201, record
    assert "key" not in record
    status, echo = await proxy(gw, key)
    assert status == 200, echo
    assert dict(echo["headers"])["X-Gateway-Key-Id"] == record["id"]
    # Another key is still unknown.
    assert (await proxy(gw, legacy_key()))[1]["error"]["code"] == "key_not_found"


@pytest.mark.parametrize("second", ["key", "key_sha256"])
async def test_importing_the_same_key_twice_is_409_key_exists(gw: Gateway, second: str) -> None:
    key = legacy_key()
    r = await gw.admin_call("POST", "/v1/keys", token="developer", json={"key": key})
    async with r:
        assert r.status == 201
    again = {"key": key} if second == "key" else {"key_sha256": hashlib.sha256(key.encode()).hexdigest()}
    r = await gw.admin_call("POST", "/v1/keys", token="developer", json=again)
    body = await assert_spec5_error(r, 409, "key_exists")
    assert key not in orjson.dumps(body).decode()
    status, listing = await admin(gw, "GET", "/v1/keys", token="viewer")
    assert status == 200 and len(listing["keys"]) == 1


async def test_importing_a_key_the_gateway_generated_is_409(gw: Gateway) -> None:
    created = await gw.create_key(name="mine")
    r = await gw.admin_call("POST", "/v1/keys", token="developer", json={"key": created["key"]})
    await assert_spec5_error(r, 409, "key_exists")


async def test_a_key_tried_before_its_import_works_right_after_the_import(gw: Gateway) -> None:
    key = legacy_key()
    status, body = await proxy(gw, key)
    assert status == 401 and body["error"]["code"] == "key_not_found"  # now cached as unknown
    status, body = await proxy(gw, key)
    assert status == 401
    r = await gw.admin_call("POST", "/v1/keys", token="developer", json={"key": key})
    async with r:
        assert r.status == 201
    status, body = await proxy(gw, key)  # well inside cache.negative_ttl_seconds
    assert status == 200, body


async def test_a_digest_tried_before_its_import_works_right_after_the_import(gw: Gateway) -> None:
    key = legacy_key()
    assert (await proxy(gw, key))[0] == 401
    digest = hashlib.sha256(key.encode()).hexdigest()
    r = await gw.admin_call("POST", "/v1/keys", token="developer", json={"key_sha256": digest})
    async with r:
        assert r.status == 201
    assert (await proxy(gw, key))[0] == 200


# list and show ------------------------------------------------------------------


async def test_list_pages_through_25_keys_each_exactly_once_in_creation_order(gw: Gateway) -> None:
    made = [(await gw.create_key(name=f"p{i:02d}", owner="pager"))["id"] for i in range(25)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = "?limit=10" + (f"&cursor={cursor}" if cursor else "")
        status, body = await admin(gw, "GET", "/v1/keys" + query, token="viewer")
        assert status == 200, body
        pages += 1
        assert len(body["keys"]) <= 10
        for record in body["keys"]:
            assert "key" not in record
        seen += [record["id"] for record in body["keys"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert seen == made
    assert pages == 3

    # The default page holds some; no cursor is needed for a short table.
    status, body = await admin(gw, "GET", "/v1/keys?limit=100", token="viewer")
    assert [r["id"] for r in body["keys"]] == made and body["next_cursor"] is None


async def test_list_filters_by_owner_and_by_enabled_and_pages_within_the_filter(gw: Gateway) -> None:
    acme = [(await gw.create_key(name=f"a{i}", owner="acme"))["id"] for i in range(12)]
    other = [(await gw.create_key(name=f"o{i}", owner="globex"))["id"] for i in range(3)]
    disabled = acme[::3]  # 0, 3, 6, 9
    for key_id in disabled:
        status, _ = await admin(gw, "POST", f"/v1/keys/{key_id}/disable", token="developer", json={"reason": "t"})
        assert status == 200

    async def collect(query: str, limit: int) -> list[str]:
        ids: list[str] = []
        cursor: str | None = None
        for _ in range(20):
            q = f"?{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            status, body = await admin(gw, "GET", "/v1/keys" + q, token="viewer")
            assert status == 200, body
            assert len(body["keys"]) <= limit
            ids += [r["id"] for r in body["keys"]]
            cursor = body["next_cursor"]
            if cursor is None:
                return ids
        raise AssertionError("pagination never ended")

    assert await collect("owner=acme", 5) == acme
    assert await collect("owner=globex", 2) == other
    assert await collect("owner=nobody", 5) == []
    assert await collect("owner=acme&enabled=false", 3) == disabled
    assert await collect("owner=acme&enabled=true", 3) == [k for k in acme if k not in disabled]
    assert await collect("enabled=false", 2) == disabled
    assert await collect("enabled=true", 4) == [k for k in acme + other if k not in disabled]
    status, body = await admin(gw, "GET", "/v1/keys?owner=acme&enabled=false", token="viewer")
    assert all(r["owner"] == "acme" and r["enabled"] is False for r in body["keys"])


async def test_show_answers_one_record_404_for_an_unknown_id_and_400_for_a_malformed_one(gw: Gateway) -> None:
    created = await gw.create_key(name="one", owner="o")
    record = await show(gw, created["id"])
    assert record["id"] == created["id"] and record["name"] == "one"
    await assert_spec5_error(await gw.admin_call("GET", f"/v1/keys/{UNKNOWN_ID}", token="viewer"), 404)
    body = await assert_spec5_error(
        await gw.admin_call("GET", "/v1/keys/not-a-key-id", token="viewer"), 400, "invalid_request"
    )
    assert "id" in body["error"]["detail"]


@pytest.mark.parametrize("action", ["disable", "enable", "revoke", "rotate"])
async def test_changing_an_unknown_key_is_404(gw: Gateway, action: str) -> None:
    r = await gw.admin_call("POST", f"/v1/keys/{UNKNOWN_ID}/{action}", token="admin", json={})
    await assert_spec5_error(r, 404)
    assert await audit_entries(gw) == []


# disable / enable / revoke ----------------------------------------------------------


async def test_disable_refuses_the_key_at_once_and_records_who_and_why(gw: Gateway) -> None:
    created = await gw.create_key(name="d", owner="o")
    assert (await proxy(gw, created["key"]))[0] == 200  # now cached as good
    r = await gw.admin_call(
        "POST", f"/v1/keys/{created['id']}/disable", token="developer", json={"reason": "leaked in a log"}
    )
    status, body = await answer(r)
    assert status == 200, body
    propagation = body["propagation"]
    assert set(propagation) == {"replicas", "confirmed", "fenced", "ms"}  # spec 8: fenced since the lease
    assert propagation["replicas"] >= 1 and propagation["confirmed"] == propagation["replicas"]
    assert propagation["ms"] >= 0
    assert body["enabled"] is False
    assert body["disabled_by"] == "ops-developer"
    assert body["disabled_reason"] == "leaked in a log"
    assert parse_time(body["disabled_at"]) >= parse_time(body["created_at"])

    r = await gw.call("GET", "/api/ping", key=created["key"])
    err = await assert_spec5_error(r, 403, "key_disabled")
    assert created["key"] not in orjson.dumps(err).decode()

    record = await show(gw, created["id"])
    assert record["enabled"] is False and record["revoked"] is False
    assert record["disabled_by"] == "ops-developer" and record["disabled_reason"] == "leaked in a log"
    assert record["disabled_at"] == body["disabled_at"]


async def test_disable_is_idempotent_and_keeps_the_first_disabled_at(gw: Gateway) -> None:
    created = await gw.create_key(name="d")
    path = f"/v1/keys/{created['id']}/disable"
    status, first = await admin(gw, "POST", path, token="developer", json={"reason": "first"})
    assert status == 200
    await asyncio.sleep(0.01)
    status, second = await admin(gw, "POST", path, token="admin", json={"reason": "second"})
    assert status == 200, second
    assert "propagation" in second
    assert second["enabled"] is False
    assert second["disabled_at"] == first["disabled_at"]
    assert second["disabled_by"] == "ops-developer"
    assert second["disabled_reason"] == "first"
    status, third = await admin(gw, "POST", path, token="developer")  # no body at all
    assert status == 200 and third["disabled_at"] == first["disabled_at"]
    assert (await proxy(gw, created["key"]))[1]["error"]["code"] == "key_disabled"


async def test_enable_restores_a_disabled_key(gw: Gateway) -> None:
    created = await gw.create_key(name="e")
    status, _ = await admin(gw, "POST", f"/v1/keys/{created['id']}/disable", token="developer", json={})
    assert status == 200
    assert (await proxy(gw, created["key"]))[0] == 403
    status, body = await admin(gw, "POST", f"/v1/keys/{created['id']}/enable", token="developer", json={})
    assert status == 200, body
    assert body["enabled"] is True
    assert body["disabled_at"] is None and body["disabled_by"] is None and body["disabled_reason"] is None
    assert "propagation" in body
    assert (await proxy(gw, created["key"]))[0] == 200
    assert (await show(gw, created["id"]))["enabled"] is True


async def test_enable_is_refused_when_reenabling_is_not_allowed(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory(**{"keys.allow_reenable": False})
    created = await gw.create_key(name="e")
    status, _ = await admin(gw, "POST", f"/v1/keys/{created['id']}/disable", token="developer", json={})
    assert status == 200
    r = await gw.admin_call("POST", f"/v1/keys/{created['id']}/enable", token="admin", json={})
    await assert_spec5_error(r, 409, "reenable_not_allowed")
    assert (await show(gw, created["id"]))["enabled"] is False
    assert (await proxy(gw, created["key"]))[1]["error"]["code"] == "key_disabled"


async def test_revoke_is_permanent_and_enable_afterwards_is_409_key_revoked(gw: Gateway) -> None:
    created = await gw.create_key(name="r")
    assert (await proxy(gw, created["key"]))[0] == 200
    r = await gw.admin_call("POST", f"/v1/keys/{created['id']}/revoke", token="admin", json={"reason": "gone"})
    status, body = await answer(r)
    assert status == 200, body
    assert body["revoked"] is True and body["enabled"] is False
    assert "propagation" in body
    await assert_spec5_error(await gw.call("GET", "/api/ping", key=created["key"]), 403, "key_revoked")

    r = await gw.admin_call("POST", f"/v1/keys/{created['id']}/enable", token="admin", json={})
    await assert_spec5_error(r, 409, "key_revoked")
    # A second revoke and a disable change nothing.
    status, body = await admin(gw, "POST", f"/v1/keys/{created['id']}/revoke", token="admin", json={})
    assert status == 200 and body["revoked"] is True
    status, body = await admin(gw, "POST", f"/v1/keys/{created['id']}/disable", token="developer", json={})
    assert status == 200 and body["revoked"] is True
    record = await show(gw, created["id"])
    assert record["revoked"] is True and record["enabled"] is False
    await assert_spec5_error(await gw.call("GET", "/api/ping", key=created["key"]), 403, "key_revoked")
    # Never deleted: still listed.
    status, listing = await admin(gw, "GET", "/v1/keys", token="viewer")
    assert created["id"] in [k["id"] for k in listing["keys"]]


async def test_a_revoked_key_cannot_be_rotated(gw: Gateway) -> None:
    created = await gw.create_key(name="r")
    status, _ = await admin(gw, "POST", f"/v1/keys/{created['id']}/revoke", token="admin", json={})
    assert status == 200
    r = await gw.admin_call("POST", f"/v1/keys/{created['id']}/rotate", token="developer", json={})
    await assert_spec5_error(r, 409, "key_revoked")


# rotate -------------------------------------------------------------------------


async def test_rotate_issues_a_key_with_the_same_fields_and_the_old_one_expires_after_the_grace(
    gw: Gateway,
) -> None:
    old = await gw.create_key(name="rot", owner="acme", scopes=["billing:read"], meta={"env": "prod"}, prefix="acme_")
    assert (await proxy(gw, old["key"], "/billing/x"))[0] == 200
    r = await gw.admin_call("POST", f"/v1/keys/{old['id']}/rotate", token="developer", json={"grace_seconds": 1})
    status, new = await answer(r)
    assert status == 201, new
    assert new["key"] != old["key"] and new["id"] != old["id"]
    assert new["key"].startswith("acme_")
    for name in ("name", "owner", "scopes", "meta"):
        assert new[name] == old[name], name
    assert new["enabled"] is True and new["revoked"] is False

    # During the grace period both keys work.
    status, echo = await proxy(gw, old["key"], "/billing/x")
    assert status == 200, echo
    status, echo = await proxy(gw, new["key"], "/billing/x")
    assert status == 200, echo
    assert dict(echo["headers"])["X-Gateway-Key-Id"] == new["id"]

    record = await show(gw, old["id"])
    assert record["expires_at"] is not None
    expires = parse_time(record["expires_at"])
    assert 0 < (expires - datetime.now(UTC)).total_seconds() <= 1.5

    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.15)
    await assert_spec5_error(await gw.call("GET", "/billing/x", key=old["key"]), 401, "key_expired")
    assert (await proxy(gw, new["key"], "/billing/x"))[0] == 200

    # The old key has been rotated already: its successor is the one to rotate.
    r = await gw.admin_call("POST", f"/v1/keys/{old['id']}/rotate", token="developer", json={})
    await assert_spec5_error(r, 409)


async def test_rotate_with_no_grace_expires_the_old_key_at_once(gw: Gateway) -> None:
    old = await gw.create_key(name="rot0")
    assert (await proxy(gw, old["key"]))[0] == 200  # cached as good
    status, new = await admin(gw, "POST", f"/v1/keys/{old['id']}/rotate", token="developer", json={"grace_seconds": 0})
    assert status == 201, new
    await assert_spec5_error(await gw.call("GET", "/api/ping", key=old["key"]), 401, "key_expired")
    assert (await proxy(gw, new["key"]))[0] == 200
    status, listing = await admin(gw, "GET", "/v1/keys", token="viewer")
    assert [k["id"] for k in listing["keys"]] == [old["id"], new["id"]]


# audit ----------------------------------------------------------------------------


async def test_audit_lists_who_did_what_to_which_key_when_why_and_from_where(gw: Gateway) -> None:
    a = await gw.create_key(name="a")
    b = await gw.create_key(name="b")
    base = f"/v1/keys/{a['id']}"
    assert (await admin(gw, "POST", base + "/disable", token="developer", json={"reason": "suspicious"}))[0] == 200
    assert (await admin(gw, "POST", base + "/enable", token="developer", json={}))[0] == 200
    assert (await admin(gw, "POST", base + "/revoke", token="admin", json={"reason": "compromised"}))[0] == 200

    entries = await audit_entries(gw)
    mine = [e for e in entries if e["key_id"] == a["id"]]
    assert [(e["action"], e["actor"], e["reason"]) for e in mine] == [
        ("revoke", "ops-admin", "compromised"),
        ("enable", "ops-developer", None),
        ("disable", "ops-developer", "suspicious"),
        ("create", "ops-developer", None),
    ]
    for entry in entries:
        assert {"actor", "action", "key_id", "reason", "remote", "at"} <= set(entry)
        assert entry["remote"] == "127.0.0.1"
        assert abs((datetime.now(UTC) - parse_time(entry["at"])).total_seconds()) < 60
    times = [parse_time(e["at"]) for e in entries]
    assert times == sorted(times, reverse=True)  # newest first
    assert {e["key_id"] for e in entries} == {a["id"], b["id"]}

    only_b = await audit_entries(gw, f"?key_id={b['id']}")
    assert [(e["action"], e["key_id"]) for e in only_b] == [("create", b["id"])]
    only_a = await audit_entries(gw, f"?key_id={a['id']}")
    assert [e["action"] for e in only_a] == ["revoke", "enable", "disable", "create"]


async def test_audit_records_imports_and_rotations(gw: Gateway) -> None:
    r = await gw.admin_call("POST", "/v1/keys", token="developer", json={"key": legacy_key()})
    _, imported = await answer(r)
    status, new = await admin(gw, "POST", f"/v1/keys/{imported['id']}/rotate", token="developer", json={})
    assert status == 201
    entries = await audit_entries(gw)
    pairs = {(e["action"], e["key_id"]) for e in entries}
    assert ("import", imported["id"]) in pairs
    assert ("rotate", imported["id"]) in pairs
    assert any(e["key_id"] == new["id"] for e in entries)


async def test_audit_pages_by_cursor(gw: Gateway) -> None:
    made = [(await gw.create_key(name=f"a{i}"))["id"] for i in range(7)]
    everything = await audit_entries(gw)
    assert [e["key_id"] for e in everything] == made[::-1]
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        status, body = await admin(gw, "GET", "/v1/audit" + query, token="admin")
        assert status == 200, body
        assert len(body["entries"]) <= 3
        seen += [e["key_id"] for e in body["entries"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]


async def test_a_refused_change_is_not_audited(gw: Gateway) -> None:
    created = await gw.create_key(name="x")
    before = await audit_entries(gw)
    r = await gw.admin_call("POST", f"/v1/keys/{created['id']}/revoke", token="developer", json={})
    await assert_spec5_error(r, 403, "insufficient_permissions")
    r = await gw.admin_call("POST", f"/v1/keys/{created['id']}/disable", token="developer", json={"reason": 5})
    await assert_spec5_error(r, 400, "invalid_request")
    assert await audit_entries(gw) == before
    assert (await show(gw, created["id"]))["enabled"] is True


# probes and metrics ---------------------------------------------------------------


async def test_healthz_and_readyz_answer_200_while_redis_answers(gw: Gateway) -> None:
    for path in ("/healthz", "/readyz"):
        r = await gw.admin_call("GET", path, token=None)
        async with r:
            assert r.status == 200, path
            assert r.content_type == "application/json"


async def test_readyz_is_503_with_a_spec5_body_when_redis_is_unreachable(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory(redis_url="redis://127.0.0.1:1/0")
    await assert_spec5_error(await gw.admin_call("GET", "/readyz", token=None), 503)
    r = await gw.admin_call("GET", "/healthz", token=None)
    async with r:
        assert r.status == 200  # the process itself is alive
    # The proxy fails closed too.
    await assert_spec5_error(await gw.call("GET", "/api/x", key="gw_" + secrets.token_urlsafe(24)), 503)


async def test_metrics_is_prometheus_text_counting_requests_by_route_and_code(gw: Gateway) -> None:
    created = await gw.create_key(name="m")
    for _ in range(3):
        assert (await proxy(gw, created["key"]))[0] == 200
    assert (await proxy(gw, None))[0] == 401
    r = await gw.admin_call("GET", "/metrics", token=None)
    async with r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    assert "# TYPE gateway_requests_total counter" in text

    def sample(route: str, code: str) -> float:
        for line in text.splitlines():
            if line.startswith("gateway_requests_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
                if labels.get("route") == route and labels.get("code") == code:
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no gateway_requests_total sample for route={route} code={code}:\n{text}")

    assert sample("api", "forwarded") == 3
    assert sample("api", "missing_key") == 1
    assert created["key"] not in text


# roles ----------------------------------------------------------------------------

# (method, path, minimum role, success status, body)
ENDPOINTS = [
    ("GET", "/v1/keys", "viewer", 200, None),
    ("GET", "/v1/keys/{id}", "viewer", 200, None),
    ("POST", "/v1/keys", "developer", 201, {"name": "made-by-role-test"}),
    ("POST", "/v1/keys/{id}/disable", "developer", 200, {"reason": "role test"}),
    ("POST", "/v1/keys/{id}/enable", "developer", 200, {}),
    ("POST", "/v1/keys/{id}/rotate", "developer", 201, {"grace_seconds": 5}),
    ("POST", "/v1/keys/{id}/revoke", "admin", 200, {"reason": "role test"}),
    ("GET", "/v1/audit", "admin", 200, None),
]
RANK = {"viewer": 0, "developer": 1, "admin": 2}
ROLE_TABLE = [
    pytest.param(method, path, role, RANK[role] >= RANK[minimum], ok, body, id=f"{method} {path} as {role}")
    for method, path, minimum, ok, body in ENDPOINTS
    for role in ("viewer", "developer", "admin")
]


@pytest.mark.parametrize(("method", "path", "role", "allowed", "ok", "body"), ROLE_TABLE)
async def test_each_endpoint_is_open_to_exactly_the_roles_the_spec_names(
    gw: Gateway, method: str, path: str, role: str, allowed: bool, ok: int, body: Any
) -> None:
    created = await gw.create_key(name="target")
    url = path.format(id=created["id"])
    before_audit = await audit_entries(gw)
    before_record = await show(gw, created["id"])
    r = await gw.admin_call(method, url, token=role, json=body)
    if allowed:
        async with r:
            assert r.status == ok, await r.text()
            assert r.content_type == "application/json"
        return
    err = await assert_spec5_error(r, 403, "insufficient_permissions")
    assert err["error"]["title"] == "Forbidden"
    # Nothing happened.
    assert await audit_entries(gw) == before_audit
    after = await show(gw, created["id"])
    assert {k: v for k, v in after.items() if k != "state"} == {k: v for k, v in before_record.items() if k != "state"}


AUTH_FAILURES = {
    "missing": {},
    "wrong token": {"Authorization": "Bearer gwadm_not_a_real_token_" + "x" * 20},
    "token of another scheme": {"Authorization": "Basic b3BzOnNlY3JldA=="},
    "empty bearer": {"Authorization": "Bearer "},
}


@pytest.mark.parametrize("failure", list(AUTH_FAILURES))
@pytest.mark.parametrize(
    ("method", "path", "body"), [pytest.param(m, p, b, id=f"{m} {p}") for m, p, _, _, b in ENDPOINTS]
)
async def test_a_missing_or_wrong_admin_token_is_401_on_every_endpoint(
    gw: Gateway, method: str, path: str, body: Any, failure: str
) -> None:
    url = path.format(id=UNKNOWN_ID)
    r = await gw.admin_call(method, url, token=None, json=body, headers=AUTH_FAILURES[failure])
    err = await assert_spec5_error(r, 401)
    assert err["error"]["title"] == "Unauthorized"
    assert err["error"]["code"] == ("missing_token" if failure == "missing" else "invalid_token")
    status, listing = await admin(gw, "GET", "/v1/keys", token="viewer")
    assert status == 200 and listing["keys"] == []


async def test_the_bearer_scheme_is_case_insensitive_on_the_admin_api(gw: Gateway) -> None:
    r = await gw.admin_call("GET", "/v1/keys", token=None, headers={"Authorization": f"bearer {gw.tokens.viewer}"})
    async with r:
        assert r.status == 200


async def test_admin_errors_carry_the_clients_request_id(gw: Gateway) -> None:
    r = await gw.admin_call("GET", "/v1/keys", token=None, headers={"X-Request-Id": "trace-abc.123"})
    body = await assert_spec5_error(r, 401)
    assert body["meta"]["requestId"] == "trace-abc.123"
    r = await gw.admin_call("GET", "/v1/keys?limit=0", token="viewer", headers={"X-Request-Id": "trace-def"})
    body = await assert_spec5_error(r, 400, "invalid_request")
    assert body["meta"]["requestId"] == "trace-def"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nothing", 404), ("DELETE", f"/v1/keys/{UNKNOWN_ID}", 405), ("PUT", "/v1/keys", 405)],
)
async def test_an_unknown_admin_path_or_method_answers_in_the_spec5_shape(
    gw: Gateway, method: str, path: str, status: int
) -> None:
    await assert_spec5_error(await gw.admin_call(method, path, token="admin"), status)


async def test_the_admin_token_is_never_echoed(gw: Gateway) -> None:
    wrong = "gwadm_wrong_" + secrets.token_urlsafe(24)
    r = await gw.admin_call("GET", "/v1/keys", token=wrong)
    async with r:
        assert r.status == 401
        text = await r.text()
        headers = str(r.headers)
    assert wrong not in text and wrong not in headers


async def test_an_admin_token_is_not_a_proxy_key_and_a_proxy_key_is_not_an_admin_token(gw: Gateway) -> None:
    created = await gw.create_key(name="k")
    await assert_spec5_error(await gw.admin_call("GET", "/v1/keys", token=created["key"]), 401)
    await assert_spec5_error(await gw.call("GET", "/api/x", key=gw.tokens.admin), 401, "key_not_found")


# bad input ------------------------------------------------------------------------

# (method, path, raw body, a word the detail must contain)
BAD_BODIES = [
    ("POST", "/v1/keys", b"{not json", "JSON"),
    ("POST", "/v1/keys", b'{"name": "x",}', "JSON"),
    ("POST", "/v1/keys", b'["name", "x"]', "object"),
    ("POST", "/v1/keys", b'"just a string"', "object"),
    ("POST", "/v1/keys", b'{"scopes": "billing:read"}', "scopes"),
    ("POST", "/v1/keys", b'{"scopes": {"billing:read": true}}', "scopes"),
    ("POST", "/v1/keys", b'{"scopes": ""}', "scopes"),
    ("POST", "/v1/keys", b'{"scopes": [1, 2]}', "scopes"),
    ("POST", "/v1/keys", b'{"scopes": ["has space"]}', "scopes"),
    ("POST", "/v1/keys", b'{"meta": ["a"]}', "meta"),
    ("POST", "/v1/keys", b'{"meta": []}', "meta"),
    ("POST", "/v1/keys", b'{"meta": "x"}', "meta"),
    ("POST", "/v1/keys", b'{"meta": 0}', "meta"),
    ("POST", "/v1/keys", b'{"name": 42}', "name"),
    ("POST", "/v1/keys", b'{"name": ""}', "name"),
    ("POST", "/v1/keys", b'{"name": "' + b"n" * 300 + b'"}', "name"),
    ("POST", "/v1/keys", b'{"name": "two\\nlines"}', "name"),
    ("POST", "/v1/keys", b'{"owner": ["acme"]}', "owner"),
    ("POST", "/v1/keys", b'{"meta": {"blob": "' + b"x" * 20_000 + b'"}}', "meta"),
    ("POST", "/v1/keys", b'{"scopes": [' + b",".join([b'"s"'] * 101) + b"]}", "scopes"),
    ("POST", "/v1/keys", b'{"expires_at": "tomorrow"}', "expires_at"),
    ("POST", "/v1/keys", b'{"expires_at": "2027-13-45T00:00:00Z"}', "expires_at"),
    ("POST", "/v1/keys", b'{"expires_at": "2031-01-01T00:00:00"}', "expires_at"),
    ("POST", "/v1/keys", b'{"expires_at": "2031-01-01"}', "expires_at"),
    ("POST", "/v1/keys", b'{"expires_at": "2001-01-01T00:00:00Z"}', "expires_at"),
    ("POST", "/v1/keys", b'{"expires_at": 1924992000}', "expires_at"),
    ("POST", "/v1/keys", b'{"nmae": "typo"}', "nmae"),
    ("POST", "/v1/keys", b'{"key": "legacy-abcdefghijklmnop", "key_sha256": "' + b"a" * 64 + b'"}', "key_sha256"),
    ("POST", "/v1/keys", b'{"key_sha256": "abc123"}', "key_sha256"),
    ("POST", "/v1/keys", b'{"key_sha256": "' + b"z" * 64 + b'"}', "key_sha256"),
    ("POST", "/v1/keys", b'{"key_sha256": 12345}', "key_sha256"),
    ("POST", "/v1/keys", b'{"prefix": "1bad_"}', "prefix"),
    ("POST", "/v1/keys", b'{"prefix": "gw-"}', "prefix"),
    ("POST", "/v1/keys", b'{"prefix": "gw"}', "prefix"),
    ("POST", "/v1/keys", b'{"prefix": ""}', "prefix"),
    ("POST", "/v1/keys", b'{"prefix": 7}', "prefix"),
    ("POST", "/v1/keys", b'{"prefix": "acme_", "key": "legacy-abcdefghijklmnop"}', "prefix"),
    ("POST", "/v1/keys/{id}/disable", b'{"reason": 42}', "reason"),
    ("POST", "/v1/keys/{id}/disable", b'{"why": "x"}', "why"),
    ("POST", "/v1/keys/{id}/disable", b"[]", "object"),
    ("POST", "/v1/keys/{id}/disable", b"{oops", "JSON"),
    ("POST", "/v1/keys/{id}/enable", b'{"force": true}', "force"),
    ("POST", "/v1/keys/{id}/revoke", b'{"reason": ["x"]}', "reason"),
    ("POST", "/v1/keys/{id}/rotate", b'{"grace_seconds": "10"}', "grace_seconds"),
    ("POST", "/v1/keys/{id}/rotate", b'{"grace_seconds": -1}', "grace_seconds"),
    ("POST", "/v1/keys/{id}/rotate", b'{"grace_seconds": 1.5}', "grace_seconds"),
    ("POST", "/v1/keys/{id}/rotate", b'{"grace_seconds": true}', "grace_seconds"),
    ("POST", "/v1/keys/{id}/rotate", b'{"grace": 10}', "grace"),
]

BAD_QUERIES = [
    ("/v1/keys?limit=0", "limit"),
    ("/v1/keys?limit=abc", "limit"),
    ("/v1/keys?limit=-5", "limit"),
    ("/v1/keys?limit=100000", "limit"),
    ("/v1/keys?enabled=maybe", "enabled"),
    ("/v1/keys?enabled=1", "enabled"),
    ("/v1/keys?cursor=%21%21garbage%21%21", "cursor"),
    ("/v1/keys?cursor=LTE", "cursor"),  # base64url of "-1"
    ("/v1/keys?cursor=bm90LWEtbnVtYmVy", "cursor"),  # base64url of "not-a-number"
    ("/v1/keys?ownr=acme", "ownr"),
    ("/v1/audit?limit=0", "limit"),
    ("/v1/audit?limit=abc", "limit"),
    ("/v1/audit?cursor=garbage", "cursor"),
    ("/v1/audit?key_id=not-an-id", "key_id"),
    ("/v1/audit?actor=ops", "actor"),
    ("/v1/keys/key_123", "id"),
    ("/v1/keys/KEY_0000000000000000000A", "id"),
]


@pytest.mark.parametrize(
    ("method", "path", "raw", "field"),
    [pytest.param(m, p, r, f, id=f"{p} {r[:50].decode()}") for m, p, r, f in BAD_BODIES],
)
async def test_a_bad_body_is_400_invalid_request_naming_the_field(
    gw: Gateway, method: str, path: str, raw: bytes, field: str
) -> None:
    created = await gw.create_key(name="target")
    before = await audit_entries(gw)
    r = await admin_raw(gw, method, path.format(id=created["id"]), raw, token="admin")
    body = await assert_spec5_error(r, 400, "invalid_request")
    assert field.lower() in body["error"]["detail"].lower(), body
    assert body["error"]["title"] == "Bad Request"
    assert await audit_entries(gw) == before
    status, listing = await admin(gw, "GET", "/v1/keys", token="viewer")
    assert status == 200 and [k["id"] for k in listing["keys"]] == [created["id"]]


@pytest.mark.parametrize(("path", "field"), [pytest.param(p, f, id=p) for p, f in BAD_QUERIES])
async def test_a_bad_query_or_id_is_400_invalid_request_naming_the_field(gw: Gateway, path: str, field: str) -> None:
    body = await assert_spec5_error(await gw.admin_call("GET", path, token="admin"), 400, "invalid_request")
    assert field.lower() in body["error"]["detail"].lower(), body


SECRET = "SuperSecretLegacyValue"
BAD_IMPORTS = {
    "not a token character": {"key": SECRET + " with spaces!"},
    "too short": {"key": SECRET[:10]},
    "too long": {"key": SECRET * 40},
    "not a string": {"key": [SECRET + "abcdefghij"]},
    "a number": {"key": 12345678901234567890},
    "both forms": {"key": SECRET + "-abcdefghij", "key_sha256": "0" * 64},
    "with a prefix": {"key": SECRET + "-abcdefghij", "prefix": "acme_"},
    "with a bad date": {"key": SECRET + "-abcdefghij", "expires_at": "soon"},
    "with an unknown field": {"key": SECRET + "-abcdefghij", "colour": "red"},
}


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
async def test_a_rejected_import_never_echoes_the_key(gw: Gateway, case: str) -> None:
    r = await gw.admin_call("POST", "/v1/keys", token="developer", json=BAD_IMPORTS[case])
    body = await assert_spec5_error(r, 400, "invalid_request")
    text = orjson.dumps(body).decode()
    assert SECRET not in text and SECRET[:10] not in text
    assert "12345678901234567890" not in text
    assert SECRET not in str(r.headers)
    status, listing = await admin(gw, "GET", "/v1/keys", token="viewer")
    assert status == 200 and listing["keys"] == []


async def test_an_oversized_body_is_refused_with_a_spec5_body(gw: Gateway) -> None:
    raw = orjson.dumps({"name": "big", "meta": {"blob": "x" * 200_000}})
    r = await admin_raw(gw, "POST", "/v1/keys", raw, token="developer")
    assert 400 <= r.status < 500
    body = await assert_spec5_error(r, r.status)
    assert body["error"]["code"] in {"payload_too_large", "invalid_request"}
    status, listing = await admin(gw, "GET", "/v1/keys", token="viewer")
    assert status == 200 and listing["keys"] == []


# argon2 cache ---------------------------------------------------------------------


@pytest.fixture
def argon2_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many times each token went through the (slow) argon2 verification."""
    calls: Counter[str] = Counter()
    original = TokenVerifier._verify_slowly

    def counting(self: TokenVerifier, token: str, *candidates: Any) -> Any:
        calls[token] += 1
        return original(self, token, *candidates)

    monkeypatch.setattr(TokenVerifier, "_verify_slowly", counting)
    return calls


async def test_each_admin_token_is_verified_with_argon2_once(gw: Gateway, argon2_calls: Counter[str]) -> None:
    calls = argon2_calls
    tokens = gw.tokens
    wrong = "gwadm_wrong_" + secrets.token_urlsafe(24)

    status, _ = await admin(gw, "GET", "/v1/keys", token="developer")
    assert status == 200
    assert calls == {tokens.developer: 1}

    async def one(i: int) -> int:
        r = await gw.admin_call("GET", "/v1/keys", token=("developer", "viewer", "admin")[i % 3])
        async with r:
            return r.status

    await admin(gw, "GET", "/v1/keys", token="viewer")
    await admin(gw, "GET", "/v1/keys", token="admin")
    statuses = await asyncio.gather(*(one(i) for i in range(21)))
    assert statuses == [200] * 21
    for _ in range(5):
        r = await gw.admin_call("GET", "/v1/keys", token=wrong)
        async with r:
            assert r.status == 401
    assert calls == {tokens.developer: 1, tokens.viewer: 1, tokens.admin: 1, wrong: 1}


async def test_concurrent_first_calls_with_one_token_share_one_argon2_verification(
    gw: Gateway, argon2_calls: Counter[str]
) -> None:
    calls = argon2_calls

    async def one() -> int:
        r = await gw.admin_call("GET", "/v1/keys", token="viewer")
        async with r:
            return r.status

    assert await asyncio.gather(*(one() for _ in range(6))) == [200] * 6
    assert calls == {gw.tokens.viewer: 1}


async def test_admin_change_metrics_count_only_changes_that_were_written(gw: Gateway) -> None:
    created = await gw.create_key(owner="acme")
    path = f"/v1/keys/{created['id']}"
    for _ in range(2):  # the repeat writes nothing
        status, _ = await admin(gw, "POST", path + "/disable", token="developer", json={"reason": "r"})
        assert status == 200
    status, _ = await admin(gw, "POST", path + "/revoke", token="admin", json={})
    assert status == 200
    status, _ = await admin(gw, "POST", path + "/enable", token="developer", json={})  # refused: revoked
    assert status == 409
    text = gw.replica.metrics.render().decode()
    assert 'gateway_admin_changes_total{action="create"} 1.0' in text
    assert 'gateway_admin_changes_total{action="disable"} 1.0' in text
    assert 'gateway_admin_changes_total{action="revoke"} 1.0' in text
    assert 'action="enable"' not in text
