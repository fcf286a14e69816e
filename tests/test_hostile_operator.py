"""A hostile review of the operator console (spec 11), PATCH /v1/keys/{id} with rate limits and
credits (spec 12) and the usage endpoints and policies (spec 10): what an attacker or a careless
operator would try, each against a real gateway (in process) on a real redis-server.

Each test either pinned a defect before its fix (named in its docstring) or pins a guarantee that
an easy change would break.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
from redis.asyncio import Redis

from gateway.console.app import COOKIE, CSP
from tests.conftest import Gateway
from tests.test_console import NONCE, Browser, browsers, session_key, signed_in

__all__ = ["browsers"]  # the fixture, shared with tests/test_console.py

_FRAME_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def assert_spec5(data: Any, status: int, code: str) -> None:
    """The error body of spec 5, whatever the input was."""
    assert set(data) == {"meta", "error"}, data
    error = data["error"]
    assert error["code"] == code and error["status"] == status, data
    assert set(error) == {"code", "title", "detail", "status", "type"}, data
    assert isinstance(data["meta"]["requestId"], str) and data["meta"]["requestId"]


async def everything_in(redis: Redis) -> bytes:
    """Every value in this Redis, whatever its type, as one blob to search (pipelined: the
    worker's Redis holds every earlier test's keys too)."""
    names = [name async for name in redis.scan_iter("*", count=1000)]
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.type(name)
    kinds = [k.decode() for k in await pipe.execute()]
    read = {
        "string": "get",
        "hash": "hgetall",
        "list": "lrange",
        "set": "smembers",
        "zset": "zrange",
        "stream": "xrange",
    }
    pipe = redis.pipeline(transaction=False)
    for name, kind in zip(names, kinds, strict=True):
        if kind in ("list", "zset"):
            getattr(pipe, read[kind])(name, 0, -1)
        elif kind in read:
            getattr(pipe, read[kind])(name)
        else:
            pipe.exists(name)  # a type this search cannot read: fail below rather than skip it
    out: list[bytes] = []
    for name, kind, value in zip(names, kinds, await pipe.execute(), strict=True):
        assert kind in read or kind == "none", f"{name!r} is a {kind}: teach everything_in to read it"
        if kind == "string":
            out.append(value or b"")
        elif kind == "hash":
            out.extend(k + b"=" + v for k, v in value.items())
        elif kind in ("list", "set", "zset"):
            out.extend(value)
        elif kind == "stream":
            for _, fields in value:
                out.extend(k + b"=" + v for k, v in fields.items())
        out.append(name)
    return b"\n".join(out)


# the console ------------------------------------------------------------------------------


async def test_every_console_answer_carries_the_frame_headers_redirects_errors_and_static_files(
    gw: Gateway, browsers: Any
) -> None:
    """Was broken: the 303s after a change and after sign-out, the static files and the JSON 404/405
    of console paths went out without X-Frame-Options, CSP, nosniff or no-store."""
    key = await gw.create_key(name="frames", owner="f")
    b: Browser = await signed_in(browsers, gw.tokens.admin)
    answers: list[tuple[str, aiohttp.ClientResponse]] = []
    for path in ("/static/console.css", "/static/console.js", "/no-such-page", "/keys/x/y/z"):
        _, _, r = await b.get(path)
        answers.append((path, r))
    status, _, r = await b.get("/sign-out")  # a GET cannot sign out
    assert status == 405
    answers.append(("GET /sign-out", r))
    status, _, r = await b.post(f"/keys/{key['id']}/disable", {"reason": "frames"})
    assert status == 303
    answers.append(("POST disable", r))
    status, _, r = await b.post("/keys", {"name": "made-here"})
    assert status == 303
    answers.append(("POST /keys", r))
    status, _, r = await b.post("/sign-out", {})
    assert status == 303
    answers.append(("POST /sign-out", r))
    for what, r in answers:
        for name, value in _FRAME_HEADERS.items():
            assert r.headers.get(name) == value, (what, name, dict(r.headers))
    for what, r in answers[-3:]:  # a redirect after a change is never cached either
        assert r.headers.get("Cache-Control") == "no-store", what
    # The JSON API keeps its own answers.
    async with await gw.admin_call("GET", "/v1/keys", token="viewer") as api:
        assert api.status == 200 and api.headers["Cache-Control"] == "no-store"


async def test_a_new_keys_plaintext_is_never_in_redis_in_the_clear(gw: Gateway, browsers: Any) -> None:
    """Was broken: between the create (or rotate) and the page that shows it, the plaintext sat in
    Redis as JSON for up to two minutes (in an AOF, a replica and an RDB snapshot for longer)."""
    b: Browser = await signed_in(browsers, gw.tokens.developer)
    status, _, r = await b.post("/keys", {"name": "in-the-clear"})
    assert status == 303
    location = r.headers["Location"]
    key_id = location.split("/")[2]
    redis = gw.replica.store.redis
    blob_before = await everything_in(redis)
    status, page, _ = await b.get(location)
    match = re.search(r'id="secret" readonly value="([^"]+)"', page)
    assert status == 200 and match, page
    plaintext = match[1]
    assert plaintext.encode() not in blob_before
    assert plaintext[8:32].encode() not in blob_before  # nor a good part of it
    async with await gw.call("GET", "/api/x", key=plaintext) as proxied:
        assert proxied.status == 200  # the page showed the real key
    # Rotation: the same.
    status, _, r = await b.post(f"/keys/{key_id}/rotate", {"grace_seconds": "0"})
    assert status == 303
    blob_before = await everything_in(redis)
    status, page, _ = await b.get(r.headers["Location"])
    match = re.search(r'id="secret" readonly value="([^"]+)"', page)
    assert status == 200 and match
    assert match[1].encode() not in blob_before and match[1][8:32].encode() not in blob_before
    # Another session (same token) cannot read it; nor can this one twice.
    status, page, _ = await b.get(r.headers["Location"])
    assert 'id="secret"' not in page


async def test_a_once_value_cannot_be_read_with_another_session(gw: Gateway, browsers: Any) -> None:
    """The value shown once is bound to the session that made it: copied under another session's
    name in Redis, it does not decode (the key for it is the cookie, which Redis never holds)."""
    a: Browser = await signed_in(browsers, gw.tokens.developer)
    c: Browser = await signed_in(browsers, gw.tokens.developer)
    status, _, r = await a.post("/keys", {"name": "bound"})
    assert status == 303
    redis = gw.replica.store.redis
    a_id, c_id = a.session_id(), c.session_id()
    assert a_id and c_id
    stolen = await redis.get(session_key(gw, a_id) + ":once")
    assert stolen is not None
    await redis.set(session_key(gw, c_id) + ":once", stolen, ex=60)
    status, page, _ = await c.get(r.headers["Location"])
    assert status == 200 and 'id="secret"' not in page and 'id="gone"' in page


async def test_login_csrf_method_override_and_content_type_tricks_are_refused(gw: Gateway, browsers: Any) -> None:
    """Held already: a cross-site sign-in (no nonce cookie), a cross-site text/plain or JSON form,
    a sibling site, a method override and a GET never change anything."""
    key = await gw.create_key(name="tricks", owner="t")
    # Login CSRF: an attacker's page posting its own token to the victim's console.
    attacker: Browser = browsers()
    status, page, r = await attacker.post(
        "/sign-in", {"token": gw.tokens.admin, "nonce": "x" * 32}, csrf=False, headers={"Origin": "null"}
    )
    assert status == 403 and COOKIE not in r.cookies
    # A nonce from one browser with another's cookie: refused too.
    victim: Browser = browsers()
    _, page, _ = await victim.get("/sign-in")
    nonce = NONCE.search(page)
    assert nonce
    status, _, r = await attacker.post("/sign-in", {"token": gw.tokens.admin, "nonce": nonce[1]}, csrf=False)
    assert status == 403 and COOKIE not in r.cookies

    b: Browser = await signed_in(browsers, gw.tokens.developer)
    path = b.url(f"/keys/{key['id']}/disable")
    form = f"csrf={b.csrf}&reason=tricks"
    tricks: list[tuple[str, dict[str, Any]]] = [
        ("text/plain", {"data": form, "headers": {"Content-Type": "text/plain"}}),
        ("json", {"json": {"csrf": b.csrf, "reason": "tricks"}}),
        ("query string", {"params": {"csrf": b.csrf}, "data": {"reason": "tricks"}}),
        ("same-site", {"data": {"csrf": b.csrf}, "headers": {"Sec-Fetch-Site": "same-site"}}),
        ("cross-site", {"data": {"csrf": b.csrf}, "headers": {"Sec-Fetch-Site": "cross-site"}}),
        ("other port", {"data": {"csrf": b.csrf}, "headers": {"Origin": "http://127.0.0.1:1"}}),
    ]
    for what, kw in tricks:
        async with b.http.post(path, allow_redirects=False, **kw) as r:
            assert r.status == 403, what
            assert "csrf_rejected" in await r.text(), what
    # A method override is not a thing here: GET with the override header only shows the dialog page.
    status, page, _ = await b.get(
        f"/keys/{key['id']}/disable?csrf={b.csrf}", headers={"X-HTTP-Method-Override": "POST"}
    )
    assert status == 200 and "Confirm" in page
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        assert (await r.json())["enabled"] is True


async def test_a_viewer_cannot_reach_a_change_through_another_route(gw: Gateway, browsers: Any) -> None:
    """Held already: with a viewer's own valid CSRF token, neither a developer's nor an admin's
    change goes through by any path spelling."""
    key = await gw.create_key(name="climb", owner="v")
    viewer: Browser = await signed_in(browsers, gw.tokens.viewer)
    for path, form in [
        (f"/keys/{key['id']}/enable", {}),
        (f"/keys/{key['id']}/disable/", {"reason": "slash"}),
        (f"/keys/{key['id']}//disable", {"reason": "double"}),
        (f"/keys/{key['id'].upper()}/disable", {"reason": "upper"}),
        ("/keys", {"name": "viewer-made"}),
    ]:
        status, _, _ = await viewer.post(path, form)
        assert status in (400, 403, 404, 405), (path, status)
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        assert (await r.json())["enabled"] is True
    async with await gw.admin_call("GET", "/v1/keys") as r:
        assert all(k["name"] != "viewer-made" for k in (await r.json())["keys"])


# PATCH, rate limits and credits -------------------------------------------------------------------


async def patch(gw: Gateway, key_id: str, body: Any, token: str = "developer") -> tuple[int, Any]:
    async with await gw.admin_call("PATCH", f"/v1/keys/{key_id}", token=token, json=body) as r:
        return r.status, await r.json()


async def test_patch_cannot_stretch_the_grace_of_a_rotated_key(gw: Gateway) -> None:
    """Was broken: after a rotation the old key expires after the grace (spec 8), but a PATCH of its
    expires_at (later, or null) kept the replaced, perhaps leaked, key working for ever."""
    old = await gw.create_key(name="leaked")
    async with await gw.admin_call(
        "POST", f"/v1/keys/{old['id']}/rotate", token="developer", json={"grace_seconds": 60}
    ) as r:
        assert r.status in (200, 201), await r.text()
    for expires in (None, "2099-01-01T00:00:00Z"):
        status, data = await patch(gw, old["id"], {"expires_at": expires})
        assert status == 409, data
        assert_spec5(data, 409, "key_rotated")
    async with await gw.admin_call("GET", f"/v1/keys/{old['id']}") as r:
        shown = await r.json()
    assert shown["expires_at"] is not None and shown["expires_at"] < "2099"
    # Its other fields may still change (a name, a limit while it drains).
    status, data = await patch(gw, old["id"], {"name": "leaked-old"})
    assert status == 200 and data["name"] == "leaked-old"


async def test_patch_refuses_hostile_input_in_the_spec5_shape(gw: Gateway) -> None:
    """Held already, except the year: an expires_at past year 9999 in UTC was taken and then shown
    as '10000-01-01T...' (not RFC 3339, and refused when sent back)."""
    key = await gw.create_key(name="junk")
    limit = {"name": "m", "limit": 5, "window_seconds": 60}
    bodies: list[Any] = [
        {"expires_at": "9999-12-31T23:59:59-23:59"},
        {"expires_at": "2027-01-01"},
        {"expires_at": 1893456000},
        {"credits": {"remaining": 1.5}},
        {"credits": {"remaining": True}},
        {"credits": {"remaining": 10**30}},
        {"credits": {"add": -(10**30)}},
        {"credits": {"remaining": -1}},
        {"credits": {"refill": {"amount": 1, "interval": 0}}},
        {"credits": {"refill": {"amount": 1, "interval": 60, "extra": 1}}},
        {"credits": [1, 2]},
        {"credits": {"remaining": {"$gt": 0}}},
        {"ratelimits": [{**limit, "limit": 1.0}]},
        {"ratelimits": [{**limit, "limit": False}]},
        {"ratelimits": [{**limit, "limit": 10**20}]},
        {"ratelimits": [{**limit, "window_seconds": -60}]},
        {"ratelimits": [limit, {**limit, "limit": 6}]},
        {"ratelimits": [[limit]]},
        {"ratelimits": {"m": limit}},
        {"ratelimits": [{**limit, "name": "x" * 10_000}]},
        {"name": {"a": 1}},
        {"name": "x" * 201},
        {"scopes": "billing:read"},
        {"meta": "not an object"},
        {"meta": {"a": [[[[[[[[[[1]]]]]]]]]]}},
        {"enabled": False},
        {"revoked": True},
        [{"name": "array body"}],
    ]
    for body in bodies:
        status, data = await patch(gw, key["id"], body)
        assert status == 400, (body, status, data)
        assert_spec5(data, 400, "invalid_request")
    for raw in (b'{"credits": {"remaining": 1e400}}', b'{"name": "a", "name": "b", ', b"\xff\xfe"):
        async with await gw.admin_call(
            "PATCH", f"/v1/keys/{key['id']}", token="developer", data=raw, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400, raw
            assert_spec5(await r.json(), 400, "invalid_request")
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        shown = await r.json()
    assert shown["name"] == "junk" and shown["credits"] is None and shown["ratelimits"] == []
    assert shown["expires_at"] is None and shown["enabled"] is True


async def test_patch_of_a_revoked_key_and_credits_taken_below_zero(gw: Gateway) -> None:
    """Held already: a revoked key cannot be changed (409 key_revoked); credits added to a key that
    had none start from 0 and never go below it."""
    key = await gw.create_key(name="spent")
    status, data = await patch(gw, key["id"], {"credits": {"add": -5}})
    assert status == 200, data
    assert data["credits"]["remaining"] == 0, data
    async with await gw.call("GET", "/api/x", key=key["key"]) as r:
        assert r.status == 429 and (await r.json())["error"]["code"] == "usage_exceeded"
    status, data = await patch(gw, key["id"], {"credits": {"add": 2}})
    assert status == 200 and data["credits"]["remaining"] == 2, data
    async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/revoke", token="admin", json={}) as r:
        assert r.status == 200, await r.text()
    for body in ({"name": "back"}, {"credits": None}, {"expires_at": None}):
        status, data = await patch(gw, key["id"], body)
        assert status == 409, (body, data)
        assert_spec5(data, 409, "key_revoked")


async def test_a_patch_and_a_disable_at_once_both_hold(gw: Gateway) -> None:
    """Held already: the change of a PATCH never undoes a disable made meanwhile, nor the reverse
    (each write is a compare-and-set on the record it read)."""
    for i in range(8):
        key = await gw.create_key(name=f"race-{i}")
        path = f"/v1/keys/{key['id']}"

        async def patch_it(n: int, key_id: str = key["id"]) -> int:
            status, _ = await patch(gw, key_id, {"name": f"renamed-{n}", "credits": {"add": 1}})
            return status

        async def disable_it(key_id: str = key["id"]) -> int:
            async with await gw.admin_call(
                "POST", f"/v1/keys/{key_id}/disable", token="developer", json={"reason": "race"}
            ) as r:
                return r.status

        statuses = await asyncio.gather(patch_it(1), disable_it(), patch_it(2))
        assert list(statuses) == [200, 200, 200], statuses
        async with await gw.admin_call("GET", path) as r:
            shown = await r.json()
        assert shown["enabled"] is False and shown["disabled_reason"] == "race", shown
        assert shown["name"] in ("renamed-1", "renamed-2")
        assert shown["credits"]["remaining"] == 2, shown  # both adds counted once each
        async with await gw.call("GET", "/api/x", key=key["key"]) as r:
            assert r.status == 403


# usage ---------------------------------------------------------------------------------------


async def test_forged_forwarded_for_from_an_untrusted_peer_cannot_trip_an_address_policy(
    gateway_factory: Any,
) -> None:
    """Held already: without trusted_proxies, X-Forwarded-For from the client is not its address,
    so forging 20 of them counts one address and a distinct_addresses policy does not fire."""
    rule = {"name": "shared", "rule": "distinct_addresses", "above": 2, "window": "10m"}
    gw: Gateway = await gateway_factory(**{"usage.flush_seconds": 300, "policies": [rule]})
    key = await gw.create_key(name="victim")
    for i in range(20):
        headers = {"X-Forwarded-For": f"203.0.113.{i}", "X-Real-IP": f"198.51.100.{i}", "Forwarded": f"for=10.0.0.{i}"}
        async with await gw.call("GET", "/api/x", key=key["key"], headers=headers) as r:
            assert r.status == 200
    await gw.replica.usage.flush()  # type: ignore[union-attr]
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}/usage?window=1h", token="viewer") as r:
        body = await r.json()
    assert body["distinct_addresses"] == 1 and body["last_used_ip"] == "127.0.0.1", body
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        assert (await r.json())["enabled"] is True


async def test_bad_usage_windows_and_dates_get_the_spec5_shape(gw: Gateway) -> None:
    """Held already: no window or date a client can write gets past the parser or a 5xx."""
    key = await gw.create_key(name="dates")
    for query in ("window=7d", "window=", "window=1H", "window=1h%00", "from=0", "window=1h&window=30d&x=1"):
        async with await gw.admin_call("GET", f"/v1/keys/{key['id']}/usage?{query}", token="viewer") as r:
            assert r.status == 400, query
            assert_spec5(await r.json(), 400, "invalid_request")
    for since in ("yesterday", "2026-01-01", "99999999d", "-5d", "1e9", "2026-13-01T00:00:00Z", "x" * 5000,
                  "2026-01-01T00:00:00"):  # fmt: skip
        async with await gw.admin_call("GET", "/v1/keys", token="viewer", params={"unused_since": since}) as r:
            assert r.status == 400, since
            assert_spec5(await r.json(), 400, "invalid_request")
    for since in ("99999d", "0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59-23:59"):
        async with await gw.admin_call("GET", "/v1/keys", token="viewer", params={"unused_since": since}) as r:
            assert r.status == 200, (since, await r.text())
    async with await gw.admin_call("GET", "/v1/keys/key_00000000000000000000/usage", token="viewer") as r:
        assert r.status == 404
        assert_spec5(await r.json(), 404, "key_not_found")


async def test_the_consoles_unused_since_filter_leaves_out_keys_in_use(gw: Gateway, browsers: Any) -> None:
    """Was broken: the console's rows had no last use (the record's fields only), so "unused since"
    filtered nothing: a key in use was listed as unused, for an operator about to revoke the
    unused ones. The key page did not show the last use either."""
    used = await gw.create_key(name="in-use", owner="tidy")
    idle = await gw.create_key(name="idle", owner="tidy")
    async with await gw.call("GET", "/api/x", key=used["key"]) as r:
        assert r.status == 200
    await gw.replica.usage.flush()  # type: ignore[union-attr]
    b: Browser = await signed_in(browsers, gw.tokens.viewer)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    status, page, _ = await b.get(f"/keys?q=tidy&unused_since={today}")
    assert status == 200
    assert idle["id"] in page and used["id"] not in page
    status, page, _ = await b.get(f"/keys?unused_since={today}")  # no search text: the same
    assert idle["id"] in page and used["id"] not in page
    status, page, _ = await b.get(f"/keys/{used['id']}?q=x")
    assert status == 200 and 'id="last-used"' in page and today in page and "127.0.0.1" in page
    status, page, _ = await b.get(f"/keys/{idle['id']}")
    assert 'id="last-used">never' in page


async def test_removing_credits_from_a_rotated_key_leaves_its_successors_balance(gw: Gateway) -> None:
    """A rotated key's successor shares its balance (docs/ratelimits.md): an operator tidying the old
    key (`credits: null`) must not take the successor's credits with it."""
    old = await gw.create_key(name="metered", credits={"remaining": 5})
    async with await gw.admin_call(
        "POST", f"/v1/keys/{old['id']}/rotate", token="developer", json={"grace_seconds": 60}
    ) as r:
        assert r.status in (200, 201), await r.text()
        new = await r.json()
    status, data = await patch(gw, old["id"], {"credits": None})
    assert status == 200 and data["credits"] is None, data
    async with await gw.call("GET", "/api/x", key=new["key"]) as r:
        assert r.status == 200, await r.text()
    async with await gw.admin_call("GET", f"/v1/keys/{new['id']}") as r:
        shown = await r.json()
    assert shown["credits"]["remaining"] == 4, shown


async def test_no_redirect_goes_off_site(gw: Gateway, browsers: Any) -> None:
    """Held already: no page takes its redirect from the request (there is no `next=`), and no
    path spelling makes the admin listener answer with a Location to another host."""
    b: Browser = browsers()
    _, page, _ = await b.get("/sign-in?next=//evil.example")
    nonce = NONCE.search(page)
    assert nonce and "evil.example" not in page
    async with b.http.post(
        b.url("/sign-in?next=https://evil.example&redirect=//evil.example"),
        data={"token": gw.tokens.viewer, "nonce": nonce[1], "next": "//evil.example"},
        allow_redirects=False,
    ) as r:
        assert r.status == 303 and r.headers["Location"] == "/keys"
    for path in ("//evil.example", "//evil.example/keys", "/\\evil.example", "/keys/", "/%2F%2Fevil.example",
                 "/keys?next=//evil.example", "/static/..%2f..%2fapp.py", "/static//etc/passwd"):  # fmt: skip
        async with b.http.get(b.url(path), allow_redirects=False) as r:
            location = r.headers.get("Location", "")
            assert not location or (location.startswith("/") and not location.startswith(("//", "/\\"))), path
            assert "evil.example" not in location, path
            body = await r.text()
            assert "import " not in body and "root:" not in body, path


async def test_a_rotation_and_a_patch_of_the_expiry_at_once_leave_the_grace_in_force(gw: Gateway) -> None:
    """The rotated-key check is made on the record the write replaces (inside the compare-and-set):
    a PATCH read before the rotation and written after it is read again and refused."""
    for i in range(8):
        old = await gw.create_key(name=f"rot-race-{i}")

        async def rotate(key_id: str = old["id"]) -> int:
            async with await gw.admin_call(
                "POST", f"/v1/keys/{key_id}/rotate", token="developer", json={"grace_seconds": 30}
            ) as r:
                return r.status

        async def stretch(key_id: str = old["id"]) -> int:
            status, _ = await patch(gw, key_id, {"expires_at": None})
            return status

        rotated, stretched = await asyncio.gather(rotate(), stretch())
        assert rotated in (200, 201) and stretched in (200, 409), (rotated, stretched)
        async with await gw.admin_call("GET", f"/v1/keys/{old['id']}") as r:
            shown = await r.json()
        assert shown["rotated_to"] and shown["expires_at"] is not None, shown


async def test_a_forged_forwarded_for_does_not_dodge_the_sign_in_throttle(gw: Gateway, browsers: Any) -> None:
    """Held already: without trusted_proxies, each failed sign-in counts against the peer, whatever
    X-Forwarded-For it sends, so a new forged address a try buys no more guesses."""
    b: Browser = browsers()
    statuses = []
    for i in range(11):
        _, page, _ = await b.get("/sign-in")
        nonce = NONCE.search(page)
        assert nonce
        async with b.http.post(
            b.url("/sign-in"),
            data={"token": "gwadm_admin_" + "g" * 32, "nonce": nonce[1]},
            headers={"X-Forwarded-For": f"198.51.100.{i}", "X-Real-IP": f"198.51.100.{i}"},
            allow_redirects=False,
        ) as r:
            statuses.append(r.status)
    assert statuses == [401] * 10 + [429], statuses
    # And the right token from that peer now waits too: the throttle is not per token text.
    _, page, _ = await b.get("/sign-in")
    nonce = NONCE.search(page)
    assert nonce
    async with b.http.post(
        b.url("/sign-in"), data={"token": gw.tokens.admin, "nonce": nonce[1]}, allow_redirects=False
    ) as r:
        assert r.status == 429 and COOKIE not in r.cookies


async def test_stopping_the_refill_of_a_key_without_credits_does_not_lock_it_out(gw: Gateway) -> None:
    """Was broken: `credits: {refill: null}` (stop the refill) on a key that had no credits gave it
    credits at a balance of 0: every request after it was 429 usage_exceeded."""
    key = await gw.create_key(name="unmetered")
    status, data = await patch(gw, key["id"], {"credits": {"refill": None}})
    assert status == 400, data
    assert_spec5(data, 400, "invalid_request")
    assert "credits" in data["error"]["detail"]
    async with await gw.call("GET", "/api/x", key=key["key"]) as r:
        assert r.status == 200
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        assert (await r.json())["credits"] is None
    # On a key with credits it stops the refill and leaves the balance.
    status, data = await patch(gw, key["id"], {"credits": {"remaining": 3, "refill": {"amount": 3, "interval": 60}}})
    assert status == 200, data
    status, data = await patch(gw, key["id"], {"credits": {"refill": None}})
    assert status == 200 and data["credits"] == {"remaining": 3, "refill": None}, data


async def test_the_json_api_takes_no_console_cookie(gw: Gateway, browsers: Any) -> None:
    """Held already: the console's cookie is on the same listener as the JSON API, which takes only
    a bearer token, so a cross-site JSON or form POST riding the cookie changes nothing."""
    key = await gw.create_key(name="cookie-ride")
    b: Browser = await signed_in(browsers, gw.tokens.admin)
    for kw in ({"json": {"reason": "ride"}}, {"data": {"reason": "ride", "csrf": b.csrf}}):
        async with b.http.post(b.url(f"/v1/keys/{key['id']}/disable"), allow_redirects=False, **kw) as r:
            assert r.status == 401, await r.text()
            assert_spec5(await r.json(), 401, "missing_token")
    async with b.http.get(b.url("/v1/keys")) as r:
        assert r.status == 401 and "Access-Control-Allow-Origin" not in r.headers
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        assert (await r.json())["enabled"] is True
