"""Verify mode (issue 16): the verify listener answers another proxy's question about a request.

These tests ask the verify listener directly, as nginx `auth_request`, Caddy `forward_auth`,
Traefik `ForwardAuth` and Envoy's ext_authz would (tests/test_verify_proxies.py puts real nginx
and Caddy in front). The gateway runs in process on a real redis-server; its proxy listener and
verify listener share one config, one cache and one key table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from gateway import config as config_mod
from gateway.errors import Denial
from gateway.verify.original import Original, original
from tests.conftest import Gateway
from tests.test_config import valid_raw

VERIFY_LISTEN = {"listen": {"host": "127.0.0.1", "port": 0}}
TRUSTED = ["127.0.0.1/32"]


def routes(upstream_url: str) -> list[dict[str, Any]]:
    return [
        {"name": "v-api", "path_prefix": "/api", "mode": "verify"},
        {"name": "v-admin", "path_prefix": "/admin", "mode": "verify", "scopes": ["admin"]},
        {"name": "v-readonly", "path_prefix": "/readonly", "mode": "verify", "methods": ["GET"]},
        {"name": "v-public", "path_prefix": "/public", "mode": "verify", "auth": "none"},
        # A proxy route on the same prefix as a verify route: each listener sees only its own.
        {"name": "p-api", "path_prefix": "/api", "upstream": upstream_url},
    ]


async def verify_gateway(factory: Callable[..., Any], upstream_url: str, **overrides: Any) -> Gateway:
    settings: dict[str, Any] = {"verify": VERIFY_LISTEN, "trusted_proxies": TRUSTED, "routes": routes(upstream_url)}
    settings.update(overrides)
    gw: Gateway = await factory(**settings)
    return gw


@pytest.fixture
async def vgw(gateway_factory: Callable[..., Any], upstream: Any) -> Gateway:
    return await verify_gateway(gateway_factory, str(upstream.make_url("")).rstrip("/"))


async def ask(
    gw: Gateway,
    method: str,
    uri: str,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/verify",
    style: str = "forwarded",
) -> tuple[int, CIMultiDict[str], bytes]:
    """One question to the verify listener, as a proxy asks it: `style` forwarded (Traefik, Caddy,
    the shipped nginx config), original (the nginx recipe's X-Original-*), or line (Envoy: the
    request line is the question)."""
    h: dict[str, str] = {}
    if style == "forwarded":
        h.update({"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, "X-Forwarded-Host": "api.example"})
    elif style == "original":
        h.update({"X-Original-Method": method, "X-Original-URI": uri})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    verb, target = ("GET", path) if style != "line" else (method, uri)
    async with gw.session.request(verb, gw.verify_url + target, headers=h, allow_redirects=False) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


def error_of(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """The refusal's code, after checking it is a whole spec 5 answer with the body in the header too."""
    assert headers["Content-Type"] == "application/json", headers
    assert headers["X-Gateway-Error-Body"].encode() == body, "the error body header must be the body itself"
    data = orjson.loads(body)
    assert data["error"]["status"] == status
    assert data["meta"]["requestId"] == headers["X-Request-Id"]
    code: str = data["error"]["code"]
    return code


# --- passing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["forwarded", "original"])
async def test_a_valid_key_is_200_with_its_identity_and_nothing_is_forwarded(vgw: Gateway, style: str) -> None:
    created = await vgw.create_key(name="verify", owner="acme-corp", scopes=["admin", "billing:read"])
    status, headers, body = await ask(vgw, "POST", "/admin/users?page=2", key=created["key"], style=style)
    assert (status, body) == (200, b""), (status, headers, body)
    assert headers["X-Gateway-Key-Id"] == created["id"]
    assert headers["X-Gateway-Key-Owner"] == "acme-corp"
    assert headers["X-Gateway-Key-Scopes"] == "admin billing:read"
    assert headers["X-Request-Id"], headers
    assert "X-Gateway-Error-Body" not in headers
    counted = vgw.replica.metrics.registry.get_sample_value(
        "gateway_requests_total", {"route": "v-admin", "code": "verified"}
    )
    assert counted == 1


async def test_a_public_verify_route_passes_without_a_key_and_sends_empty_identity_headers(vgw: Gateway) -> None:
    status, headers, _ = await ask(vgw, "GET", "/public/page")
    assert status == 200
    assert [headers[name] for name in ("X-Gateway-Key-Id", "X-Gateway-Key-Owner", "X-Gateway-Key-Scopes")] == [
        "",
        "",
        "",
    ]


async def test_a_client_request_id_is_kept_and_a_bad_one_replaced(vgw: Gateway) -> None:
    created = await vgw.create_key()
    _, headers, _ = await ask(vgw, "GET", "/api/x", key=created["key"], headers={"X-Request-Id": "req-1234abcd"})
    assert headers["X-Request-Id"] == "req-1234abcd"
    _, headers, _ = await ask(vgw, "GET", "/api/x", key=created["key"], headers={"X-Request-Id": "bad id;<x>"})
    assert headers["X-Request-Id"] != "bad id;<x>" and headers["X-Request-Id"]


# --- refusing, each as the proxy refuses ------------------------------------------------------------


async def test_every_refusal_is_the_proxys_status_and_json_body_with_the_body_in_a_header(vgw: Gateway) -> None:
    created = await vgw.create_key(name="plain")
    key = created["key"]
    disabled = await vgw.create_key(name="gone")
    async with await vgw.admin_call("POST", f"/v1/keys/{disabled['id']}/disable", token="developer") as r:
        assert r.status == 200
    cases: list[tuple[str, str, str | None, int, str]] = [
        ("GET", "/api/x", None, 401, "missing_key"),
        ("GET", "/api/x", "gw_" + "x" * 40, 401, "key_not_found"),
        ("GET", "/api/x", disabled["key"], 403, "key_disabled"),
        ("GET", "/admin/x", key, 403, "insufficient_permissions"),
        ("GET", "/nowhere", key, 404, "route_not_found"),
        ("DELETE", "/readonly/x", key, 405, "method_not_allowed"),
        ("GET", "/api%2Fx", key, 400, "invalid_request"),
        ("GET", "/api/../../etc", key, 400, "invalid_request"),
    ]
    for case in cases:
        method, uri, with_key, want_status, want_code = case
        status, headers, body = await ask(vgw, method, uri, key=with_key)
        assert (status, error_of(status, headers, body)) == (want_status, want_code), case
        assert "X-Gateway-Key-Id" not in headers
        if status == 401:
            assert headers["WWW-Authenticate"].startswith("Bearer"), headers
        if status == 405:
            assert headers["Allow"] == "GET"


async def test_a_key_disabled_through_the_admin_api_is_refused_on_the_very_next_question(vgw: Gateway) -> None:
    created = await vgw.create_key(name="soon-disabled")
    assert (await ask(vgw, "GET", "/api/x", key=created["key"]))[0] == 200  # cached now
    async with await vgw.admin_call("POST", f"/v1/keys/{created['id']}/disable", token="developer") as r:
        assert r.status == 200, await r.text()
    status, headers, body = await ask(vgw, "GET", "/api/x", key=created["key"])
    assert (status, error_of(status, headers, body)) == (403, "key_disabled")


async def test_a_path_that_is_not_already_normalised_is_refused_whatever_route_it_would_reach(vgw: Gateway) -> None:
    """The asking proxy forwards the target as sent, and an upstream may read `/admin/../api`
    otherwise than the gateway: such a target is 400, never decided on (the proxy listener,
    which forwards its own normalised path, may decide it)."""
    created = await vgw.create_key(name="no-admin")
    for uri in ("/api/../admin/x", "/api/%2e%2e/admin/x", "//admin/x", "/api/./../admin", "/admin/../api/x",
                "/admin//../api/x", "/api//x", "/api/./x", "/api/x/..", "/./api"):  # fmt: skip
        status, headers, body = await ask(vgw, "GET", uri, key=created["key"])
        assert (status, error_of(status, headers, body)) == (400, "invalid_request"), uri
        assert "normalised" in orjson.loads(body)["error"]["detail"]
    for uri in ("/api/x/", "/api", "/api/caf%C3%A9", "/api/x?next=/../admin//y"):  # normal paths: decided
        assert (await ask(vgw, "GET", uri, key=created["key"]))[0] == 200, uri


# --- whose headers are believed ---------------------------------------------------------------------


async def test_a_question_from_an_untrusted_peer_or_naming_no_request_is_refused_and_the_operator_told(
    gateway_factory: Callable[..., Any], upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Never a question about the verify request's own line (a catch-all route would pass it
    whatever the proxy is about to forward): 400, and a warning once a minute that names the fix."""
    gw = await verify_gateway(gateway_factory, str(upstream.make_url("")).rstrip("/"), trusted_proxies=[])
    created = await gw.create_key(name="public-only")
    for style in ("forwarded", "line"):
        status, headers, body = await ask(gw, "GET", "/public/x", key=created["key"], style=style)
        assert (status, error_of(status, headers, body)) == (400, "invalid_request"), style
        assert "trusted_proxies" in orjson.loads(body)["error"]["detail"]
    warnings = [r for r in caplog.records if r.name == "gateway.verify"]
    assert len(warnings) == 1 and "add the asking proxy's address to trusted_proxies" in warnings[0].getMessage()
    # From a trusted peer, a question that names no request is refused too.
    vgw = await verify_gateway(gateway_factory, str(upstream.make_url("")).rstrip("/"))
    status, headers, body = await ask(vgw, "GET", "/public/x", style="line")
    assert (status, error_of(status, headers, body)) == (400, "invalid_request")
    assert "must name its request" in orjson.loads(body)["error"]["detail"]


async def test_two_header_pairs_that_name_different_requests_are_refused(vgw: Gateway) -> None:
    """Caddy passes a client's X-Original-URI through; nginx with only X-Original-* set passes a
    client's X-Forwarded-Uri: a forged pair that disagrees with the proxy's is a 400, not a pass."""
    created = await vgw.create_key(name="plain")
    forged = {"X-Original-Method": "GET", "X-Original-URI": "/public/x"}
    status, headers, body = await ask(vgw, "GET", "/admin/x", key=created["key"], headers=forged)
    assert (status, error_of(status, headers, body)) == (400, "invalid_request")
    same = {"X-Original-Method": "GET", "X-Original-URI": "/api/x"}
    assert (await ask(vgw, "GET", "/api/x", key=created["key"], headers=same))[0] == 200


async def test_the_proxy_listener_serves_only_proxy_routes_and_the_verify_listener_only_verify_routes(
    vgw: Gateway,
) -> None:
    created = await vgw.create_key(name="both")
    async with await vgw.call("GET", "/admin/x", key=created["key"]) as r:
        assert r.status == 404  # a verify route: not forwarded by the proxy listener
    async with await vgw.call("GET", "/api/x", key=created["key"]) as r:
        assert r.status == 200  # the proxy route on the same prefix forwards
    assert (await ask(vgw, "GET", "/api/x", key=created["key"]))[0] == 200


async def test_envoys_path_prefix_is_taken_off_the_request_line(
    gateway_factory: Callable[..., Any], upstream: Any
) -> None:
    gw = await verify_gateway(
        gateway_factory,
        str(upstream.make_url("")).rstrip("/"),
        verify={**VERIFY_LISTEN, "path_prefix": "/ext_authz"},
        trusted_proxies=[],
    )
    created = await gw.create_key(name="envoy", scopes=["admin"])
    status, headers, _ = await ask(gw, "PUT", "/ext_authz/admin/x?y=1", key=created["key"], style="line")
    assert (status, headers["X-Gateway-Key-Id"]) == (200, created["id"])
    status, headers, body = await ask(gw, "GET", "/other/admin/x", key=created["key"], style="line")
    assert (status, error_of(status, headers, body)) == (404, "route_not_found")


async def test_a_question_with_a_body_is_answered_and_its_connection_closed(vgw: Gateway) -> None:
    created = await vgw.create_key()
    headers = {"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/api/x", "Authorization": f"Bearer {created['key']}"}
    async with vgw.session.post(vgw.verify_url + "/verify", headers=headers, data=b"x" * 1000) as r:
        assert r.status == 200
        assert r.headers.get("Connection", "").lower() == "close"


# --- the question, pure -----------------------------------------------------------------------------


def h(**fields: str) -> Any:
    from multidict import CIMultiDict, CIMultiDictProxy

    return CIMultiDictProxy(CIMultiDict((k.replace("_", "-"), v) for k, v in fields.items()))


def test_original_reads_the_pairs_only_from_a_trusted_peer_and_the_line_only_behind_a_path_prefix() -> None:
    both = h(X_Forwarded_Method="POST", X_Forwarded_Uri="/a?b=1")
    assert original("GET", "/verify", both, trusted=True) == Original("POST", "/a?b=1")
    untrusted = original("GET", "/verify", both, trusted=False)
    assert isinstance(untrusted, Denial) and untrusted.code == "invalid_request"
    # Envoy: the line is the question, behind the prefix ("/": the line as it is); headers are not read.
    assert original("PUT", "/x/a", both, trusted=True, path_prefix="/x") == Original("PUT", "/a")
    assert original("PUT", "/a?q", both, trusted=False, path_prefix="/") == Original("PUT", "/a?q")
    assert original("GET", "/verify", h(X_Original_Method="PUT", X_Original_URI="/c"), trusted=True) == Original(
        "PUT", "/c"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"X_Forwarded_Uri": "/a"},  # a target without its method
        {"X_Forwarded_Method": "GET"},
        {"X_Forwarded_Method": "G E T", "X_Forwarded_Uri": "/a"},
        {"X_Forwarded_Method": "", "X_Forwarded_Uri": "/a"},
        {"X_Forwarded_Method": "get", "X_Forwarded_Uri": "/a"},  # methods are upper-case
        {},  # names no request
        {"X_Forwarded_Method": "GET", "X_Forwarded_Uri": "/a", "X_Original_Method": "GET", "X_Original_URI": "/b"},
        {"X_Forwarded_Method": "GET", "X_Forwarded_Uri": "/a", "X_Original_Method": "POST", "X_Original_URI": "/a"},
    ],
)
def test_original_refuses_a_question_it_cannot_tell(fields: dict[str, str]) -> None:
    got = original("GET", "/verify", h(**fields), trusted=True)
    assert isinstance(got, Denial) and got.code == "invalid_request", got


def test_original_refuses_a_pair_sent_twice() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    twice = CIMultiDictProxy(
        CIMultiDict([("X-Forwarded-Method", "GET"), ("X-Forwarded-Uri", "/a"), ("X-Forwarded-Uri", "/b")])
    )
    got = original("GET", "/verify", twice, trusted=True)
    assert isinstance(got, Denial) and got.code == "invalid_request"


# --- configuration ----------------------------------------------------------------------------------


def parse(extra: dict[str, Any]) -> config_mod.Config:
    import yaml

    raw = valid_raw()
    raw.update(extra)
    return config_mod.parse(yaml.safe_dump(raw), source="<test>")


def problems(extra: dict[str, Any]) -> list[str]:
    with pytest.raises(config_mod.ConfigError) as info:
        parse(extra)
    return [p.format("<test>") for p in info.value.problems]


def test_a_verify_route_needs_the_verify_section_and_forwards_nothing() -> None:
    route = {"name": "v", "path_prefix": "/v", "mode": "verify"}
    assert problems({"routes": [route]}) == [
        "<test>: routes[0].mode: 'verify': a verify route needs the verify listener: add a verify: section"
    ]
    assert problems({"verify": {}, "routes": [{**route, "upstream": "http://127.0.0.1:9"}]}) == [
        "<test>: routes[0].upstream: (value not shown): a verify route forwards nothing: the proxy in front of "
        "the gateway does"
    ]
    assert problems({"verify": {}, "routes": [{**route, "strip_prefix": True}]}) == [
        "<test>: routes[0].strip_prefix: True: a verify route forwards nothing: the proxy in front of the gateway does"
    ]
    assert problems({"routes": [{"name": "p", "path_prefix": "/p"}]}) == [
        "<test>: routes[0].upstream: (absent): is required"
    ]
    assert problems({"routes": [{**route, "mode": "mirror"}]}) == [
        "<test>: routes[0].mode: 'mirror': must be one of: proxy, verify"
    ]


def test_the_verify_listener_has_defaults_and_a_port_of_its_own() -> None:
    cfg = parse({"verify": {}, "routes": [{"name": "v", "path_prefix": "/v", "mode": "verify"}]})
    assert cfg.verify is not None
    assert (cfg.verify.listen.host, cfg.verify.listen.port, cfg.verify.path_prefix) == ("127.0.0.1", 8082, "")
    assert cfg.routes_for("proxy") == () and [r.name for r in cfg.routes_for("verify")] == ["v"]
    assert problems({"verify": {"listen": {"port": 8080}}}) == [
        "<test>: verify.listen.port: 8080: must differ from listen.port: each listener has a port of its own"
    ]
    assert problems({"verify": {"path_prefix": "ext/"}}) == ["<test>: verify.path_prefix: 'ext/': must start with '/'"]


def test_a_proxy_route_and_a_verify_route_may_share_a_prefix_but_not_a_name() -> None:
    both = [
        {"name": "a", "path_prefix": "/api", "upstream": "http://127.0.0.1:9"},
        {"name": "b", "path_prefix": "/api", "mode": "verify"},
    ]
    assert len(parse({"verify": {}, "routes": both}).routes) == 2
    assert problems({"verify": {}, "routes": [both[0], {**both[1], "name": "a"}]}) == [
        "<test>: routes[1].name: 'a': duplicate route name"
    ]
    assert problems({"verify": {}, "routes": [both[1], {**both[1], "name": "c"}]}) == [
        "<test>: routes[1].path_prefix: '/api': duplicate path_prefix: another verify route already claims it"
    ]


async def test_asked_for_the_body_in_the_header_only_a_refusal_keeps_the_connection(vgw: Gateway) -> None:
    """nginx keeps its connection to the verifier only after an answer without a body: with
    `X-Gateway-Refusal-Body: header` the JSON is in X-Gateway-Error-Body alone, on one connection."""
    connector_session = vgw.session
    for _ in range(3):
        headers = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/x", "X-Gateway-Refusal-Body": "header"}
        async with connector_session.get(vgw.verify_url + "/verify", headers=headers) as r:
            assert r.status == 401
            assert await r.read() == b""
            assert orjson.loads(r.headers["X-Gateway-Error-Body"])["error"]["code"] == "missing_key"
            assert r.headers.get("Connection", "").lower() != "close"
    server = vgw.replica.verify_server
    assert server is not None and len(server.connections) == 1, "the refusals shared one keep-alive connection"
