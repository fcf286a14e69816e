"""Verify mode, attacked: a client of nginx/Caddy in front of the gateway, a client that reaches the
verify listener directly, and a careless operator.

The tests named F1-F7 were findings of a hostile review, each written as a failing test first and
fixed since: F1 a question from an untrusted peer, or one naming no request, was taken as a question
about its own request line (a catch-all route passed everything); F2 a raw '#' and F3 a `..;`
segment let the verifier decide on another path than an upstream may act on; F4 identity headers
spelled with mixed separators passed Caddy; F5 nginx buffered a body after the check, forwarding
after a disable answered; F6 the listener's own refusals lacked X-Gateway-Error-Body (nginx made
them 503); F7 a lower-case `trace` passed the CONNECT/TRACE rule. The other tests are attacks that
are refused correctly and that tests/test_verify.py and tests/test_verify_proxies.py do not cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Gateway
from tests.recording_upstream import TEST_ID, Answer, Client, RecordingUpstream, raw_request
from tests.test_verify_proxies import PROXIES, verify_routes
from tests.verify_proxies import caddy_binary, nginx_binary, running_caddy, running_nginx

VERIFY_LISTEN = {"listen": {"host": "127.0.0.1", "port": 0}}
TRUSTED = ["127.0.0.1/32"]
needs_nginx = pytest.mark.skipif(nginx_binary() is None, reason="nginx with auth_request is not installed")
needs_caddy = pytest.mark.skipif(caddy_binary() is None, reason="caddy is not installed")
# A catch-all verify route beside a scoped one: the usual "every path needs a key, /admin needs more".
CATCH_ALL = [
    {"name": "v-all", "path_prefix": "/", "mode": "verify"},
    {"name": "v-admin", "path_prefix": "/admin", "mode": "verify", "scopes": ["admin"]},
]


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingUpstream]:
    server = RecordingUpstream()
    await server.start()
    yield server
    await server.close()


async def verify_gateway(factory: Callable[..., Any], **overrides: Any) -> Gateway:
    settings: dict[str, Any] = {"verify": VERIFY_LISTEN, "trusted_proxies": TRUSTED, "routes": verify_routes()}
    settings.update(overrides)
    gw: Gateway = await factory(**settings)
    return gw


async def send(port: int, data: bytes) -> Answer:
    """One request's exact bytes on a connection of its own, and the answer."""
    client = await Client.open(port)
    try:
        await client.send(data)
        return await client.answer()
    finally:
        await client.close()


async def question(gw: Gateway, *lines: bytes, key: str | None = None, target: str = "/verify") -> Answer:
    """A question to the verify listener with the given header lines, sent byte for byte."""
    assert gw.verify is not None
    head = [*lines, b"Connection: close"]
    if key is not None:
        head.insert(0, f"Authorization: Bearer {key}".encode())
    return await send(gw.verify.port, raw_request("GET", target, head))


def named(method: str, uri: str) -> tuple[bytes, bytes]:
    return f"X-Forwarded-Method: {method}".encode(), b"X-Forwarded-Uri: " + uri.encode("latin-1")


def code_of(answer: Answer) -> str:
    code: str = orjson.loads(answer.body)["error"]["code"]
    return code


@contextlib.contextmanager
def running(name: str, workdir: Path, verify_url: str, upstream_url: str) -> Iterator[int]:
    starter = running_nginx if name == "nginx" else running_caddy
    with starter(workdir, verify_url, upstream_url, verify_timeout_s=2) as url:
        yield int(url.rsplit(":", 1)[1])


async def upstream_got(recorder: RecordingUpstream) -> list[str]:
    await recorder.settle(quiet=0.02, most=0.5)
    return [f"{r.method} {r.target}" for r in recorder.requests]


# --- F1: the request line as the question fails open behind a catch-all route ---------------------------


async def test_a_forgotten_trusted_proxies_entry_does_not_pass_every_request(
    gateway_factory: Callable[..., Any],
) -> None:
    gw = await verify_gateway(gateway_factory, trusted_proxies=[], routes=CATCH_ALL)
    reader = await gw.create_key(name="reader", scopes=["reports:read"])
    answer = await question(gw, *named("DELETE", "/admin/users/1"), key=reader["key"])
    assert answer.status != 200, "a question naming /admin was answered about /verify, and passed"


async def test_a_proxy_that_names_no_request_is_not_answered_about_its_verify_path(
    gateway_factory: Callable[..., Any],
) -> None:
    gw = await verify_gateway(gateway_factory, routes=CATCH_ALL)
    reader = await gw.create_key(name="reader", scopes=["reports:read"])
    answer = await question(gw, key=reader["key"])  # what `auth_request /auth; proxy_pass .../verify` asks
    assert answer.status != 200


@needs_nginx
async def test_behind_nginx_a_forgotten_trusted_proxies_entry_opens_a_scoped_route(
    gateway_factory: Callable[..., Any], recorder: RecordingUpstream, tmp_path: Path
) -> None:
    gw = await verify_gateway(gateway_factory, trusted_proxies=[], routes=CATCH_ALL)
    reader = await gw.create_key(name="reader", scopes=["reports:read"])
    with running("nginx", tmp_path / "nginx", gw.verify_url, recorder.url) as port:
        head = [f"Authorization: Bearer {reader['key']}", f"{TEST_ID}: f1", "Connection: close"]
        answer = await send(port, raw_request("DELETE", "/admin/users/1", head))
    assert answer.status == 400, (answer.status, answer.body[:200])  # the question is refused: untrusted peer
    assert await upstream_got(recorder) == []


# --- F2: targets the verifier reads otherwise than an upstream may ---------------------------------------


async def test_a_raw_fragment_in_the_target_is_refused(gateway_factory: Callable[..., Any]) -> None:
    gw = await verify_gateway(gateway_factory)
    answer = await question(gw, *named("GET", "/public#/../admin/users"))
    assert answer.status == 400, (answer.status, answer.body[:200])
    assert code_of(answer) == "invalid_request"


@pytest.mark.parametrize("target", ["/public/..;/admin/users", "/public/..;x=1/admin/users"])
async def test_a_dot_segment_with_path_parameters_is_refused(gateway_factory: Callable[..., Any], target: str) -> None:
    gw = await verify_gateway(gateway_factory)
    answer = await question(gw, *named("GET", target))
    assert answer.status == 400, (answer.status, answer.body[:200])
    assert code_of(answer) == "invalid_request"


@needs_nginx
@pytest.mark.parametrize("target", ["/public#/../admin/users", "/public/..;/admin/users"])
async def test_behind_nginx_fragment_and_path_parameter_tricks_do_not_reach_the_upstream(
    gateway_factory: Callable[..., Any], recorder: RecordingUpstream, tmp_path: Path, target: str
) -> None:
    gw = await verify_gateway(gateway_factory)
    with running("nginx", tmp_path / "nginx", gw.verify_url, recorder.url) as port:
        answer = await send(port, raw_request("GET", target, [f"{TEST_ID}: f2", "Connection: close"]))
    assert answer.status == 400, (answer.status, answer.body[:200])
    assert await upstream_got(recorder) == []


# --- F4: identity headers with mixed separators pass Caddy's stripping -----------------------------------

MIXED = {"X-Gateway_Key-Id": "key_forged", "X_Gateway-Key-Scopes": "admin", "X-Gateway_Key_Owner": "mallory"}


def forged_seen(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Identity headers the upstream got that a CGI/WSGI/Rack/PHP server reads as X-Gateway-Key-*,
    other than the verifier's (which are empty here: a public route)."""
    return [(n, v) for n, v in headers if n.lower().replace("_", "-").startswith("x-gateway-key-") and v]


async def caddy_forwards_mixed(
    gateway_factory: Callable[..., Any], recorder: RecordingUpstream, tmp_path: Path
) -> list[tuple[str, str]]:
    gw = await verify_gateway(gateway_factory)
    with running("caddy", tmp_path / "caddy", gw.verify_url, recorder.url) as port:
        head = [f"{name}: {value}" for name, value in MIXED.items()] + [f"{TEST_ID}: f4", "Connection: close"]
        answer = await send(port, raw_request("GET", "/public/status", head))
    assert answer.from_upstream, (answer.status, answer.body[:200])
    await recorder.settle(quiet=0.02, most=0.5)
    (got,) = recorder.requests
    return forged_seen(got.headers)


@needs_caddy
async def test_caddy_strips_identity_headers_spelled_with_mixed_separators(
    gateway_factory: Callable[..., Any], recorder: RecordingUpstream, tmp_path: Path
) -> None:
    assert await caddy_forwards_mixed(gateway_factory, recorder, tmp_path) == []


# --- F5: a disable does not stop a request nginx already verified and is still buffering -----------------


async def disable_during_a_slow_upload(
    gateway_factory: Callable[..., Any], recorder: RecordingUpstream, tmp_path: Path
) -> tuple[list[str], list[str]]:
    """A POST whose body trickles in: verified at its head, the key disabled (the admin API answers 200),
    then the rest of the body. What the upstream had got before the disable answered, and after."""
    gw = await verify_gateway(gateway_factory)
    created = await gw.create_key(name="soon-gone")
    with running("nginx", tmp_path / "nginx", gw.verify_url, recorder.url) as port:
        client = await Client.open(port)
        try:
            head = [f"Authorization: Bearer {created['key']}", "Content-Length: 10", f"{TEST_ID}: slow"]
            await client.send(raw_request("POST", "/api/payments", [*head, "Connection: close"], b"hello"))
            await asyncio.sleep(0.3)  # nginx has asked the verifier (200) and waits for the rest of the body
            before = await upstream_got(recorder)
            async with await gw.admin_call("POST", f"/v1/keys/{created['id']}/disable", token="developer") as r:
                assert r.status == 200, await r.text()
            await client.send(b"world")
            await client.answer()
        finally:
            await client.close()
    return before, await upstream_got(recorder)


@needs_nginx
async def test_behind_nginx_nothing_starts_upstream_after_a_disable_answered(
    gateway_factory: Callable[..., Any], recorder: RecordingUpstream, tmp_path: Path
) -> None:
    before, after = await disable_during_a_slow_upload(gateway_factory, recorder, tmp_path)
    assert after == before, f"began upstream after the disable answered: {after}"


# --- F6: the listener's own refusals have no X-Gateway-Error-Body ----------------------------------------


@needs_nginx
async def test_behind_nginx_a_head_too_large_for_the_verifier_is_431_not_503(
    gateway_factory: Callable[..., Any], recorder: RecordingUpstream, tmp_path: Path
) -> None:
    gw = await verify_gateway(gateway_factory)
    created = await gw.create_key(name="k")
    with running("nginx", tmp_path / "nginx", gw.verify_url, recorder.url) as port:
        # 95 headers pass nginx; with the ~9 it adds for the verifier they exceed limits.max_headers (100).
        head = [
            f"Authorization: Bearer {created['key']}",
            *(f"X-Filler-{i}: v" for i in range(95)),
            "Connection: close",
        ]
        answer = await send(port, raw_request("GET", "/api/x", head))
    assert answer.status == 431, (answer.status, answer.body[:200])


# --- F7: a lower-case CONNECT/TRACE named in a header passes an all-methods route ------------------------


@pytest.mark.parametrize("method", ["trace", "Connect"])
async def test_a_method_named_in_lower_case_is_not_a_way_around_the_unlisted_methods(
    gateway_factory: Callable[..., Any], method: str
) -> None:
    gw = await verify_gateway(gateway_factory)
    created = await gw.create_key(name="k")
    answer = await question(gw, *named(method, "/api/x"), key=created["key"])
    assert answer.status in (400, 405), answer.status


# --- refused correctly ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: /public/x\r\n /../../admin/x"), 400),  # obs-fold
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: /public/x\x00/../admin"), 400),  # NUL in a value
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: /public\\..\\admin"), 400),  # backslashes
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: /public/%c0%ae%c0%ae/admin"), 400),  # overlong UTF-8 '.'
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: /public/\xff/../admin"), 400),  # raw non-UTF-8 byte
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: http://evil/public/x"), 400),  # absolute-form
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: *"), 400),
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: "), 400),  # an empty target
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: /" + b"a" * 9000), 400),  # past the field limit
        ((b"X-Forwarded-Method: %47ET", b"X-Forwarded-Uri: /api/x"), 400),  # a percent-encoded method
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: /public/x", b"x-forwarded-uri: /admin/x"), 400),
        ((b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: /public/x", b"X-Original-URI: /public/x"), 400),
        (
            (b"X-Forwarded-Method: GET", b"X-Forwarded-Uri: /public/x", b"X-Original-Method: GET", b"X-Original-URI: "),
            400,
        ),
        ((b"x-FORWARDED-method: GET", b"X-FORWARDED-URI:\t/admin/x\t"), 403),  # any case, trimmed: still /admin
        (
            (b"X_Forwarded_Method: GET", b"X_Forwarded_Uri: /public/x"),
            400,
        ),  # underscores: not believed, so it names nothing
    ],
)
async def test_odd_questions_are_refused_or_decided_on_what_the_proxy_forwards(
    gateway_factory: Callable[..., Any], lines: tuple[bytes, ...], status: int
) -> None:
    gw = await verify_gateway(gateway_factory)
    reader = await gw.create_key(name="reader", scopes=["reports:read"])
    answer = await question(gw, *lines, key=reader["key"])
    assert answer.status == status, (lines, answer.status, answer.body[:200])
    assert "X-Gateway-Key-Id" not in answer.headers


async def test_envoys_path_prefix_is_matched_on_a_segment_boundary_and_not_normalised_away(
    gateway_factory: Callable[..., Any],
) -> None:
    gw = await verify_gateway(gateway_factory, trusted_proxies=[], verify={**VERIFY_LISTEN, "path_prefix": "/ext"})
    admin = await gw.create_key(name="admin", scopes=["admin"])
    for target, status in (
        ("/extra/admin/x", 404),  # not the prefix: a longer segment
        ("/ext", 404),  # the prefix alone is `/`: no route there
        ("/ext/../admin/x", 400),
        ("/ext//admin/x", 400),
        ("/EXT/admin/x", 404),
        ("/ext%2Fadmin/x", 404),
        ("/ext/admin/x?a=/../b", 200),
    ):
        answer = await question(gw, key=admin["key"], target=target)
        assert answer.status == status, (target, answer.status, answer.body[:200])


async def test_identity_values_and_request_ids_cannot_break_a_header_line(gateway_factory: Callable[..., Any]) -> None:
    gw = await verify_gateway(gateway_factory)
    async with await gw.admin_call(
        "POST", "/v1/keys", token="developer", json={"name": "x", "owner": "a\r\nX-Gateway-Key-Scopes: admin"}
    ) as r:
        assert r.status == 400  # control characters never reach a record
    created = await gw.create_key(name="k", owner="Zoë, Inc. \u00a0")
    answer = await question(gw, *named("GET", "/api/x"), b"X-Request-Id: a\tb", key=created["key"])
    assert answer.status == 200
    assert answer.headers["X-Request-Id"] != "a\tb"
    assert answer.headers.getall("X-Gateway-Key-Scopes") == [""]


async def test_no_key_authorization_or_query_reaches_the_logs(
    gateway_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await verify_gateway(gateway_factory, trusted_proxies=[])
    created = await gw.create_key(name="k")
    secret_query = "token=qsecret123"
    await question(gw, *named("GET", f"/admin/x?{secret_query}"), key=created["key"])  # untrusted: warned
    await question(gw, key=created["key"], target=f"/api/x?{secret_query}")
    await question(gw, key=created["key"], target="/api/../x")
    await question(gw, key="gw_" + "A" * 40, target="/api/x")
    assert any(r.name == "gateway.access" for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(str(v) for v in record.__dict__.values())
        for leak in (created["key"], "A" * 40, "qsecret123", "Bearer"):
            assert leak not in text, (record.name, leak)


@pytest.mark.parametrize("front", PROXIES)
async def test_absolute_form_and_client_naming_headers_change_nothing_through_the_proxies(
    front: str, gateway_factory: Callable[..., Any], recorder: RecordingUpstream, tmp_path: Path
) -> None:
    gw = await verify_gateway(gateway_factory)
    reader = await gw.create_key(name="reader", scopes=["reports:read"])
    spoof = ["X-Forwarded-Uri: /api/x", "X-Forwarded-Method: GET", "X-Original-URI: /api/x", "X-Original-Method: GET",
             "X_Original_URI: /api/x", "X-Original_URI: /api/x", "X-Forwarded_Uri: /api/x"]  # fmt: skip
    with running(front, tmp_path / front, gw.verify_url, recorder.url) as port:
        for target in ("http://api.example/admin/users", "/admin/users"):
            head = [f"Authorization: Bearer {reader['key']}", *spoof, f"{TEST_ID}: abs", "Connection: close"]
            answer = await send(port, raw_request("GET", target, head))
            assert answer.status == 403, (target, answer.status, answer.body[:200])
            assert code_of(answer) == "insufficient_permissions"
    assert await upstream_got(recorder) == []
