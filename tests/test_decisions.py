"""Spec 5, end to end: every decision the gateway answers itself, against a real gateway.

Each test drives the real proxy listener (real redis-server, real upstream on
loopback) and checks the whole answer: status, Content-Type, X-Request-Id
header equal to meta.requestId, the full body shape, WWW-Authenticate on every
401, and that the upstream never answered in the gateway's place.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from redis.asyncio import Redis

from gateway.keytable.cache import MISS
from gateway.keytable.record import KeyRecord, digest
from tests.conftest import Gateway, RedisProcess, free_port, get_calls, migrations_over

ERROR_FIELDS = {"code", "title", "detail", "status", "type"}
GENERATED_REQUEST_ID = re.compile(r"req_[0-9A-Za-z]+")
WWW_AUTHENTICATE = 'Bearer realm="gateway"'
# A syntactically valid bearer token that no test ever puts in the key table.
UNKNOWN_KEY = "gw_" + "Zz9" * 14


async def assert_error(r: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    """The answer is the gateway's own spec-5 error, complete, and nothing from the upstream."""
    text = await r.text()
    assert r.status == status, text
    assert r.content_type == "application/json", r.headers.get("Content-Type")
    assert "X-Upstream" not in r.headers, "the upstream answered a request the gateway should have refused"
    body = await r.json(content_type=None)
    assert set(body) == {"meta", "error"}, body
    assert "headers" not in body and "path" not in body, "the echo upstream's body came through"
    assert set(body["meta"]) == {"requestId"}
    request_id = body["meta"]["requestId"]
    assert isinstance(request_id, str) and request_id
    assert r.headers.get("X-Request-Id") == request_id
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert error["code"] == code
    assert error["status"] == status
    assert error["title"] == HTTPStatus(status).phrase
    assert isinstance(error["detail"], str) and error["detail"].strip()
    assert isinstance(error["type"], str)
    assert error["type"].startswith("https://") and error["type"].endswith("/errors/" + code)
    if status == 401:
        assert r.headers.get("WWW-Authenticate") == WWW_AUTHENTICATE
    return body


async def assert_forwarded(r: aiohttp.ClientResponse) -> dict[str, Any]:
    """The request reached the echo upstream and its answer came back."""
    text = await r.text()
    assert r.status == 200, text
    assert r.headers.get("X-Upstream") == "echo"
    echo: dict[str, Any] = await r.json()
    assert "headers" in echo
    return echo


def upstream_saw(echo: dict[str, Any]) -> CIMultiDict[str]:
    """The request headers the echo upstream received (names compared case-insensitively)."""
    return CIMultiDict((name, value) for name, value in echo["headers"])


async def admin_post(gw: Gateway, path: str, *, token: str, json: Any = None) -> tuple[int, dict[str, Any]]:
    async with await gw.admin_call("POST", path, token=token, json=json if json is not None else {}) as r:
        return r.status, await r.json(content_type=None)


# missing_key / malformed_key / key_not_found -----------------------------------------


async def test_a_request_without_authorization_on_a_required_route_is_401_missing_key(gw: Gateway) -> None:
    async with await gw.call("GET", "/api/hello") as r:
        await assert_error(r, 401, "missing_key")


async def test_a_public_route_needs_no_authorization(gw: Gateway) -> None:
    async with await gw.call("GET", "/public/hello") as r:
        await assert_forwarded(r)


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Basic dXNlcjpwYXNz", id="basic-scheme"),
        pytest.param("Token gw_abcdefghijklmnop", id="other-scheme"),
        pytest.param("gw_abcdefghijklmnopqrstuvwx", id="no-scheme"),
        pytest.param("Bearer", id="bearer-without-token"),
        pytest.param("Bearer ", id="bearer-with-empty-token"),
        pytest.param("Bearer    ", id="bearer-with-blank-token"),
        pytest.param("", id="empty-header"),
        pytest.param("Bearer " + "a" * 513, id="token-over-512-chars"),
        pytest.param("Bearer " + "gw_" + "a" * 2000, id="token-far-over-512-chars"),
        pytest.param('Bearer gw_abc"def', id="token-with-quote"),
        pytest.param("Bearer gw_abc def", id="token-with-space"),
        pytest.param("Bearer gw_abc,def", id="token-with-comma"),
        pytest.param("Bearer gw_abc;def", id="token-with-semicolon"),
        pytest.param("Bearer gw_abc=def", id="token-with-inner-equals"),
        pytest.param("Bearer gw_abc<script>", id="token-with-angle-brackets"),
    ],
)
async def test_an_authorization_header_that_is_not_a_bearer_token_is_401_malformed_key(
    gw: Gateway, authorization: str
) -> None:
    async with await gw.call("GET", "/api/hello", headers={"Authorization": authorization}) as r:
        await assert_error(r, 401, "malformed_key")


async def test_a_token_of_exactly_512_characters_is_looked_up_not_malformed(gw: Gateway) -> None:
    async with await gw.call("GET", "/api/hello", key="a" * 512) as r:
        await assert_error(r, 401, "key_not_found")


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr", "Bearer"])
async def test_the_bearer_scheme_is_case_insensitive(gw: Gateway, scheme: str) -> None:
    key = (await gw.create_key(name="case"))["key"]
    async with await gw.call("GET", "/api/hello", headers={"Authorization": f"{scheme} {key}"}) as r:
        await assert_forwarded(r)


async def test_an_unknown_key_is_401_key_not_found_and_the_answer_does_not_echo_it(gw: Gateway) -> None:
    async with await gw.call("GET", "/api/hello", key=UNKNOWN_KEY) as r:
        raw = await r.read()
        await assert_error(r, 401, "key_not_found")
        assert UNKNOWN_KEY.encode() not in raw
        assert UNKNOWN_KEY[:12].encode() not in raw
        assert all(UNKNOWN_KEY not in v for v in r.headers.values())


async def test_a_malformed_key_is_not_echoed_either(gw: Gateway) -> None:
    token = "gw_visible<marker>" + "q" * 20
    async with await gw.call("GET", "/api/hello", headers={"Authorization": f"Bearer {token}"}) as r:
        raw = await r.read()
        await assert_error(r, 401, "malformed_key")
        assert b"visible" not in raw and b"marker" not in raw


async def test_missing_malformed_and_unknown_key_bodies_differ_only_in_code_title_and_detail(gw: Gateway) -> None:
    cases = {
        "missing_key": {},
        "malformed_key": {"Authorization": "Basic dXNlcjpwYXNz"},
        "key_not_found": {"Authorization": f"Bearer {UNKNOWN_KEY}"},
    }
    normalised: dict[str, Any] = {}
    header_names: dict[str, set[str]] = {}
    for code, headers in cases.items():
        async with await gw.call("GET", "/api/hello", headers={**headers, "X-Request-Id": "same-id-1"}) as r:
            body = await assert_error(r, 401, code)
            header_names[code] = {name.lower() for name in r.headers} - {"date"}
        error = body["error"]
        # `type` is the error's URL, derived from the code (checked in assert_error).
        error.update(code="*", title="*", detail="*", type=error["type"].removesuffix(code))
        normalised[code] = body
    first = normalised["missing_key"]
    assert first["meta"]["requestId"] == "same-id-1"
    assert normalised["malformed_key"] == first
    assert normalised["key_not_found"] == first
    assert header_names["malformed_key"] == header_names["missing_key"] == header_names["key_not_found"]


# key_disabled / key_revoked / key_expired ---------------------------------------------


async def test_a_disabled_key_is_403_key_disabled_on_the_very_next_request(gw: Gateway) -> None:
    created = await gw.create_key(name="to-disable", owner="acme")
    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        await assert_forwarded(r)
    assert isinstance(gw.replica.cache.get(digest(created["key"])), KeyRecord), "the key should now be cached"

    status, body = await admin_post(
        gw, f"/v1/keys/{created['id']}/disable", token="developer", json={"reason": "leaked"}
    )
    assert status == 200, body
    assert body["enabled"] is False

    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        await assert_error(r, 403, "key_disabled")


async def test_a_re_enabled_key_is_forwarded_again(gw: Gateway) -> None:
    created = await gw.create_key(name="flip")
    assert (await admin_post(gw, f"/v1/keys/{created['id']}/disable", token="developer"))[0] == 200
    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        await assert_error(r, 403, "key_disabled")
    assert (await admin_post(gw, f"/v1/keys/{created['id']}/enable", token="developer"))[0] == 200
    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        await assert_forwarded(r)


async def test_revoking_needs_the_admin_role_and_a_revoked_key_is_403_key_revoked(gw: Gateway) -> None:
    created = await gw.create_key(name="to-revoke")
    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        await assert_forwarded(r)

    async with await gw.admin_call("POST", f"/v1/keys/{created['id']}/revoke", token="developer", json={}) as r:
        await assert_error(r, 403, "insufficient_permissions")
    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        await assert_forwarded(r)

    status, body = await admin_post(gw, f"/v1/keys/{created['id']}/revoke", token="admin", json={"reason": "gone"})
    assert status == 200, body
    assert body["revoked"] is True
    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        await assert_error(r, 403, "key_revoked")


@pytest.mark.parametrize(
    ("action", "role", "code"),
    [("disable", "developer", "key_disabled"), ("revoke", "admin", "key_revoked")],
)
@pytest.mark.parametrize("disabled_status", [401, 403])
async def test_keys_disabled_status_sets_the_status_of_disabled_and_revoked_keys(
    gateway_factory: Callable[..., Awaitable[Gateway]], action: str, role: str, code: str, disabled_status: int
) -> None:
    gw = await gateway_factory(**{"keys.disabled_status": disabled_status})
    created = await gw.create_key(name=f"{action}-{disabled_status}")
    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        await assert_forwarded(r)
    status, body = await admin_post(gw, f"/v1/keys/{created['id']}/{action}", token=role)
    assert status == 200, body
    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        # assert_error checks the title follows the status and WWW-Authenticate is set on 401.
        await assert_error(r, disabled_status, code)


async def test_a_key_past_its_expires_at_is_401_key_expired(gw: Gateway) -> None:
    """A created key and keys imported by plaintext and by SHA-256, all expiring by the clock."""
    imported = "legacy_" + "K3y" * 10
    by_digest = "legacy_" + "D1g" * 10
    # Verify the developer token first (argon2id is slow on purpose) so the keys are in place well in time.
    async with await gw.admin_call("GET", "/v1/keys?limit=1", token="developer") as r:
        assert r.status == 200
    expires = time.time() + 1.0
    expires_at = datetime.fromtimestamp(expires, tz=UTC).isoformat()
    keys = [(await gw.create_key(name="short-lived", expires_at=expires_at))["key"]]
    for body in ({"key": imported}, {"key_sha256": digest(by_digest)}):
        async with await gw.admin_call(
            "POST", "/v1/keys", token="developer", json={**body, "name": "legacy", "expires_at": expires_at}
        ) as r:
            assert r.status == 201, await r.text()
            assert "key" not in await r.json(), "an imported key is never shown back"
    keys += [imported, by_digest]

    for key in keys:
        async with await gw.call("GET", "/api/hello", key=key) as r:
            await assert_forwarded(r)
    assert time.time() < expires, "the setup took too long to see the keys before they expire"
    await asyncio.sleep(expires - time.time() + 0.05)
    for key in keys:
        async with await gw.call("GET", "/api/hello", key=key) as r:
            await assert_error(r, 401, "key_expired")


async def test_a_key_rotated_without_grace_is_401_key_expired_and_its_successor_passes(gw: Gateway) -> None:
    old = await gw.create_key(name="rotating", owner="acme", scopes=["billing:read"])
    async with await gw.call("GET", "/billing/invoices", key=old["key"]) as r:
        await assert_forwarded(r)

    async with await gw.admin_call(
        "POST", f"/v1/keys/{old['id']}/rotate", token="developer", json={"grace_seconds": 0}
    ) as r:
        assert r.status == 201, await r.text()
        new = await r.json()
    assert new["key"] != old["key"]
    assert new["rotated_from"]["id"] == old["id"]

    async with await gw.call("GET", "/billing/invoices", key=old["key"]) as r:
        await assert_error(r, 401, "key_expired")
    async with await gw.call("GET", "/billing/invoices", key=new["key"]) as r:
        echo = await assert_forwarded(r)
    assert upstream_saw(echo)["X-Gateway-Key-Id"] == new["id"]


# insufficient_permissions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "allowed"),
    [
        pytest.param([], False, id="no-scopes"),
        pytest.param(["billing:write"], False, id="another-scope"),
        pytest.param(["billing"], False, id="scope-prefix-only"),
        pytest.param(["billing:read"], True, id="the-scope"),
        pytest.param(["reports:read", "billing:read"], True, id="the-scope-among-others"),
    ],
)
async def test_a_key_lacking_a_scope_the_route_requires_is_403_insufficient_permissions(
    gw: Gateway, scopes: list[str], allowed: bool
) -> None:
    key = (await gw.create_key(name="scoped", scopes=scopes))["key"]
    async with await gw.call("GET", "/billing/invoices", key=key) as r:
        if allowed:
            await assert_forwarded(r)
        else:
            await assert_error(r, 403, "insufficient_permissions")


# invalid_request --------------------------------------------------------------------------


async def _raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (aiohttp's client may tidy headers); read a Connection: close answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    header_block, _, body = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@pytest.mark.parametrize("second", ["same", "other-valid", "unknown", "malformed"])
async def test_two_authorization_headers_are_400_invalid_request(gw: Gateway, second: str) -> None:
    key = (await gw.create_key(name="first"))["key"]
    other = (await gw.create_key(name="second"))["key"]
    second_value = {
        "same": f"Bearer {key}",
        "other-valid": f"Bearer {other}",
        "unknown": f"Bearer {UNKNOWN_KEY}",
        "malformed": "Basic dXNlcjpwYXNz",
    }[second]
    headers = CIMultiDict([("Authorization", f"Bearer {key}"), ("Authorization", second_value)])
    async with await gw.session.get(gw.proxy_url + "/api/hello", headers=headers) as r:
        await assert_error(r, 400, "invalid_request")


async def test_two_authorization_headers_on_the_wire_are_400_invalid_request(gw: Gateway) -> None:
    key = (await gw.create_key(name="raw"))["key"]
    head = (
        f"GET /api/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"authorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    ).encode()
    status, headers, body = await _raw_request(gw.proxy.port, head)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert b'"invalid_request"' in body
    assert b'"headers"' not in body


# route_not_found / method_not_allowed ----------------------------------------------------


UNROUTED = ["/", "/nothing-here", "/billingx", "/apix/hello", "/Api/hello", "/publicity"]


@pytest.mark.parametrize("path", UNROUTED)
async def test_a_path_no_route_matches_is_404_route_not_found(gw: Gateway, path: str) -> None:
    async with await gw.call("GET", path) as r:
        await assert_error(r, 404, "route_not_found")


async def test_a_valid_key_does_not_make_an_unrouted_path_routable(gw: Gateway) -> None:
    key = (await gw.create_key(name="any", scopes=["billing:read"]))["key"]
    for path in UNROUTED:
        async with await gw.call("GET", path, key=key) as r:
            await assert_error(r, 404, "route_not_found")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_a_method_the_route_does_not_allow_is_405_method_not_allowed_with_allow(gw: Gateway, method: str) -> None:
    key = (await gw.create_key(name="ro"))["key"]
    async with await gw.call(method, "/readonly/thing", key=key) as r:
        await assert_error(r, 405, "method_not_allowed")
        allowed = {m.strip().upper() for m in r.headers.get("Allow", "").split(",") if m.strip()}
    assert "GET" in allowed
    assert method not in allowed
    async with await gw.call("GET", "/readonly/thing", key=key) as r:
        await assert_forwarded(r)


# auth_unavailable ---------------------------------------------------------------------------


async def test_redis_unreachable_from_the_start_is_503_auth_unavailable(
    gateway_factory: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await gateway_factory(redis_url="redis://127.0.0.1:1/0")
    for key in (UNKNOWN_KEY, "gw_" + "x" * 32):
        async with await gw.call("GET", "/api/hello", key=key) as r:
            await assert_error(r, 503, "auth_unavailable")


async def test_redis_gone_and_the_key_not_cached_is_503_auth_unavailable_not_key_not_found(
    gateway_factory: Callable[..., Awaitable[Gateway]], tmp_path: Path
) -> None:
    own = RedisProcess(free_port(), tmp_path / "redis")
    own.start()
    try:
        gw = await gateway_factory(redis_url=own.url)
        created = await gw.create_key(name="never-used")  # written to Redis, never looked up: not cached
        assert gw.replica.cache.get(digest(created["key"])) is MISS
        own.kill()
        for key in (created["key"], UNKNOWN_KEY):
            async with await gw.call("GET", "/api/hello", key=key) as r:
                await assert_error(r, 503, "auth_unavailable")
    finally:
        own.kill()


async def test_a_cached_key_is_served_without_reading_redis_again(gw: Gateway, redis: Redis) -> None:
    key = (await gw.create_key(name="cached"))["key"]
    # A replica that is not (yet) sure of its cache may read every key from Redis (spec 8): wait until ready.
    deadline = time.monotonic() + 5
    while True:
        async with await gw.admin_call("GET", "/readyz", token=None) as r:
            if r.status == 200:
                break
        assert time.monotonic() < deadline, "the replica never became ready"
        await asyncio.sleep(0.05)
    await migrations_over(gw.replica)
    # GETs, not every data command: the replica's heartbeat script runs every `health_check_seconds`.

    before = await get_calls(redis)
    async with await gw.call("GET", "/api/hello", key=key) as r:
        await assert_forwarded(r)
    after_first = await get_calls(redis)
    assert after_first > before, "the first request should read the key table"
    cached = gw.replica.cache.get(digest(key))
    assert isinstance(cached, KeyRecord)

    async with await gw.call("GET", "/api/hello", key=key) as r:
        await assert_forwarded(r)
    assert await get_calls(redis) == after_first, "the second request read Redis although the key was cached"


# upstream_unavailable / upstream_timeout ----------------------------------------------------


@dataclass
class BadUpstream:
    """A TCP server on loopback that misbehaves in one way, counting the connections it got."""

    behaviour: str
    port: int = 0
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.behaviour != "closes":
                await reader.readuntil(b"\r\n\r\n")
            if self.behaviour == "garbage":
                writer.write(b"\x00\x01 this is not HTTP at all \xff\xfe\r\n\r\n")
            elif self.behaviour == "bad-status":
                writer.write(b"HTTP/1.1 banana OK\r\nContent-Length: 2\r\n\r\nhi")
            elif self.behaviour == "truncated":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            elif self.behaviour == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


@pytest.fixture
async def bad_upstream(request: pytest.FixtureRequest) -> AsyncIterator[BadUpstream]:
    upstream = BadUpstream(request.param)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    async with server:
        yield upstream
        server.close()


async def test_an_upstream_that_refuses_the_connection_is_502_upstream_unavailable(gw: Gateway) -> None:
    key = (await gw.create_key(name="dead"))["key"]
    async with await gw.call("GET", "/dead/anything", key=key) as r:
        await assert_error(r, 502, "upstream_unavailable")


@pytest.mark.parametrize("bad_upstream", ["garbage", "bad-status", "truncated", "closes", "reset"], indirect=True)
async def test_an_upstream_that_answers_garbage_or_drops_the_connection_is_502_upstream_unavailable(
    gateway_factory: Callable[..., Awaitable[Gateway]], bad_upstream: BadUpstream
) -> None:
    gw = await gateway_factory(
        routes=[
            {"name": "api", "path_prefix": "/api", "upstream": "http://127.0.0.1:1"},
            {"name": "bad", "path_prefix": "/bad", "upstream": f"http://127.0.0.1:{bad_upstream.port}"},
        ]
    )
    key = (await gw.create_key(name="bad"))["key"]
    async with await gw.call("GET", "/bad/thing", key=key) as r:
        await assert_error(r, 502, "upstream_unavailable")
    assert bad_upstream.connections >= 1, "the gateway never contacted the misbehaving upstream"


async def test_an_upstream_slower_than_the_route_timeout_is_504_upstream_timeout(gw: Gateway) -> None:
    key = (await gw.create_key(name="slow"))["key"]
    started = time.monotonic()
    async with await gw.call("GET", "/slowroute/x", key=key) as r:
        await assert_error(r, 504, "upstream_timeout")
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.5, f"answered after {elapsed:.2f}s; the route's timeout is 0.3s, the upstream's 2s"


# never fail open ------------------------------------------------------------------------------


async def test_no_denial_ever_reaches_the_upstream(gateway_factory: Callable[..., Awaitable[Gateway]]) -> None:
    """Every refusal above, against an upstream that counts what it receives: it receives nothing."""
    received: list[str] = []

    async def count(request: web.Request) -> web.Response:
        received.append(f"{request.method} {request.path}")
        return web.json_response({"counted": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", count)
    counting = TestServer(app, host="127.0.0.1")
    await counting.start_server()
    try:
        url = str(counting.make_url("")).rstrip("/")
        gw = await gateway_factory(
            routes=[
                {"name": "api", "path_prefix": "/api", "upstream": url},
                {"name": "billing", "path_prefix": "/billing", "upstream": url, "scopes": ["billing:read"]},
                {"name": "get-only", "path_prefix": "/readonly", "upstream": url, "methods": ["GET"]},
            ]
        )
        good = (await gw.create_key(name="good"))["key"]
        disabled = await gw.create_key(name="disabled")
        revoked = await gw.create_key(name="revoked")
        rotated = await gw.create_key(name="rotated")
        for key_id, action, role in [
            (disabled["id"], "disable", "developer"),
            (revoked["id"], "revoke", "admin"),
            (rotated["id"], "rotate", "developer"),
        ]:
            assert (await admin_post(gw, f"/v1/keys/{key_id}/{action}", token=role))[0] in (200, 201)

        two = CIMultiDict([("Authorization", f"Bearer {good}"), ("Authorization", f"Bearer {good}")])
        denials: list[tuple[str, str, Any, int]] = [
            ("GET", "/api/x", {}, 401),
            ("GET", "/api/x", {"Authorization": "Basic dXNlcjpwYXNz"}, 401),
            ("GET", "/api/x", {"Authorization": f"Bearer {UNKNOWN_KEY}"}, 401),
            ("GET", "/api/x", {"Authorization": f"Bearer {disabled['key']}"}, 403),
            ("GET", "/api/x", {"Authorization": f"Bearer {revoked['key']}"}, 403),
            ("GET", "/api/x", {"Authorization": f"Bearer {rotated['key']}"}, 401),
            ("GET", "/billing/x", {"Authorization": f"Bearer {good}"}, 403),
            ("GET", "/api/x", two, 400),
            ("POST", "/readonly/x", {"Authorization": f"Bearer {good}"}, 405),
            ("GET", "/elsewhere", {"Authorization": f"Bearer {good}"}, 404),
        ]
        for method, path, headers, status in denials:
            async with await gw.session.request(method, gw.proxy_url + path, headers=headers, data=b"body") as r:
                assert r.status == status, (method, path, await r.text())
        assert received == []

        async with await gw.call("GET", "/api/x", key=good) as r:
            assert r.status == 200
        assert received == ["GET /api/x"]
    finally:
        await counting.close()


# X-Request-Id ---------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["abc123", "client-req.42:x_y", "A" * 128])
async def test_a_well_formed_client_request_id_is_echoed(gw: Gateway, request_id: str) -> None:
    async with await gw.call("GET", "/api/hello", headers={"X-Request-Id": request_id}) as r:
        body = await assert_error(r, 401, "missing_key")
    assert body["meta"]["requestId"] == request_id

    async with await gw.call("GET", "/public/hello", headers={"X-Request-Id": request_id}) as r:
        echo = await assert_forwarded(r)
        assert r.headers.get("X-Request-Id") == request_id
    assert upstream_saw(echo)["X-Request-Id"] == request_id


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param("", id="empty"),
        pytest.param("has spaces in it", id="spaces"),
        pytest.param("<script>alert(1)</script>", id="markup"),
        pytest.param("-starts-with-dash", id="leading-dash"),
        pytest.param("A" * 129, id="too-long"),
        pytest.param('quote"d', id="quote"),
    ],
)
async def test_a_malformed_client_request_id_is_replaced_with_a_generated_one(gw: Gateway, request_id: str) -> None:
    async with await gw.call("GET", "/api/hello", headers={"X-Request-Id": request_id}) as r:
        body = await assert_error(r, 401, "missing_key")
    generated = body["meta"]["requestId"]
    assert generated != request_id
    assert GENERATED_REQUEST_ID.fullmatch(generated), generated

    async with await gw.call("GET", "/public/hello", headers={"X-Request-Id": request_id}) as r:
        echo = await assert_forwarded(r)
    forwarded = upstream_saw(echo)["X-Request-Id"]
    assert forwarded != request_id
    assert GENERATED_REQUEST_ID.fullmatch(forwarded), forwarded


async def test_without_a_client_request_id_each_answer_gets_a_fresh_one(gw: Gateway) -> None:
    seen = set()
    for _ in range(3):
        async with await gw.call("GET", "/api/hello") as r:
            body = await assert_error(r, 401, "missing_key")
        assert GENERATED_REQUEST_ID.fullmatch(body["meta"]["requestId"])
        seen.add(body["meta"]["requestId"])
    assert len(seen) == 3
