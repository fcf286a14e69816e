"""The operator console over HTTP (spec 11): sessions, CSRF, headers, roles, escaping, secrets.

A real gateway (in process) on a real redis-server; a browser's part is played by an aiohttp
client with its own cookie jar. tests/test_console_browser.py drives real Chromium.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from gateway.console.app import COOKIE, CSP
from tests.conftest import Gateway

NONCE = re.compile(r'name="nonce" value="([^"]+)"')
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Browser:
    """A client with a cookie jar that keeps cookies for 127.0.0.1, like a browser."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def close(self) -> None:
        await self.http.close()

    def url(self, path: str) -> str:
        return self.gw.admin_url + path

    async def get(self, path: str, **kw: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.url(path), allow_redirects=False, **kw) as r:
            text = await r.text()
        match = CSRF.search(text)
        if match:
            self.csrf = match[1]
        return r.status, text, r

    async def post(self, path: str, data: dict[str, str], *, csrf: bool = True, **kw: Any) -> tuple[int, str, Any]:
        form = dict(data)
        if csrf:
            form.setdefault("csrf", self.csrf)
        headers = {"Origin": self.gw.admin_url, **kw.pop("headers", {})}
        async with self.http.post(self.url(path), data=form, allow_redirects=False, headers=headers, **kw) as r:
            return r.status, await r.text(), r

    def session_id(self) -> str | None:
        for cookie in self.http.cookie_jar:
            if cookie.key == COOKIE:
                return cookie.value
        return None

    async def sign_in(self, token: str) -> tuple[int, str, Any]:
        status, page, _ = await self.get("/sign-in")
        assert status == 200, page
        match = NONCE.search(page)
        assert match
        result = await self.post("/sign-in", {"token": token, "nonce": match[1]}, csrf=False)
        if result[0] == 303:
            await self.get("/keys")  # picks up the session's CSRF token
        return result


@pytest.fixture
async def browsers(gw: Gateway) -> Any:
    made: list[Browser] = []

    def new() -> Browser:
        b = Browser(gw)
        made.append(b)
        return b

    yield new
    for b in made:
        await b.close()


async def signed_in(new: Callable[[], Browser], token: str) -> Browser:
    b = new()
    status, body, r = await b.sign_in(token)
    assert status == 303 and r.headers["Location"] == "/keys", body
    return b


def session_key(gw: Gateway, session_id: str) -> str:
    return gw.replica.store.prefix + "console:s:" + hashlib.sha256(session_id.encode()).hexdigest()


# sessions ------------------------------------------------------------------------------


async def test_the_session_id_changes_at_sign_in_and_a_planted_one_is_never_used(gw: Gateway, browsers: Any) -> None:
    b: Browser = browsers()
    planted = "A" * 43
    b.http.cookie_jar.update_cookies({COOKIE: planted}, aiohttp.client.URL(gw.admin_url))
    status, _, r = await b.sign_in(gw.tokens.developer)
    assert status == 303
    cookie = r.cookies[COOKIE]
    first = cookie.value
    assert first != planted
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert not cookie["secure"]  # plain HTTP and secure_cookies off
    assert await gw.replica.store.redis.exists(session_key(gw, planted)) == 0
    # Signing in again from the same browser: a new id, and the old record is gone.
    status, _, r = await b.sign_in(gw.tokens.developer)
    assert status == 303 and r.cookies[COOKIE].value != first
    assert await gw.replica.store.redis.exists(session_key(gw, first)) == 0


async def test_a_wrong_token_gets_no_session_and_failures_are_throttled(gw: Gateway, browsers: Any) -> None:
    b: Browser = browsers()
    statuses = []
    for _ in range(11):
        status, page, r = await b.sign_in("gwadm_viewer_" + "x" * 32)
        statuses.append(status)
        assert "gwadm_viewer_" + "x" * 32 not in page  # the attempted token is never echoed
    assert statuses[:10] == [401] * 10
    assert statuses[10] == 429 and int(r.headers["Retry-After"]) > 0
    assert b.session_id() is None
    # The API's throttle and the console's are one: the same address is refused there too.
    async with gw.session.get(
        gw.admin_url + "/v1/keys", headers={"Authorization": "Bearer gwadm_viewer_" + "y" * 32}
    ) as r:
        assert r.status == 429


async def test_a_stolen_cookie_stops_working_after_sign_out(gw: Gateway, browsers: Any) -> None:
    victim = await signed_in(browsers, gw.tokens.developer)
    stolen = victim.session_id()
    assert stolen
    thief: Browser = browsers()
    thief.http.cookie_jar.update_cookies({COOKIE: stolen}, aiohttp.client.URL(gw.admin_url))
    assert (await thief.get("/keys"))[0] == 200
    status, _, r = await victim.post("/sign-out", {})
    assert status == 303 and r.headers["Location"] == "/sign-in"
    assert await gw.replica.store.redis.exists(session_key(gw, stolen)) == 0
    status, _, r = await thief.get("/keys")
    assert status == 303 and r.headers["Location"] == "/sign-in"
    assert (await thief.post("/keys/new", {}))[0] in (403, 405)


async def test_a_session_ends_after_the_idle_timeout(gateway_factory: Any, browsers: Any) -> None:
    gw: Gateway = await gateway_factory(
        **{"admin.console": {"idle_timeout_seconds": 1, "absolute_timeout_seconds": 60}}
    )
    b = Browser(gw)
    try:
        status, _, _ = await b.sign_in(gw.tokens.viewer)
        assert status == 303
        stolen = b.session_id()
        assert stolen
        for _ in range(3):  # used within the idle timeout: it lives on
            await asyncio.sleep(0.3)
            assert (await b.get("/keys"))[0] == 200
        await asyncio.sleep(1.2)
        status, _, r = await b.get("/keys")
        assert status == 303 and r.headers["Location"] == "/sign-in"
        assert await gw.replica.store.redis.exists(session_key(gw, stolen)) == 0
    finally:
        await b.close()


async def test_a_session_ends_at_the_absolute_timeout_even_when_used(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory(**{"admin.console": {"idle_timeout_seconds": 1, "absolute_timeout_seconds": 2}})
    b = Browser(gw)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()  # before the session exists: its age is at most the time since
        assert (await b.sign_in(gw.tokens.viewer))[0] == 303
        signed = loop.time()  # after it exists: its age is at least the time since
        while loop.time() - start < 1.5:
            assert (await b.get("/keys"))[0] == 200
            await asyncio.sleep(0.3)
        await asyncio.sleep(max(0.0, signed + 2.1 - loop.time()))
        assert (await b.get("/keys"))[0] == 303
    finally:
        await b.close()


async def test_sessions_per_token_are_capped_oldest_first(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory(**{"admin.console": {"max_sessions_per_token": 2}})
    made = [Browser(gw) for _ in range(3)]
    try:
        for b in made:
            assert (await b.sign_in(gw.tokens.viewer))[0] == 303
        assert (await made[0].get("/keys"))[0] == 303
        assert (await made[1].get("/keys"))[0] == 200
        assert (await made[2].get("/keys"))[0] == 200
    finally:
        for b in made:
            await b.close()


# headers, CSRF, roles -------------------------------------------------------------------


async def test_every_page_sends_the_security_headers(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="headers", owner="h")
    b = await signed_in(browsers, gw.tokens.admin)
    b2: Browser = browsers()
    pages = ["/keys", "/keys?q=h", "/keys/new", f"/keys/{key['id']}", f"/keys/{key['id']}/disable",
             f"/keys/{key['id']}/revoke", f"/keys/{key['id']}/rotate", "/audit", "/status",
             "/keys/key_00000000000000000000"]  # fmt: skip
    for path in pages:
        status, page, r = await b.get(path)
        assert status in (200, 404), (path, status, page)
        assert r.headers["Content-Security-Policy"] == CSP, path
        assert "unsafe-inline" not in CSP and "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["Cache-Control"] == "no-store"
        assert r.content_type == "text/html"
        assert "<script>" not in page and " on" + "click=" not in page  # no inline script anywhere
    for path in ["/sign-in", "/", "/keys"]:  # and without a session
        _, _, r = await b2.get(path)
        assert r.headers["Content-Security-Policy"] == CSP, path


async def test_a_form_without_the_csrf_token_or_from_another_site_is_refused(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="csrf", owner="c")
    b = await signed_in(browsers, gw.tokens.developer)
    path = f"/keys/{key['id']}/disable"
    status, page, _ = await b.post(path, {"reason": "x"}, csrf=False)
    assert status == 403 and "csrf_rejected" in page
    status, page, _ = await b.post(path, {"reason": "x", "csrf": b.csrf[:-1] + ("A" if b.csrf[-1] != "A" else "B")})
    assert status == 403 and "csrf_rejected" in page
    status, page, _ = await b.post(path, {"reason": "x"}, headers={"Origin": "http://attacker.example"})
    assert status == 403 and "csrf_rejected" in page
    # Another session's token is no good either.
    other = await signed_in(browsers, gw.tokens.developer)
    status, _, _ = await b.post(path, {"reason": "x", "csrf": other.csrf})
    assert status == 403
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        assert (await r.json())["enabled"] is True
    status, _, r = await b.post(path, {"reason": "x"})
    assert status == 303


async def test_a_viewer_sees_no_controls_and_a_forged_post_is_refused(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="viewer-target", owner="v")
    viewer = await signed_in(browsers, gw.tokens.viewer)
    status, page, _ = await viewer.get(f"/keys/{key['id']}")
    assert status == 200
    for control in ('id="disable"', 'id="enable"', 'id="revoke"', 'id="rotate"', "Create a key", "Audit log"):
        assert control not in page
    assert viewer.csrf  # the sign-out form's: a valid token of this session
    for action, form in [("disable", {"reason": "forged"}), ("revoke", {"confirm_name": "viewer-target"}),
                         ("rotate", {"grace_seconds": "0"})]:  # fmt: skip
        status, page, _ = await viewer.post(f"/keys/{key['id']}/{action}", form)
        assert status == 403 and "insufficient_permissions" in page, action
    status, page, _ = await viewer.post("/keys", {"name": "forged"})
    assert status == 403
    assert (await viewer.get("/audit"))[0] == 403
    assert (await viewer.get(f"/keys/{key['id']}/disable"))[0] == 403
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}") as r:
        assert (await r.json())["enabled"] is True
    # A developer may disable but not revoke (admin only), in the page and at the server.
    dev = await signed_in(browsers, gw.tokens.developer)
    status, page, _ = await dev.get(f"/keys/{key['id']}")
    assert 'id="disable"' in page and 'id="revoke"' not in page
    status, page, _ = await dev.post(f"/keys/{key['id']}/revoke", {"confirm_name": "viewer-target"})
    assert status == 403


async def test_hostile_names_and_reasons_render_as_text(gw: Gateway, browsers: Any) -> None:
    name = '<script>alert("n")</script>'
    key = await gw.create_key(name=name, owner='"><img src=x onerror=alert(1)>')
    b = await signed_in(browsers, gw.tokens.admin)
    reason = "</dd><script>alert('r')</script>"
    status, _, _ = await b.post(f"/keys/{key['id']}/disable", {"reason": reason})
    assert status == 303
    for path in [f"/keys/{key['id']}", "/keys", f"/audit?key_id={key['id']}", f"/keys/{key['id']}/revoke"]:
        status, page, _ = await b.get(path)
        assert status == 200, path
        assert "<script>alert" not in page and "<img src=x" not in page, path
    _, page, _ = await b.get(f"/keys/{key['id']}")
    assert "&lt;script&gt;alert(&#34;n&#34;)&lt;/script&gt;" in page
    assert "&lt;/dd&gt;&lt;script&gt;alert(&#39;r&#39;)&lt;/script&gt;" in page


# create: the plaintext once ----------------------------------------------------------------


async def test_create_shows_the_plaintext_once_and_never_in_a_url_or_later_page(gw: Gateway, browsers: Any) -> None:
    b = await signed_in(browsers, gw.tokens.admin)
    status, _, r = await b.post("/keys", {"name": "once", "owner": "alice", "scopes": "billing:read"})
    assert status == 303
    location = r.headers["Location"]
    assert re.fullmatch(r"/keys/key_[0-9a-f]{20}/secret", location)
    status, page, _ = await b.get(location)
    match = re.search(r'id="secret" readonly value="([^"]+)"', page)
    assert status == 200 and match
    plaintext = match[1]
    # The key works through the proxy.
    async with await gw.call("GET", "/billing/x", key=plaintext) as r:
        assert r.status == 200
    # Reloading the page does not show it again; neither does any other page.
    status, page, _ = await b.get(location)
    assert status == 200 and plaintext not in page and 'id="gone"' in page
    key_id = location.split("/")[2]
    for path in [f"/keys/{key_id}", "/keys", "/keys?q=alice", f"/audit?key_id={key_id}", "/audit", "/status"]:
        _, page, _ = await b.get(path)
        assert plaintext not in page, path
        assert gw.tokens.admin not in page, path
    # Nor does Redis hold it past the page that showed it.
    keys = [k async for k in gw.replica.store.redis.scan_iter(match=gw.replica.store.prefix + "console:*", count=1000)]
    for k in keys:
        if await gw.replica.store.redis.type(k) == b"string":
            assert plaintext.encode() not in (await gw.replica.store.redis.get(k) or b"")


async def test_rotate_shows_the_new_plaintext_once(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="rot", owner="r")
    b = await signed_in(browsers, gw.tokens.developer)
    status, _, r = await b.post(f"/keys/{key['id']}/rotate", {"grace_seconds": "60"})
    assert status == 303
    status, page, _ = await b.get(r.headers["Location"])
    match = re.search(r'id="secret" readonly value="([^"]+)"', page)
    assert match and key["id"] in page
    async with await gw.call("GET", "/api/x", key=match[1]) as resp:
        assert resp.status == 200
    assert match[1] not in (await b.get(r.headers["Location"]))[1]


# the flows without a browser ------------------------------------------------------------------


async def test_disable_shows_the_propagation_and_the_proxy_refuses_the_key(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="flow", owner="bob")
    b = await signed_in(browsers, gw.tokens.developer)
    status, page, _ = await b.get("/keys?q=bob")
    assert key["id"] in page
    status, _, r = await b.post(f"/keys/{key['id']}/disable", {"reason": "leaked"})
    assert status == 303 and r.headers["Location"] == f"/keys/{key['id']}"
    _, page, _ = await b.get(f"/keys/{key['id']}")
    assert 'id="result-action">disabled' in page
    assert re.search(r'id="replicas">1<.*id="confirmed">1<.*id="fenced">0<', page, re.S)
    async with await gw.call("GET", "/api/x", key=key["key"]) as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "key_disabled"
    assert 'id="enable"' in page
    status, _, _ = await b.post(f"/keys/{key['id']}/enable", {})
    assert status == 303
    async with await gw.call("GET", "/api/x", key=key["key"]) as resp:
        assert resp.status == 200
    # The audit trail names the console user and the reason.
    admin = await signed_in(browsers, gw.tokens.admin)
    _, page, _ = await admin.get(f"/keys/{key['id']}")
    assert "ops-developer" in page and "leaked" in page


async def test_revoke_needs_the_name_typed(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="to-revoke", owner="z")
    b = await signed_in(browsers, gw.tokens.admin)
    status, page, _ = await b.post(f"/keys/{key['id']}/revoke", {"confirm_name": "to-revok"})
    assert status == 400 and "confirm_name" in page
    status, _, _ = await b.post(f"/keys/{key['id']}/revoke", {"confirm_name": "to-revoke", "reason": "done"})
    assert status == 303
    _, page, _ = await b.get(f"/keys/{key['id']}")
    assert "state-revoked" in page and 'id="enable"' not in page and 'id="disable"' not in page
    status, page, _ = await b.post(f"/keys/{key['id']}/enable", {})  # refused by the action, as the API does
    assert status == 409 and "key_revoked" in page


async def test_enable_is_not_offered_when_the_policy_forbids_it(gateway_factory: Any, browsers: Any) -> None:
    gw: Gateway = await gateway_factory(**{"keys.allow_reenable": False})
    key = await gw.create_key(name="no-reenable")
    b = Browser(gw)
    try:
        assert (await b.sign_in(gw.tokens.admin))[0] == 303
        assert (await b.post(f"/keys/{key['id']}/disable", {}))[0] == 303
        _, page, _ = await b.get(f"/keys/{key['id']}")
        assert 'id="enable"' not in page
        status, page, _ = await b.post(f"/keys/{key['id']}/enable", {})
        assert status == 409 and "reenable_not_allowed" in page
    finally:
        await b.close()


async def test_search_by_name_owner_id_and_start_with_pages(gw: Gateway, browsers: Any) -> None:
    made = [await gw.create_key(name=f"search-{i}", owner="carol" if i % 2 else "dave") for i in range(45)]
    b = await signed_in(browsers, gw.tokens.viewer)
    _, page, _ = await b.get("/keys?q=carol")
    found = set(re.findall(r'href="/keys/(key_[0-9a-f]{20})"', page))
    assert len(found) >= 20
    seen = set(found)
    while 'id="next-page"' in page:
        nxt = re.search(r'id="next-page"|href="([^"]+)" id="next-page"', page)
        href = re.search(r'<a href="([^"]+)" id="next-page"', page)
        assert nxt and href
        _, page, _ = await b.get(href[1].replace("&amp;", "&"))
        seen |= set(re.findall(r'href="/keys/(key_[0-9a-f]{20})"', page))
    assert seen == {k["id"] for k in made if k["owner"] == "carol"}
    _, page, _ = await b.get(f"/keys?q={made[3]['id']}")
    assert set(re.findall(r'href="/keys/(key_[0-9a-f]{20})"', page)) == {made[3]["id"]}
    _, page, _ = await b.get("/keys?" + urlencode({"q": made[7]["start"]}))
    assert made[7]["id"] in page
    _, page, _ = await b.get("/keys?q=search-44")
    assert made[44]["id"] in page
    status, page, _ = await b.get("/keys?q=carol&cursor=forged")
    assert status == 400
    status, _, _ = await b.get("/keys?state=nonsense")
    assert status == 400


# the usage panel (shown when a usage reader is given) ---------------------------------------


class RecordingUsage:
    """A usage reader that answers fixed buckets and records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    async def usage(self, key_id: str, window: str) -> dict[str, Any]:
        self.asked.append((key_id, window))
        return {
            "window": window,
            "buckets": [
                {"start": "2026-01-01T00:00:00Z", "counts": {"forwarded": 3, "key_disabled": 1}},
                {"start": "2026-01-01T01:00:00Z", "counts": {"forwarded": 8}},
                {"start": "2026-01-01T02:00:00Z", "counts": {}},
            ],
        }


async def test_the_key_page_shows_the_keys_real_usage_after_a_flush(gw: Gateway, browsers: Any) -> None:
    """The running gateway counts usage (gateway/usage): the panel shows what the proxy served."""
    key = await gw.create_key(name="used", owner="u")
    b = await signed_in(browsers, gw.tokens.viewer)
    _, page, _ = await b.get(f"/keys/{key['id']}?window=1h")
    assert 'id="usage-title"' in page and "0 requests" in page
    for _ in range(3):
        async with await gw.call("GET", "/api/used", key=key["key"]) as r:
            assert r.status == 200
    assert gw.replica.usage is not None
    assert await gw.replica.usage.flush() >= 1
    _, page, _ = await b.get(f"/keys/{key['id']}?window=1h")
    assert "3 requests" in page
    assert "Unused since" in (await b.get("/keys"))[1]


async def test_the_usage_panel_appears_only_with_a_usage_reader(gw: Gateway, browsers: Any) -> None:
    from aiohttp.test_utils import TestServer

    from gateway.admin.app import build_admin_app
    from gateway.config import ConsoleConfig
    from gateway.console.app import mount

    key = await gw.create_key(name="used", owner="u")
    bare = build_admin_app(gw.replica.api)
    mount(bare, gw.replica.api, ConsoleConfig(), usage=None)
    reader = RecordingUsage()
    app = build_admin_app(gw.replica.api)
    mount(app, gw.replica.api, ConsoleConfig(), usage=reader)
    server, without = TestServer(app, host="127.0.0.1"), TestServer(bare, host="127.0.0.1")
    await server.start_server()
    await without.start_server()
    try:
        plain = Browser(gw)
        plain.gw = type("G", (), {"admin_url": f"http://127.0.0.1:{without.port}"})()  # type: ignore[assignment]
        try:
            assert (await plain.sign_in(gw.tokens.viewer))[0] == 303
            _, page, _ = await plain.get(f"/keys/{key['id']}")
            assert 'id="usage-title"' not in page and "Unused since" not in (await plain.get("/keys"))[1]
        finally:
            await plain.close()
        other = Browser(gw)
        other.gw = type("G", (), {"admin_url": f"http://127.0.0.1:{server.port}"})()  # type: ignore[assignment]
        try:
            got = await other.sign_in(gw.tokens.viewer)
            assert got[0] == 303, got[1]
            status, page, _ = await other.get(f"/keys/{key['id']}?window=1h")
            assert status == 200 and 'id="usage-title"' in page
            assert reader.asked == [(key["id"], "1h")]
            heights = re.findall(r'<rect x="[0-9.]+" y="[0-9.]+" width="[0-9.]+" height="([0-9.]+)"', page)
            assert heights == ["50.0", "100.0", "0.0"]  # 4, 8 and 0 requests against a peak of 8
            assert "12 requests" in page
            assert (await other.get(f"/keys/{key['id']}?window=7d"))[0] == 400
            assert "Unused since" in (await other.get("/keys"))[1]
        finally:
            await other.close()
    finally:
        await server.close()
        await without.close()


# configuration ------------------------------------------------------------------------------


def _config(console: dict[str, Any] | None, environ: dict[str, str] | None = None) -> Any:
    import yaml

    from gateway import config as config_mod

    raw: dict[str, Any] = {
        "admin": {"tokens": []},
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "routes": [{"name": "api", "path_prefix": "/api", "upstream": "http://127.0.0.1:9000"}],
    }
    if console is not None:
        raw["admin"]["console"] = console
    return config_mod.parse(yaml.safe_dump(raw), source="<t>", environ=environ or {})


def test_console_config_defaults_and_env_overrides() -> None:
    console = _config(None).admin.console
    assert (console.enabled, console.secure_cookies) == (True, False)
    assert (console.idle_timeout_seconds, console.absolute_timeout_seconds) == (900, 8 * 3600)
    assert console.max_sessions_per_token == 20
    env = {"GATEWAY_ADMIN_CONSOLE_SECURE_COOKIES": "true", "GATEWAY_ADMIN_CONSOLE_ENABLED": "false"}
    console = _config({"idle_timeout_seconds": 60}, env).admin.console
    assert (console.enabled, console.secure_cookies, console.idle_timeout_seconds) == (False, True, 60)


def test_console_config_problems_are_reported_all_at_once() -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        _config({"secure_cookies": "yes", "idle_timeout_seconds": 0, "max_sessions_per_token": 0, "colour": 1})
    found = {p.path: p.rule for p in caught.value.problems}
    assert found == {
        "admin.console.colour": found["admin.console.colour"],
        "admin.console.secure_cookies": "must be true or false",
        "admin.console.idle_timeout_seconds": "must be between 1 and 86400",
        "admin.console.max_sessions_per_token": "must be between 1 and 1000",
    }
    assert found["admin.console.colour"].startswith("unknown key")
    with pytest.raises(ConfigError) as caught:
        _config({"idle_timeout_seconds": 600, "absolute_timeout_seconds": 300})
    (problem,) = caught.value.problems
    assert problem.path == "admin.console.idle_timeout_seconds"
    assert problem.rule == "must not exceed admin.console.absolute_timeout_seconds"
    with pytest.raises(ConfigError) as caught:
        _config(None, {"GATEWAY_ADMIN_CONSOLE_SECURE_COOKIES": "maybe"})
    assert "(from GATEWAY_ADMIN_CONSOLE_SECURE_COOKIES)" in str(caught.value)


async def test_secure_cookies_and_a_disabled_console(gateway_factory: Any) -> None:
    gw: Gateway = await gateway_factory(**{"admin.console": {"secure_cookies": True}})
    # Secure cookies are not sent back over plain HTTP (as a browser would not): the test sends them itself.
    async with gw.session.get(gw.admin_url + "/sign-in") as r:
        nonce_cookie = r.cookies["gw_console_signin"]
        assert nonce_cookie["secure"] and nonce_cookie["httponly"] and nonce_cookie["samesite"] == "Strict"
        match = NONCE.search(await r.text())
    assert match
    form = {"token": gw.tokens.viewer, "nonce": match[1]}
    headers = {"Cookie": f"gw_console_signin={nonce_cookie.value}", "Origin": gw.admin_url}
    async with gw.session.post(gw.admin_url + "/sign-in", data=form, headers=headers, allow_redirects=False) as r:
        assert r.status == 303 and r.cookies[COOKIE]["secure"]
    off: Gateway = await gateway_factory(**{"admin.console": {"enabled": False}})
    async with off.session.get(off.admin_url + "/sign-in") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    async with await off.admin_call("GET", "/v1/keys") as r:
        assert r.status == 200


async def test_the_role_comes_from_the_running_config_on_every_request(gateway_factory: Any) -> None:
    """A session made under one configuration, used on a replica whose configuration lowered the
    token's role (as after a restart), acts with the lower role; a token removed ends it."""
    first: Gateway = await gateway_factory()
    key = await first.create_key(name="role-check")
    b = Browser(first)
    try:
        assert (await b.sign_in(first.tokens.developer))[0] == 303
        cookie = b.session_id()
        assert cookie
        prefix = first.replica.store.prefix
        lowered = [dict(e, role="viewer") if e["name"] == "ops-developer" else e for e in first.tokens.entries]
        second: Gateway = await gateway_factory(**{"redis.prefix": prefix, "admin.tokens": lowered})
        removed = [e for e in first.tokens.entries if e["name"] != "ops-developer"]
        third: Gateway = await gateway_factory(**{"redis.prefix": prefix, "admin.tokens": removed})
        jar = {COOKIE: cookie}
        async with aiohttp.ClientSession(cookies=jar) as s:
            async with s.get(f"{second.admin_url}/keys/{key['id']}", allow_redirects=False) as r:
                page = await r.text()
                assert r.status == 200 and 'id="disable"' not in page and "(viewer)" in page
            csrf = CSRF.search(page)
            assert csrf
            form = {"csrf": csrf[1], "reason": "x"}
            headers = {"Origin": second.admin_url}
            async with s.post(f"{second.admin_url}/keys/{key['id']}/disable", data=form, headers=headers,
                              allow_redirects=False) as r:  # fmt: skip
                assert r.status == 403 and "insufficient_permissions" in await r.text()
            async with s.get(f"{third.admin_url}/keys", allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/sign-in"
        # The first replica (still the developer's role) finds the session gone too: removed means ended.
        assert (await b.get("/keys"))[0] == 303
    finally:
        await b.close()


async def test_a_change_to_a_key_that_does_not_exist_is_404(gw: Gateway, browsers: Any) -> None:
    b = await signed_in(browsers, gw.tokens.admin)
    for action in ("disable", "enable"):
        status, page, _ = await b.post(f"/keys/key_{'0' * 20}/{action}", {})
        assert status == 404 and "key_not_found" in page, action
    status, page, _ = await b.post("/keys/not-a-key/disable", {})
    assert status == 400 and "invalid_request" in page


async def test_the_audit_log_filters_by_key_and_pages(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="audited")
    other = await gw.create_key(name="other")
    for i in range(30):
        for action in ("disable", "enable"):
            async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/{action}", json={}) as r:
                assert r.status == 200, i
    b = await signed_in(browsers, gw.tokens.admin)
    _, page, _ = await b.get(f"/audit?key_id={key['id']}")
    rows = re.findall(r"<tr><td>", page)
    assert len(rows) == 50 and other["id"] not in page
    href = re.search(r'<a href="([^"]+)" rel="next" id="next-page"', page)
    assert href
    _, page, _ = await b.get(href[1].replace("&amp;", "&"))
    assert len(re.findall(r"<tr><td>", page)) == 11  # 60 changes and the create, newest first
    assert 'id="next-page"' not in page and ">create<" in page
    status, page, _ = await b.get(f"/audit?key_id={other['id']}&cursor=" + href[1].split("cursor=")[1])
    assert status == 400  # a cursor is good only for the query it was issued for


async def test_the_status_page_shows_the_replica_its_lease_and_redis(gw: Gateway, browsers: Any) -> None:
    b = await signed_in(browsers, gw.tokens.viewer)
    status, page, _ = await b.get("/status")
    assert status == 200
    assert gw.replica.registry.replica_id in page and "(this one)" in page
    assert re.search(r'id="coherent">coherent: lease \d+ ms left', page)
    assert 'id="redis-role">master<' in page


async def test_the_actions_check_the_role_themselves(gw: Gateway) -> None:
    """What the console calls refuses a role too low whoever calls it, before anything is written."""
    from gateway.admin import bodies
    from gateway.admin.api import Caller, Forbidden
    from gateway.admin.auth import Principal

    key = await gw.create_key(name="guarded")
    api = gw.replica.api
    viewer = Caller(Principal("someone", "viewer"), "127.0.0.1", "req_test")
    developer = Caller(Principal("someone", "developer"), "127.0.0.1", "req_test")
    calls = [
        api.disable_key(viewer, key["id"], "x"),
        api.enable_key(viewer, key["id"]),
        api.rotate_key(viewer, key["id"], 0),
        api.create_key(viewer, bodies.create({"name": "n"}, 0)),
        api.revoke_key(developer, key["id"], "x"),
        api.audit_page(developer, bodies.AuditQuery(None, None, 10)),
    ]
    for call in calls:
        with pytest.raises(Forbidden):
            await call
    record = await api.store.get_by_id(key["id"])
    assert record is not None and record.enabled and not record.revoked and record.version == 1
