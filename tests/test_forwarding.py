"""Spec 6, end to end: a real gateway between a real client and a real upstream on loopback.

Paths that a client library would tidy up before sending (`..`, `%2e%2e`,
duplicate slashes) go over a raw socket, so the gateway sees exactly the
request-target the test wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from tests.conftest import AdminTokens, Gateway, ProxyTestServer, RedisProcess, make_config, start_replica
from tests.upstream_app import DOWNLOAD_GATE, UPLOAD_STARTED

MIB = 1024 * 1024
NEW_REQUEST_ID = re.compile(r"req_[0-9a-z]{16}")


# --- helpers -----------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json_error_code(self) -> str:
        assert self.headers.get("Content-Type", "").startswith("application/json"), self.headers
        code: str = json.loads(self.body)["error"]["code"]
        return code


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readline()
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


async def raw_request(
    gw: Gateway,
    target: str,
    *,
    method: str = "GET",
    key: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    chunked_body: bool = False,
) -> RawResponse:
    """One request over a raw socket: the request-target is sent byte for byte as given."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{gw.proxy.port}"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{name}: {value}" for name, value in headers or []]
    if chunked_body:
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        payload = body
        if body:
            lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
        try:
            writer.write(head + payload)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            response_headers: CIMultiDict[str] = CIMultiDict()
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                response_headers.add(name.strip(), value.strip())
            if method == "HEAD" or status in (204, 304):
                data = b""
            elif "Content-Length" in response_headers:
                data = await reader.readexactly(int(response_headers["Content-Length"]))
            elif "chunked" in response_headers.get("Transfer-Encoding", "").lower():
                data = await _read_chunked(reader)
            else:
                data = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    return RawResponse(status, response_headers, data)


def echoed_headers(echo: dict[str, Any]) -> CIMultiDict[str]:
    """The request headers the echo upstream received, case-insensitive, every value kept."""
    return CIMultiDict((k, v) for k, v in echo["headers"])


async def echo_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.status == 200, await response.text()
    assert response.headers.get("X-Upstream") == "echo"
    data: dict[str, Any] = await response.json()
    return data


def raw_echo(response: RawResponse) -> dict[str, Any]:
    assert response.status == 200, response.body
    assert response.headers.get("X-Upstream") == "echo"
    data: dict[str, Any] = json.loads(response.body)
    return data


@pytest.fixture
async def key(gw: Gateway) -> dict[str, Any]:
    return await gw.create_key(name="forwarding", owner="acme")


@pytest.fixture
async def billing_key(gw: Gateway) -> dict[str, Any]:
    return await gw.create_key(name="billing", owner="acme", scopes=["billing:read"])


# --- path --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "upstream_sees"),
    [
        ("/api/a/./b//c/../d", "/api/a/b/d"),
        ("/api/a/./b//c/../d?x=1&y=%2F&z=a+b&e=%2e%2e/../", "/api/a/b/d?x=1&y=%2F&z=a+b&e=%2e%2e/../"),
        ("//api///x", "/api/x"),
        ("/api/x/", "/api/x/"),
        ("/api/x/.", "/api/x/"),
        ("/%61pi/%62", "/api/b"),
        ("/api/caf%c3%a9", "/api/caf%C3%A9"),
        ("/api/a%20b", "/api/a%20b"),
        ("/api/%252F", "/api/%252F"),
        ("/api/a%3Fb?q=1", "/api/a%3Fb?q=1"),
        ("/api?", "/api"),
    ],
)
async def test_the_upstream_receives_the_normalised_path_and_the_raw_query(
    gw: Gateway, key: dict[str, Any], target: str, upstream_sees: str
) -> None:
    echo = raw_echo(await raw_request(gw, target, key=key["key"]))
    assert echo["path"] == upstream_sees


@pytest.mark.parametrize("target", ["/public/../billing/x", "/public/%2e%2e/billing/x", "/public/%2E%2E/billing/x"])
async def test_traversal_from_a_public_route_into_a_protected_one_needs_a_key(
    gw: Gateway, billing_key: dict[str, Any], key: dict[str, Any], target: str
) -> None:
    # sanity: the public route does forward without a key
    assert raw_echo(await raw_request(gw, "/public/x"))["path"] == "/public/x"

    anonymous = await raw_request(gw, target)
    assert anonymous.status == 401
    assert anonymous.json_error_code() == "missing_key"
    assert "X-Upstream" not in anonymous.headers

    # matched as /billing/x, so the billing route's scope applies ...
    unscoped = await raw_request(gw, target, key=key["key"])
    assert unscoped.status == 403
    assert unscoped.json_error_code() == "insufficient_permissions"

    # ... and what was checked is what is forwarded
    assert raw_echo(await raw_request(gw, target, key=billing_key["key"]))["path"] == "/billing/x"


async def test_traversal_out_of_a_protected_route_lands_on_the_route_it_names(gw: Gateway) -> None:
    echo = raw_echo(await raw_request(gw, "/billing/../public/x"))
    assert echo["path"] == "/public/x"


@pytest.mark.parametrize(
    "target",
    [
        # '..' above the root
        "/..",
        "/../api/x",
        "/public/../../billing/x",
        "/%2e%2e/api/x",
        "/api/%2e%2e/%2e%2e/billing",
        # encoded '/' or '\', NUL, bad escapes, not UTF-8
        "/public/..%2Fbilling/x",
        "/public%2F..%2Fbilling%2Fx",
        "/api/a%2fb",
        "/api/a%5Cb",
        "/api/a%5cb",
        "/api/a%00",
        "/api/a%zz",
        "/api/a%ff",
    ],
)
async def test_a_path_that_cannot_be_normalised_safely_is_400(gw: Gateway, target: str) -> None:
    # refused before any route or credential is considered: 400, not 401, even without a key
    response = await raw_request(gw, target)
    assert response.status == 400
    assert response.json_error_code() == "invalid_request"
    assert "X-Request-Id" in response.headers
    assert "X-Upstream" not in response.headers


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api", 200),
        ("/api/", 200),
        ("/api/x", 200),
        ("/apix", 404),
        ("/apix/y", 404),
        ("/ap", 404),
        ("/billingx", 404),
    ],
)
async def test_a_prefix_matches_on_segment_boundaries(gw: Gateway, path: str, status: int) -> None:
    # no route: 404 before any credential is asked for, so the refused cases carry no key
    key = (await gw.create_key(name="boundary", owner="acme"))["key"] if status == 200 else None
    async with await gw.call("GET", path, key=key) as r:
        assert r.status == status
        if status == 404:
            assert (await r.json())["error"]["code"] == "route_not_found"
            assert "X-Upstream" not in r.headers
        else:
            assert (await echo_of(r))["path"] == path


@pytest.mark.parametrize(
    ("path", "upstream_sees"),
    [
        ("/stripped/x", "/base/x"),
        ("/stripped/x/y?q=1", "/base/x/y?q=1"),
        ("/stripped/a/../x", "/base/x"),
    ],
)
async def test_a_strip_prefix_route_forwards_under_the_upstream_base_path(
    gw: Gateway, key: dict[str, Any], path: str, upstream_sees: str
) -> None:
    echo = raw_echo(await raw_request(gw, path, key=key["key"]))
    assert echo["path"] == upstream_sees


# --- request and response headers --------------------------------------------------------------


async def test_hop_by_hop_request_headers_are_not_forwarded(gw: Gateway, key: dict[str, Any]) -> None:
    response = await raw_request(
        gw,
        "/api/x",
        key=key["key"],
        headers=[
            ("Connection", "keep-alive, X-Custom-Hop"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Custom-Hop", "secret"),
            ("X-End-To-End", "kept"),
        ],
    )
    seen = echoed_headers(raw_echo(response))
    assert seen["X-End-To-End"] == "kept"
    for name in ("Keep-Alive", "TE", "Upgrade", "Proxy-Authorization", "Proxy-Connection", "X-Custom-Hop"):
        assert name not in seen, name
    # the gateway's client may say keep-alive/close of its own, never what the client named
    assert all("x-custom-hop" not in v.lower() for v in seen.getall("Connection", []))


async def test_the_clients_transfer_encoding_is_not_copied(gw: Gateway, key: dict[str, Any]) -> None:
    """A chunked body is re-framed by the gateway: the client's spelling of the header never reaches the upstream."""
    body = b"chunky" * 1000
    response = await raw_request(
        gw,
        "/api/x",
        method="POST",
        key=key["key"],
        headers=[("Transfer-Encoding", "Chunked")],
        body=body,
        chunked_body=True,
    )
    echo = raw_echo(response)
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed_headers(echo).getall("Transfer-Encoding", []) in ([], ["chunked"])


async def test_hop_by_hop_response_headers_are_not_passed_back(gw: Gateway, key: dict[str, Any]) -> None:
    async with await gw.call("GET", "/api/hop-headers", key=key["key"]) as r:
        assert r.status == 200
        assert await r.text() == "ok"
        assert r.headers["X-Kept"] == "1"
        assert "X-Secret-Hop" not in r.headers
        assert "Keep-Alive" not in r.headers
        assert all("x-secret-hop" not in v.lower() for v in r.headers.getall("Connection", []))


async def test_connection_naming_the_identity_header_does_not_remove_it(gw: Gateway, key: dict[str, Any]) -> None:
    async with await gw.call(
        "GET",
        "/api/x",
        key=key["key"],
        headers={"Connection": "X-Gateway-Key-Id, X-Gateway-Key-Owner, X-Request-Id"},
    ) as r:
        seen = echoed_headers(await echo_of(r))
        request_id = r.headers["X-Request-Id"]
    assert seen.getall("X-Gateway-Key-Id") == [key["id"]]
    assert seen.getall("X-Gateway-Key-Owner") == ["acme"]
    assert seen.getall("X-Request-Id") == [request_id]


async def test_spoofed_identity_headers_are_replaced(gw: Gateway, key: dict[str, Any]) -> None:
    spoofed = [
        ("X-Gateway-Key-Id", "key_evil"),
        ("X-Gateway-Key-Owner", "evil"),
        ("X-Gateway-Anything", "1"),
        ("x-gateway-scopes", "admin"),
    ]
    seen = echoed_headers(raw_echo(await raw_request(gw, "/api/x", key=key["key"], headers=spoofed)))
    assert seen.getall("X-Gateway-Key-Id") == [key["id"]]
    assert seen.getall("X-Gateway-Key-Owner") == ["acme"]
    assert sorted(k.lower() for k in seen if k.lower().startswith("x-gateway-")) == [
        "x-gateway-key-id",
        "x-gateway-key-owner",
    ]


async def test_on_a_public_route_no_identity_header_reaches_the_upstream(gw: Gateway) -> None:
    spoofed = [("X-Gateway-Key-Id", "key_evil"), ("X-Gateway-Key-Owner", "evil"), ("X-Gateway-Anything", "1")]
    seen = echoed_headers(raw_echo(await raw_request(gw, "/public/x", headers=spoofed)))
    assert [k for k in seen if k.lower().startswith("x-gateway-")] == []


@pytest.mark.parametrize(("path", "forwarded"), [("/api/x", False), ("/passauth/x", True)])
async def test_authorization_is_forwarded_only_on_a_forward_authorization_route(
    gw: Gateway, key: dict[str, Any], path: str, forwarded: bool
) -> None:
    async with await gw.call("GET", path, key=key["key"]) as r:
        seen = echoed_headers(await echo_of(r))
    assert seen.getall("Authorization", []) == ([f"Bearer {key['key']}"] if forwarded else [])
    assert seen["X-Gateway-Key-Id"] == key["id"]


async def test_a_well_formed_client_request_id_is_forwarded_and_returned(gw: Gateway, key: dict[str, Any]) -> None:
    async with await gw.call("GET", "/api/x", key=key["key"], headers={"X-Request-Id": "client-req_42.a:b"}) as r:
        seen = echoed_headers(await echo_of(r))
        assert r.headers["X-Request-Id"] == "client-req_42.a:b"
    assert seen.getall("X-Request-Id") == ["client-req_42.a:b"]


@pytest.mark.parametrize("client_id", ["has space", "x" * 129, "-leading-dash", "semi;colon", 'quote"d', "é"])
async def test_a_malformed_client_request_id_is_replaced(gw: Gateway, client_id: str) -> None:
    response = await raw_request(gw, "/public/x", headers=[("X-Request-Id", client_id)])
    seen = echoed_headers(raw_echo(response))
    forwarded = seen.getall("X-Request-Id")
    assert len(forwarded) == 1
    assert forwarded[0] != client_id
    assert NEW_REQUEST_ID.fullmatch(forwarded[0])
    assert response.headers["X-Request-Id"] == forwarded[0]


async def test_a_request_without_an_id_gets_one_the_upstream_and_client_share(gw: Gateway, key: dict[str, Any]) -> None:
    async with await gw.call("GET", "/api/x", key=key["key"]) as r:
        seen = echoed_headers(await echo_of(r))
        assert NEW_REQUEST_ID.fullmatch(r.headers["X-Request-Id"])
        assert seen["X-Request-Id"] == r.headers["X-Request-Id"]


@pytest.mark.parametrize(
    ("client_xff", "expected"),
    [
        (None, "127.0.0.1"),
        ("1.2.3.4", "1.2.3.4, 127.0.0.1"),
        ("1.2.3.4, 10.0.0.7", "1.2.3.4, 10.0.0.7, 127.0.0.1"),
    ],
)
async def test_x_forwarded_headers_are_appended_and_set(
    gateway_factory: Callable[..., Any], client_xff: str | None, expected: str
) -> None:
    # Appended only from a peer in trusted_proxies (spec 6; tests/test_limits.py has the untrusted side).
    gw: Gateway = await gateway_factory(trusted_proxies=["127.0.0.0/8"])
    key = await gw.create_key(name="forwarding", owner="acme")
    sent = {"Host": "api.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    if client_xff is not None:
        sent["X-Forwarded-For"] = client_xff
    async with await gw.call("GET", "/api/x", key=key["key"], headers=sent) as r:
        seen = echoed_headers(await echo_of(r))
    assert seen.getall("X-Forwarded-For") == [expected]
    assert seen.getall("X-Forwarded-Proto") == ["http"]
    assert seen.getall("X-Forwarded-Host") == ["api.example.com"]


async def test_x_forwarded_host_defaults_to_the_host_the_client_sent(gw: Gateway, key: dict[str, Any]) -> None:
    async with await gw.call("GET", "/api/x", key=key["key"]) as r:
        seen = echoed_headers(await echo_of(r))
    assert seen.getall("X-Forwarded-Host") == [f"127.0.0.1:{gw.proxy.port}"]
    # the upstream's own Host is the upstream's, not the client's
    assert seen["Host"] != f"127.0.0.1:{gw.proxy.port}"


# --- bodies ------------------------------------------------------------------------------------


def _block(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (MIB // 32)


async def test_an_upload_is_streamed_to_the_upstream_before_it_is_complete(
    gateway_factory: Callable[..., Any], upstream: TestServer
) -> None:
    # 24 MiB, above the default max_body_bytes (10 MiB): this gateway's api route takes 64 MiB.
    api = {"name": "api", "path_prefix": "/api", "upstream": str(upstream.make_url("")).rstrip("/")}
    gw: Gateway = await gateway_factory(routes=[{**api, "max_body_bytes": 64 * MIB}])
    key = await gw.create_key(name="forwarding", owner="acme")
    started = upstream.app[UPLOAD_STARTED]
    total = 24
    expected = hashlib.sha256(b"".join(_block(i) for i in range(total))).hexdigest()
    waited = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal waited
        yield _block(0)
        # the rest is only sent once the upstream has the first bytes: a buffering gateway deadlocks here
        await asyncio.wait_for(started.wait(), 10)
        waited = True
        for i in range(1, total):
            yield _block(i)

    async with await gw.call("POST", "/api/upload", key=key["key"], data=body()) as r:
        assert r.status == 200, await r.text()
        result = await r.json()
    assert waited
    assert result == {"body_length": total * MIB, "body_sha256": expected}


async def test_a_download_is_streamed_to_the_client_before_it_is_complete(
    gw: Gateway, key: dict[str, Any], upstream: TestServer
) -> None:
    block = bytes(range(256)) * (1024 * 4)
    async with await gw.call("GET", "/api/download?mb=24&gate=1", key=key["key"]) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(24 * MIB)
        # the upstream holds the rest back until the gate opens: a buffering gateway sends nothing yet
        first = await asyncio.wait_for(r.content.readexactly(256 * 1024), 5)
        upstream.app[DOWNLOAD_GATE].set()
        rest = await asyncio.wait_for(r.content.read(), 20)
    body = first + rest
    assert len(body) == 24 * MIB
    assert hashlib.sha256(body).digest() == hashlib.sha256(block * 24).digest()


async def test_a_chunked_upstream_response_arrives_intact(gw: Gateway, key: dict[str, Any]) -> None:
    async with await gw.call("GET", "/api/chunked", key=key["key"]) as r:
        assert r.status == 200
        assert await r.read() == b"part0;part1;part2;part3;part4;"


@pytest.mark.parametrize(
    ("method", "size"),
    [("POST", 0), ("POST", 11), ("POST", 300 * 1024), ("PUT", 11), ("PATCH", 11), ("DELETE", 11)],
)
async def test_a_body_with_content_length_is_forwarded(
    gw: Gateway, key: dict[str, Any], method: str, size: int
) -> None:
    body = (b"hello world" * (size // 11 + 1))[:size]
    async with await gw.call(method, "/api/items/1", key=key["key"], data=body) as r:
        echo = await echo_of(r)
    assert echo["method"] == method
    assert echo["body_length"] == size
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed_headers(echo).get("Content-Length", "0") == str(size)


async def test_head_is_forwarded_and_the_connection_stays_usable(gw: Gateway, key: dict[str, Any]) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    auth = {"Authorization": f"Bearer {key['key']}"}
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.head(gw.proxy_url + "/api/x", headers=auth) as r:
            assert r.status == 200
            assert r.headers["X-Upstream"] == "echo"
            assert r.headers["Content-Type"].startswith("application/json")
            assert await r.read() == b""
        # a HEAD answer that carried a body would desync the next response on this one connection
        async with session.get(gw.proxy_url + "/api/after-head", headers=auth) as r:
            echo = await echo_of(r)
    assert echo["method"] == "GET"
    assert echo["path"] == "/api/after-head"


# --- status, headers, redirects ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_redirect_is_passed_back_not_followed(gw: Gateway, key: dict[str, Any], method: str) -> None:
    async with await gw.call(method, "/api/redirect", key=key["key"]) as r:
        assert r.status == 302
        assert r.headers["Location"] == "/elsewhere"
        assert r.headers["X-Upstream"] == "redirect"


async def test_status_and_response_headers_pass_through(gw: Gateway, key: dict[str, Any]) -> None:
    async with await gw.call("GET", "/api/anything", key=key["key"], headers={"X-Request-Id": "trace-1"}) as r:
        assert r.status == 200
        assert r.headers["X-Upstream"] == "echo"
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.headers["X-Request-Id"] == "trace-1"
        raw = await r.read()
    assert int(r.headers["Content-Length"]) == len(raw)
    assert json.loads(raw)["path"] == "/api/anything"


# --- gateways around upstreams of the test's own ----------------------------------------------

GatewayAround = Callable[[web.Application], Awaitable[ProxyTestServer]]


@pytest.fixture
async def gateway_around(redis_server: RedisProcess, admin_tokens: AdminTokens) -> AsyncIterator[GatewayAround]:
    """A gateway proxy (the standard test routes) in front of an upstream app the test writes itself."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(app: web.Application) -> ProxyTestServer:
            upstream = TestServer(app, host="127.0.0.1")
            await upstream.start_server()
            stack.push_async_callback(upstream.close)
            cfg = make_config(
                redis_url=redis_server.url,
                upstream_url=str(upstream.make_url("")).rstrip("/"),
                tokens=admin_tokens.entries,
            )
            replica = await start_replica(cfg, stack)
            proxy = ProxyTestServer(replica.proxy_server)
            await proxy.start_server()
            stack.push_async_callback(proxy.close)
            return proxy

        yield start


@pytest.mark.parametrize("status", [201, 204, 400, 404, 418, 500, 502, 503])
async def test_upstream_status_headers_and_body_pass_through(gateway_around: GatewayAround, status: int) -> None:
    """The upstream's own errors are its answer, not the gateway's: status, headers and body unchanged."""
    body = b"" if status == 204 else f"upstream says {status}".encode()

    async def answer(request: web.Request) -> web.Response:
        response = web.Response(status=status, reason="Custom Reason", body=body or None)
        response.headers["X-Upstream"] = "custom"
        response.headers["Content-Type"] = "text/x-custom"
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        response.headers["Cache-Control"] = "max-age=7"
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    proxy = await gateway_around(app)
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(proxy.make_url("/public/x")) as r,
    ):
        assert r.status == status
        assert r.reason == "Custom Reason"
        assert r.headers["X-Upstream"] == "custom"
        assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert r.headers["Cache-Control"] == "max-age=7"
        if status != 204:
            assert r.headers["Content-Type"] == "text/x-custom"
        assert await r.read() == body


async def test_an_encoded_upstream_body_is_passed_back_as_it_is(gateway_around: GatewayAround) -> None:
    payload = b'{"compressed": true}' * 100
    encoded = gzip.compress(payload)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=encoded, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    proxy = await gateway_around(app)
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(proxy.make_url("/public/x"), headers={"Accept-Encoding": "gzip"}) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Encoding"] == "gzip"
        assert r.headers["Content-Length"] == str(len(encoded))
        assert await r.read() == encoded


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_upstream_connections_are_pooled_and_kept_alive(gateway_around: GatewayAround, method: str) -> None:
    peers: list[tuple[str, int]] = []

    async def record(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[:2])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    proxy = await gateway_around(app)
    requests = 8
    async with aiohttp.ClientSession() as session:
        for i in range(requests):
            # a new client connection each time, and `close` asked of it: only the gateway's side can reuse
            async with session.request(
                method,
                proxy.make_url(f"/public/{i}"),
                data=b"x" * 1000 if method == "POST" else None,
                headers={"Connection": "close"},
            ) as r:
                assert r.status == 200
                assert await r.text() == "ok"
    assert len(peers) == requests
    assert len(set(peers)) < requests, peers
