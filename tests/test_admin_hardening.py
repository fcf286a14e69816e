"""Admin input bounds, cursors and tokens (spec 7, issue 10): a real gateway, a real redis-server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import multidict
import orjson
import pytest
from redis.asyncio import Redis

from gateway.admin.api import client_address
from gateway.admin.auth import FailureThrottle, TokenVerifier, client_bucket, hash_token, token_id
from gateway.config import AdminToken
from gateway.keytable.record import KeyRecord
from gateway.keytable.store import CursorCodec
from tests.conftest import ROOT, Gateway, cheap_hash

# helpers ---------------------------------------------------------------------


async def answer(r: aiohttp.ClientResponse) -> tuple[int, dict[str, Any]]:
    async with r:
        return r.status, orjson.loads(await r.read())


async def admin(gw: Gateway, method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    return await answer(await gw.admin_call(method, path, **kw))


def nested(levels: int) -> dict[str, Any]:
    """A meta object `levels` deep: nested(1) == {"v": 1}."""
    value: dict[str, Any] = {"v": 1}
    for _ in range(levels - 1):
        value = {"n": value}
    return value


def redis_errors(gw: Gateway) -> float:
    text = gw.replica.metrics.render().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gateway_redis_errors_total"))  # fmt: skip


async def list_all(gw: Gateway, query: str = "", limit: int = 7) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        q = f"?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        status, body = await admin(gw, "GET", "/v1/keys" + q, token="viewer")
        assert status == 200, body
        out += body["keys"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("pagination never ended")


def err(body: dict[str, Any]) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    return error


# input bounds ------------------------------------------------------------------


async def test_a_meta_251_levels_deep_is_400_and_nothing_is_stored(gw: Gateway) -> None:
    for levels in (251, 9):
        status, body = await admin(gw, "POST", "/v1/keys", token="developer", json={"meta": nested(levels)})
        assert status == 400, body
        assert err(body)["code"] == "invalid_request" and "meta" in err(body)["detail"]
        assert "8 levels" in err(body)["detail"]
    assert await list_all(gw) == []


async def test_a_meta_8_levels_deep_is_accepted_listed_and_shown(gw: Gateway) -> None:
    meta = nested(8)
    created = await gw.create_key(name="deep-enough", meta=meta)
    assert created["meta"] == meta
    (listed,) = await list_all(gw)
    assert listed["meta"] == meta
    status, shown = await admin(gw, "GET", f"/v1/keys/{created['id']}", token="viewer")
    assert status == 200 and shown["meta"] == meta
    # A list nests too: 8 levels with arrays is fine, 9 is not.
    assert (await gw.create_key(meta={"a": [[[[[[{"b": 1}]]]]]]}))["meta"]["a"][0][0][0][0][0][0] == {"b": 1}
    status, body = await admin(gw, "POST", "/v1/keys", token="developer", json={"meta": {"a": [[[[[[[[1]]]]]]]]}})
    assert status == 400 and "meta" in err(body)["detail"], body


async def test_meta_is_at_most_4_kib_encoded(gw: Gateway) -> None:
    def of_size(size: int) -> dict[str, str]:
        meta = {"blob": ""}
        meta["blob"] = "x" * (size - len(orjson.dumps(meta)))
        assert len(orjson.dumps(meta)) == size
        return meta

    assert (await gw.create_key(meta=of_size(4096)))["meta"] == of_size(4096)
    status, body = await admin(gw, "POST", "/v1/keys", token="developer", json={"meta": of_size(4097)})
    assert status == 400 and "4096 bytes" in err(body)["detail"], body


TEXT_CASES = [
    ("name", "n" * 200, True),
    ("name", "é" * 200, True),  # characters, not bytes
    ("name", "n" * 201, False),
    ("name", "tab\there", False),
    ("name", "c1\x85control", False),
    ("name", "del\x7f", False),
    ("name", "line\u2028separator", False),
    ("name", "   ", False),
    ("owner", "o" * 200, True),
    ("owner", "o" * 201, False),
    ("owner", "nul\x00byte", False),
]


@pytest.mark.parametrize(("field", "value", "ok"), TEXT_CASES, ids=[f"{f}-{len(v)}-{ok}" for f, v, ok in TEXT_CASES])
async def test_names_and_owners_are_at_most_200_characters_without_control_characters(
    gw: Gateway, field: str, value: str, ok: bool
) -> None:
    status, body = await admin(gw, "POST", "/v1/keys", token="developer", json={field: value})
    if ok:
        assert status == 201 and body[field] == value, body
    else:
        assert status == 400 and field in err(body)["detail"], body
        assert await list_all(gw) == []


@pytest.mark.parametrize(("reason", "ok"), [("r" * 200, True), ("r" * 201, False), ("bell\x07", False)])
async def test_reasons_are_at_most_200_characters_without_control_characters(
    gw: Gateway, reason: str, ok: bool
) -> None:
    created = await gw.create_key(name="target")
    for action in ("disable", "revoke"):
        status, body = await admin(
            gw, "POST", f"/v1/keys/{created['id']}/{action}", token="admin", json={"reason": reason}
        )
        if ok:
            assert status == 200 and body["disabled_reason"] == reason, body
        else:
            assert status == 400 and "reason" in err(body)["detail"], body
            status, shown = await admin(gw, "GET", f"/v1/keys/{created['id']}", token="viewer")
            assert shown["enabled"] is True


async def test_an_owner_filter_is_checked_like_an_owner(gw: Gateway) -> None:
    for owner in ("o" * 201, "a%0Ab"):
        status, body = await admin(gw, "GET", f"/v1/keys?owner={owner}", token="viewer")
        assert status == 400 and "owner" in err(body)["detail"], body


@pytest.mark.parametrize("limit", ["\u00b2", "\u0661\u0660", "9" * 5000, "+5", " 5", "5.0"])
async def test_a_limit_that_is_not_plain_ascii_digits_is_400_not_500(gw: Gateway, limit: str) -> None:
    for path in ("/v1/keys", "/v1/audit"):
        status, body = await admin(gw, "GET", f"{path}?limit={quote(limit)}", token="admin")
        assert status == 400 and "limit" in err(body)["detail"], body


def _raw_record(key_id: str, **fields: Any) -> bytes:
    record = KeyRecord(id=key_id, hash=hashlib.sha256(key_id.encode()).hexdigest(), name=key_id, owner="legacy",
                       created_at=time.time())  # fmt: skip
    return orjson.dumps({**orjson.loads(record.to_json()), **fields})


async def test_every_stored_record_remains_listable_and_readable(gw: Gateway, redis: Redis) -> None:
    """Records the API refuses today but an older version (or a hand) stored: each is listed and
    shown, none turns a page into a 500."""
    good = [(await gw.create_key(name=f"good-{i}", owner="legacy", meta=nested(8)))["id"] for i in range(3)]
    prefix = gw.replica.store.prefix
    odd: dict[str, bytes] = {
        "key_" + "a" * 20: _raw_record("key_" + "a" * 20, meta=nested(251)),  # accepted before the bound
        "key_" + "b" * 20: _raw_record("key_" + "b" * 20, meta=nested(253)),  # the deepest orjson stores
        "key_" + "c" * 20: b'{"id": "key_cccc", "not json',  # corrupt
        "key_" + "d" * 20: _raw_record("key_" + "d" * 20, created_at="yesterday", scopes=7),  # wrong types
        "key_" + "e" * 20: _raw_record("key_" + "e" * 20, meta={"blob": "x" * 200_000}),  # 200 kB of meta
        "key_" + "f" * 20: b"[]",
    }
    # Scored after the keys made before them, and the keys made after wait until the clock has
    # passed the last score: listed between the two, however fast the keys are made.
    last_good = await redis.zscore(f"{prefix}ids", good[-1])
    assert last_good is not None
    start = max(time.time(), last_good)
    scores = [start + (n + 1) / 1000 for n in range(len(odd))]
    for score, (key_id, raw) in zip(scores, odd.items(), strict=True):
        key_hash = hashlib.sha256(key_id.encode()).hexdigest()
        await redis.set(f"{prefix}k:{key_hash}", raw)
        await redis.set(f"{prefix}id:{key_id}", key_hash)
        await redis.zadd(f"{prefix}ids", {key_id: score})
        await redis.zadd(f"{prefix}owner:legacy", {key_id: score})
    await asyncio.sleep(scores[-1] - time.time() + 0.01)
    assert time.time() > scores[-1]
    more = [(await gw.create_key(name=f"after-{i}", owner="legacy"))["id"] for i in range(2)]
    everyone = good + list(odd) + more

    for limit in (1, 2, 5, 100):
        for query in ("", "&owner=legacy"):
            listed = await list_all(gw, query, limit)
            assert [r["id"] for r in listed] == everyone, (limit, query)
    by_id = {r["id"]: r for r in await list_all(gw)}
    assert by_id["key_" + "a" * 20]["meta"] == nested(251)
    assert by_id["key_" + "e" * 20]["meta"] == {"blob": "x" * 200_000}
    for key_id in ("key_" + "c" * 20, "key_" + "d" * 20, "key_" + "f" * 20):
        assert by_id[key_id]["unreadable"] is True and by_id[key_id]["state"] == "unreadable"
    # A filter on state lists the readable records that match it; it cannot vouch for an unreadable one.
    enabled = [r["id"] for r in await list_all(gw, "&enabled=true", 3)]
    assert enabled == [k for k in everyone if not by_id[k].get("unreadable")]

    for key_id in everyone:
        status, shown = await admin(gw, "GET", f"/v1/keys/{key_id}", token="viewer")
        assert status == 200 and shown["id"] == key_id, shown
    assert redis_errors(gw) == 0


async def test_an_audit_entry_that_does_not_decode_is_shown_with_nulls(gw: Gateway, redis: Redis) -> None:
    created = await gw.create_key(name="audited")
    prefix = gw.replica.store.prefix
    await redis.xadd(f"{prefix}audit", {"actor": "hand", "ts": "not-a-time", "detail": "{broken"})
    await redis.xadd(f"{prefix}audit", {b"action": b"\xff\xfe", b"key_id": created["id"].encode()})
    status, body = await admin(gw, "GET", "/v1/audit", token="admin")
    assert status == 200, body
    newest, hand, made = body["entries"]
    assert newest["action"] is None and newest["at"] is None
    assert hand["actor"] == "hand" and hand["at"] is None and hand["detail"] is None
    assert made["action"] == "create"


# cursors -----------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def flipped(cursor: str) -> str:
    """The cursor with one character of its signature changed."""
    last = cursor[-1]
    return cursor[:-1] + ("A" if last != "A" else "B")


FORGED_ANY = [
    b64(b"99999999999999999999999999"),  # a huge number, the old encoding
    b64(b"-1"),
    b64(b"18446744073709551616"),
    b64(b"10"),  # a cursor of the old encoding, in range
    b64(b"\x01" + b"\x00" * 8),  # a version and a position, unsigned
    b64(b"\x01" + b"\xff" * 8 + b"\x00" * 12),  # the largest position, a zero signature
    "A",
    "====",
    "%00",
    "é",
    "%C3%A9%C3%A9%C3%A9%C3%A9",
    "Zm9v\u0661",
    "x" * 5000,
    "MTA=",
    "+/+/",
    "0",
    "-1",
    "1e309",
    "NaN",
]
FORGED_AUDIT = [
    "99999999999999999999-1",
    "18446744073709551615-18446744073709551615",
    "1700000000000-0",  # a stream id that looks right: not a cursor this gateway issued
    "0-0",
    "-1-0",
    "1-",
    "+",
    "-",
    "(1-0",
]


async def _issued_cursors(gw: Gateway) -> dict[str, str]:
    """Real cursors: keys (plain and owner-filtered) and audit (all and per key)."""
    made = [(await gw.create_key(name=f"c{i}", owner="acme"))["id"] for i in range(4)]
    out: dict[str, str] = {}
    pages = {"keys": "/v1/keys?limit=2", "keys_acme": "/v1/keys?limit=2&owner=acme", "audit": "/v1/audit?limit=2"}
    for name, path in pages.items():
        status, body = await admin(gw, "GET", path, token="admin")
        assert status == 200 and body["next_cursor"], body
        out[name] = body["next_cursor"]
    status, body = await admin(gw, "POST", f"/v1/keys/{made[0]}/disable", token="admin", json={"reason": "x"})
    assert status == 200
    status, body = await admin(gw, "GET", f"/v1/audit?limit=1&key_id={made[0]}", token="admin")
    out["audit_key"] = body["next_cursor"]
    return out


async def test_forged_cursors_are_400_for_keys_and_audit_and_never_reach_redis(gw: Gateway) -> None:
    issued = await _issued_cursors(gw)
    other_key = "key_" + "0" * 20
    cases: list[str] = []
    for cursor in FORGED_ANY:
        cases += [f"/v1/keys?cursor={quote(cursor)}", f"/v1/audit?cursor={quote(cursor)}"]
    cases += [f"/v1/audit?cursor={quote(cursor)}" for cursor in FORGED_AUDIT]
    cases += [f"/v1/keys?cursor={quote(cursor)}" for cursor in FORGED_AUDIT]
    for name, cursor in issued.items():
        path = "/v1/audit" if name.startswith("audit") else "/v1/keys"
        other = "/v1/keys" if path == "/v1/audit" else "/v1/audit"
        cases += [
            f"{path}?cursor={flipped(cursor)}",  # tampered signature
            f"{path}?cursor={cursor[:-1]}",  # truncated
            f"{path}?cursor={cursor}A",  # extended
            f"{path}?cursor={cursor}=",  # a second spelling
            f"{path}?cursor={cursor.swapcase()}",
            f"{other}?cursor={cursor}",  # issued by the other endpoint
        ]
    cases += [
        f"/v1/keys?cursor={issued['keys']}&owner=acme",  # issued for another query
        f"/v1/keys?cursor={issued['keys_acme']}",
        f"/v1/keys?cursor={issued['keys']}&enabled=true",
        f"/v1/audit?cursor={issued['audit']}&key_id={other_key}",
        f"/v1/audit?cursor={issued['audit_key']}",
    ]
    before = redis_errors(gw)
    for path in cases:
        r = await gw.admin_call("GET", path, token="admin")
        status, body = await answer(r)
        assert status == 400, (path, body)
        assert err(body)["code"] == "invalid_request" and "cursor" in err(body)["detail"], (path, body)
    assert redis_errors(gw) == before == 0
    print(f"\n{len(cases)} forged cursors refused with 400")

    # The issued ones still work, each for its own query.
    for name, path in (("keys", "/v1/keys?limit=2"), ("keys_acme", "/v1/keys?limit=2&owner=acme"),
                       ("audit", "/v1/audit?limit=2")):  # fmt: skip
        status, body = await admin(gw, "GET", f"{path}&cursor={issued[name]}", token="admin")
        assert status == 200, (name, body)


async def test_audit_pages_through_every_entry_exactly_once(gw: Gateway) -> None:
    created = await gw.create_key(name="paged")
    for i in range(6):
        action = "disable" if i % 2 == 0 else "enable"
        status, _ = await admin(gw, "POST", f"/v1/keys/{created['id']}/{action}", token="admin", json={})
        assert status == 200
    status, everything = await admin(gw, "GET", "/v1/audit?limit=500", token="admin")
    assert status == 200 and len(everything["entries"]) == 7
    for query in ("", f"&key_id={created['id']}"):
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(20):
            status, body = await admin(gw, "GET", f"/v1/audit?limit=3{query}" + (f"&cursor={cursor}" if cursor else ""),
                                       token="admin")  # fmt: skip
            assert status == 200, body
            seen += [e["id"] for e in body["entries"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == [e["id"] for e in everything["entries"]]


def test_cursors_of_one_configuration_are_accepted_by_every_replica_of_it() -> None:
    one = CursorCodec.derived("gw:", "$argon2id$a", "$argon2id$b")
    again = CursorCodec.derived("gw:", "$argon2id$a", "$argon2id$b")
    other = CursorCodec.derived("gw:", "$argon2id$a", "$argon2id$c")
    cursor = one.keys(40, "[null,null]")
    assert again.keys_position(cursor, "[null,null]") == 40
    with pytest.raises(ValueError, match="keys"):
        other.keys_position(cursor, "[null,null]")
    stream = one.audit("1700000000123-7", "")
    assert again.audit_id(stream, "") == "1700000000123-7"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", cursor) and re.fullmatch(r"[A-Za-z0-9_-]+", stream)


# tokens ------------------------------------------------------------------------


def new_token(tid: str) -> str:
    return f"gwadm_{tid}_{secrets.token_urlsafe(32)}"


@pytest.fixture
def argon2_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[str, ...], float, float]]:
    """Every argon2 verification: (token, names of the entries tried, start, end) in monotonic time."""
    log: list[tuple[str, tuple[str, ...], float, float]] = []
    real = TokenVerifier._verify_slowly

    def logged(self: TokenVerifier, token: str, candidates: tuple[AdminToken, ...]) -> Any:
        start = time.monotonic()
        try:
            return real(self, token, candidates)
        finally:
            log.append((token, tuple(c.name for c in candidates), start, time.monotonic()))

    monkeypatch.setattr(TokenVerifier, "_verify_slowly", logged)
    return log


HASHES: dict[tuple[str, bool], str] = {}


def entry(name: str, role: str, token: str, tid: str | None, *, cheap: bool = False) -> dict[str, str]:
    """A config entry for `token`, hashed with the production argon2id parameters (`gateway hash-token`'s),
    or with the fixtures' cheap ones (tests/conftest.py) where the test counts verifications rather
    than timing them."""
    if (token, cheap) not in HASHES:
        HASHES[token, cheap] = cheap_hash(token) if cheap else hash_token(token)
    return {"name": name, "role": role, "hash": HASHES[token, cheap], **({"id": tid} if tid else {})}


VALID = new_token("valid1")
OTHER = new_token("other1")
LEGACY = "my-legacy-admin-token-" + secrets.token_urlsafe(16)


@contextlib.asynccontextmanager
async def session_from(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def call(session: aiohttp.ClientSession, gw: Gateway, token: str) -> tuple[int, dict[str, str], float]:
    start = time.monotonic()
    async with session.get(gw.admin_url + "/v1/keys", headers={"Authorization": f"Bearer {token}"}) as r:
        await r.read()
        return r.status, dict(r.headers), time.monotonic() - start


@pytest.fixture
async def shaped_gw(gateway_factory: Callable[..., Any]) -> Gateway:
    """A gateway whose entries all carry an id: no legacy entries."""
    tokens = [
        entry("valid", "viewer", VALID, "valid1", cheap=True),
        entry("other", "viewer", OTHER, "other1", cheap=True),
    ]
    gateway: Gateway = await gateway_factory(**{"admin.tokens": tokens})
    return gateway


async def test_an_unknown_id_or_a_token_of_another_shape_costs_no_argon2(
    shaped_gw: Gateway, argon2_log: list[Any]
) -> None:
    gw = shaped_gw
    wrong = [
        new_token("unknown9"),
        new_token("nope"),
        "gwadm_" + secrets.token_urlsafe(32),
        "not-a-gateway-token-" + secrets.token_urlsafe(20),
        LEGACY,
        "gwadm_VALID1_" + secrets.token_urlsafe(32),
    ]
    for token in wrong:
        status, body = await admin(gw, "GET", "/v1/keys", token=token)
        assert status == 401 and err(body)["code"] == "invalid_token", body
    assert argon2_log == []
    # A wrong secret for a configured id costs exactly that entry's verification, nothing else.
    status, _ = await admin(gw, "GET", "/v1/keys", token="gwadm_valid1_" + secrets.token_urlsafe(32))
    assert status == 401
    assert [names for _, names, _, _ in argon2_log] == [("valid",)]
    status, _ = await admin(gw, "GET", "/v1/keys", token=VALID)
    assert status == 200
    assert [names for _, names, _, _ in argon2_log] == [("valid",), ("valid",)]


async def test_old_shape_config_tokens_still_authenticate_beside_new_ones(
    gateway_factory: Callable[..., Any], argon2_log: list[Any]
) -> None:
    tokens = [entry("valid", "admin", VALID, "valid1", cheap=True), entry("old", "admin", LEGACY, None, cheap=True)]
    gw: Gateway = await gateway_factory(**{"admin.tokens": tokens})
    assert (await admin(gw, "GET", "/v1/audit", token=LEGACY))[0] == 200
    assert (await admin(gw, "GET", "/v1/audit", token=VALID))[0] == 200
    # With a legacy entry configured, a token that selects no id is tried against the legacy
    # entries only: the new-shape entries are never tried for it.
    assert (await admin(gw, "GET", "/v1/audit", token=new_token("unknown9")))[0] == 401
    assert sorted(names for _, names, _, _ in argon2_log) == [("old",), ("old",), ("valid",)]
    # Both kinds act, and the audit log names each by its entry's name.
    for token in (LEGACY, VALID):
        status, created = await admin(gw, "POST", "/v1/keys", token=token, json={})
        assert status == 201, created
    status, audit = await admin(gw, "GET", "/v1/audit", token=VALID)
    assert [e["actor"] for e in audit["entries"]] == ["valid", "old"]


async def test_failed_attempts_are_throttled_per_address_with_retry_after(
    shaped_gw: Gateway, argon2_log: list[Any]
) -> None:
    gw = shaped_gw
    verifier = gw.replica.api.verifier
    limit = verifier.throttle.max_failures
    # Known first from this address: a verified token is never throttled (it costs nothing).
    async with session_from("127.0.0.1") as here:
        assert (await call(here, gw, OTHER))[0] == 200
        for _ in range(limit):
            assert (await call(here, gw, "gwadm_valid1_" + secrets.token_urlsafe(32)))[0] == 401
        calls = len(argon2_log)
        status, headers, _ = await call(here, gw, "gwadm_valid1_" + secrets.token_urlsafe(32))
        assert status == 429
        assert 1 <= int(headers["Retry-After"]) <= verifier.throttle.window_seconds
        # Even the right secret, from this address, waits: no argon2 work is done for it.
        status, headers, _ = await call(here, gw, VALID)
        assert status == 429 and "Retry-After" in headers
        assert len(argon2_log) == calls
        wrong = {"Authorization": "Bearer gwadm_valid1_x" + "y" * 20}
        r = await gw.session.get(gw.admin_url + "/v1/keys", headers=wrong)
        body = orjson.loads(await r.read())
        assert r.status == 429 and err(body)["code"] == "too_many_requests" and r.headers["Retry-After"]
        assert body["meta"]["requestId"] == r.headers["X-Request-Id"]
        assert (await call(here, gw, OTHER))[0] == 200
        # Unknown ids from here are a budget of their own.
        for _ in range(limit):
            assert (await call(here, gw, new_token("unknown9")))[0] == 401
        assert (await call(here, gw, new_token("unknown9")))[0] == 429
    # Another address is not throttled: the right secret works from there.
    async with session_from("127.0.0.2") as there:
        assert (await call(there, gw, VALID))[0] == 200


async def test_a_burst_of_concurrent_guesses_from_one_address_cannot_pass_the_budget(
    shaped_gw: Gateway, argon2_log: list[Any]
) -> None:
    gw = shaped_gw
    limit = gw.replica.api.verifier.throttle.max_failures
    async with session_from("127.0.0.3") as s:
        results = await asyncio.gather(*(call(s, gw, "gwadm_other1_" + secrets.token_urlsafe(32)) for _ in range(200)))
    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {401, 429} and statuses[429] >= 200 - limit, statuses
    assert len(argon2_log) <= limit
    print(f"\n200 concurrent guesses from one address: {dict(statuses)}, {len(argon2_log)} argon2 verifications")


async def test_a_flood_of_wrong_tokens_does_not_delay_a_valid_tokens_first_use(
    gateway_factory: Callable[..., Any],
    argon2_log: list[tuple[str, tuple[str, ...], float, float]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """600 wrong tokens at once from another process (unknown ids, no shape, wrong secrets for a
    configured id), from nine addresses including the valid token's own; the valid token's first use
    waits for nothing but its own argon2 verification."""
    checks: dict[str, tuple[float, float]] = {}
    real_verify = TokenVerifier.verify

    async def timed(self: TokenVerifier, token: str, client: str | None = None) -> Any:
        start = time.monotonic()
        try:
            return await real_verify(self, token, client)
        finally:
            checks.setdefault(token, (start, time.monotonic()))

    monkeypatch.setattr(TokenVerifier, "verify", timed)
    valid = new_token("fresh1")  # never verified in this session: its first use pays argon2
    tokens = [entry("valid", "viewer", valid, "fresh1"), entry("other", "viewer", OTHER, "other1"),
              entry("old", "viewer", LEGACY, None)]  # fmt: skip
    gw: Gateway = await gateway_factory(**{"admin.tokens": tokens})
    addresses = ["127.0.0.1", *(f"127.0.0.{n}" for n in range(10, 18))]
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.admin_flood", gw.admin_url + "/v1/keys", "600", *addresses,
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert flood.stdout is not None
    try:
        assert await asyncio.wait_for(flood.stdout.readline(), 30) == b"sent\n"
        # Until the flood is under way: argon2 busy with the other id and with the legacy entry.
        deadline = time.monotonic() + 20
        while not ({("other",), ("old",)} <= {names for _, names, _, _ in argon2_log}):
            assert time.monotonic() < deadline, "the flood did not reach argon2"
            await asyncio.sleep(0.002)
        status, _, latency = await call(gw.session, gw, valid)  # from 127.0.0.1, flooding too
        statuses = orjson.loads(await asyncio.wait_for(flood.stdout.readline(), 60))
    finally:
        with contextlib.suppress(ProcessLookupError):
            flood.kill()
        await flood.wait()
    assert status == 200
    assert set(statuses) <= {"401", "429"} and sum(statuses.values()) == 600, statuses
    ((argon2_start, argon2_end),) = [(start, end) for token, _, start, end in argon2_log if token == valid]
    own = argon2_end - argon2_start
    checked, answered = checks[valid]
    waited = (argon2_start - checked) + (answered - argon2_end)  # in the verifier, beside its own argon2
    delay = latency - own  # everything but its own argon2: the verifier, the event loop, HTTP
    print(f"\nflood of 600 wrong tokens ({statuses}): the valid token's first use took {latency * 1000:.1f} ms, "
          f"its own argon2 {own * 1000:.1f} ms of it; delayed {delay * 1000:.1f} ms end to end, "
          f"of which {waited * 1000:.1f} ms in the verifier")  # fmt: skip
    # Queued behind even one other verification it would wait a whole argon2 (200 ms or more).
    assert waited < 0.25
    # End to end also counts the event loop serving the flood's HTTP on a shared, busy machine.
    assert delay < 1.0
    # Nothing was verified for the unknown ids, and nothing but the valid token under its id.
    assert {names for _, names, _, _ in argon2_log} <= {("other",), ("old",), ("valid",)}
    assert [token for token, names, _, _ in argon2_log if names == ("valid",)] == [valid]


# units ------------------------------------------------------------------------


def test_the_failure_throttle_opens_again_as_failures_age() -> None:
    now = [1000.0]
    throttle = FailureThrottle(3, 60.0, lambda: now[0])
    key = ("10.0.0.1", "valid1")
    for _ in range(3):
        assert throttle.retry_after(key) is None
        throttle.failed(key)
        now[0] += 10
    assert throttle.retry_after(key) == 30  # the first failure (t=1000) ages out at 1060
    assert throttle.retry_after(("10.0.0.2", "valid1")) is None
    assert throttle.retry_after(("10.0.0.1", "other1")) is None
    now[0] = 1060.5
    assert throttle.retry_after(key) is None


def test_a_verification_in_progress_counts_against_the_budget() -> None:
    throttle = FailureThrottle(2, 60.0, lambda: 0.0)
    key = ("10.0.0.1", "valid1")
    throttle.failed(key)
    throttle.begin(key)
    assert throttle.retry_after(key) is not None
    throttle.end(key)
    assert throttle.retry_after(key) is None


@pytest.mark.parametrize(
    ("remote", "bucket"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1", "2001:db8::/64"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        (None, "unknown"),
        ("not an address", "unknown"),
    ],
)
def test_failures_are_counted_per_address_and_per_ipv6_64(remote: str | None, bucket: str) -> None:
    assert client_bucket(remote) == bucket


@pytest.mark.parametrize(
    ("token", "tid"),
    [
        (f"gwadm_abcd_{'s' * 43}", "abcd"),
        (f"gwadm_ab_{'s' * 43}", None),
        (f"gwadm_ABCD_{'s' * 43}", None),
        ("gwadm_abcd_short", None),
        (f"gwadm_abcd_{'s' * 20}_more-", "abcd"),
        ("legacy-" + "x" * 30, None),
        (f"gwadm_{'a' * 33}_{'s' * 43}", None),
        (f"gwadm_abcd_{'s' * 20}!", None),
    ],
)
def test_the_token_id_is_read_only_from_the_exact_shape(token: str, tid: str | None) -> None:
    assert token_id(token) == tid


class _Request:
    def __init__(self, remote: str | None, xff: list[str]) -> None:
        self.remote = remote
        self.headers = multidict.CIMultiDict([("X-Forwarded-For", v) for v in xff])


@pytest.mark.parametrize(
    ("remote", "xff", "trusted", "client"),
    [
        ("203.0.113.9", ["1.2.3.4"], (), "203.0.113.9"),  # no trusted proxies: the header is ignored
        ("203.0.113.9", ["1.2.3.4"], ("10.0.0.0/8",), "203.0.113.9"),  # an untrusted peer's header: ignored
        ("10.0.0.2", ["1.2.3.4"], ("10.0.0.0/8",), "1.2.3.4"),
        ("10.0.0.2", ["6.6.6.6, 1.2.3.4, 10.0.0.7"], ("10.0.0.0/8",), "1.2.3.4"),  # the client forged 6.6.6.6
        ("10.0.0.2", ["6.6.6.6", "1.2.3.4"], ("10.0.0.0/8",), "1.2.3.4"),
        ("::ffff:10.0.0.2", ["2001:db8::5"], ("10.0.0.0/8",), "2001:db8::5"),
        ("10.0.0.2", [], ("10.0.0.0/8",), "10.0.0.2"),
        ("10.0.0.2", ["10.0.0.3"], ("10.0.0.0/8",), "10.0.0.2"),
    ],
)
def test_failures_behind_a_trusted_proxy_count_against_the_forwarded_client(
    remote: str, xff: list[str], trusted: tuple[str, ...], client: str
) -> None:
    networks = tuple(ipaddress.ip_network(n) for n in trusted)
    assert client_address(_Request(remote, xff), networks) == client  # type: ignore[arg-type]
