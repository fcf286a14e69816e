"""Verify mode end to end: real nginx (auth_request) and real Caddy (forward_auth) in front of the
gateway's verify listener, with the configurations docs/verify-proxies.md ships (tests/verify_proxies.py),
and a recording upstream behind them that keeps every request it read (method, raw target, headers).

Each test runs once per proxy. What they show, through each proxy:
- an allowed request reaches the upstream with the verifier's `X-Gateway-Key-*` values, never the
  client's forged ones (also on a public route, where the verifier sends them empty);
- every refusal reaches the client with the verifier's status and the same JSON body byte for byte,
  `Content-Type: application/json` (and `WWW-Authenticate` on a 401), and nothing reaches the upstream;
- the first request after a disable (answered 200 by the admin API) is refused;
- path tricks are decided on the normalised path, as the proxy mode decides them;
- a verifier that is down fails closed.

The proxies are started from the async tests with their blocking context managers: they only spawn
a process and wait for its port (well under a second); the gateway runs on the test's loop.
`make test` installs nginx and caddy (scripts/ensure-verify-proxies.sh); without them these skip.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.recording_upstream import TEST_ID, Answer, Client, Recorded, RecordingUpstream, raw_request
from tests.verify_proxies import (
    caddy_binary,
    free_port,
    nginx_binary,
    running_caddy,
    running_nginx,
    site_caddy,
    site_nginx,
)

ROOT = Path(__file__).resolve().parent.parent

IDENTITY = ("X-Gateway-Key-Id", "X-Gateway-Key-Owner", "X-Gateway-Key-Scopes")
FORGED = {"X-Gateway-Key-Id": "key_forged", "X-Gateway-Key-Owner": "mallory", "X-Gateway-Key-Scopes": "admin"}
# The same names with underscores: some servers read `X_Gateway_Key_Id` as `X-Gateway-Key-Id`.
FORGED_UNDERSCORED = {name.replace("-", "_"): value for name, value in FORGED.items()}

PROXIES = [
    pytest.param(
        "nginx",
        marks=pytest.mark.skipif(
            nginx_binary() is None,
            reason="nginx with the auth_request module is not installed: `make test` installs it "
            "(scripts/ensure-verify-proxies.sh, Debian's nginx package)",
        ),
    ),
    pytest.param(
        "caddy",
        marks=pytest.mark.skipif(
            caddy_binary() is None,
            reason="caddy is not installed: `make test` installs it (scripts/ensure-verify-proxies.sh, "
            "Debian's caddy package)",
        ),
    ),
]


def verify_routes() -> list[dict[str, Any]]:
    """The verify listener's routes: `/api` (any key), `/admin` (scope `admin`), `/readonly` (GET
    only) and `/public` (no key)."""
    return [
        {"name": "v-api", "path_prefix": "/api", "mode": "verify"},
        {"name": "v-admin", "path_prefix": "/admin", "mode": "verify", "scopes": ["admin"]},
        {"name": "v-readonly", "path_prefix": "/readonly", "mode": "verify", "methods": ["GET"]},
        {"name": "v-public", "path_prefix": "/public", "mode": "verify", "auth": "none"},
    ]


def proxy_routes(upstream_url: str) -> list[dict[str, Any]]:
    """The same routes in proxy mode on the gateway's own proxy listener (to the same recorder), so a
    test can compare what the verify mode decides with what the proxy mode decides."""
    return [
        {"name": "p-api", "path_prefix": "/api", "upstream": upstream_url},
        {"name": "p-admin", "path_prefix": "/admin", "upstream": upstream_url, "scopes": ["admin"]},
        {"name": "p-readonly", "path_prefix": "/readonly", "upstream": upstream_url, "methods": ["GET"]},
        {"name": "p-public", "path_prefix": "/public", "upstream": upstream_url, "auth": "none"},
    ]


@dataclass
class Front:
    """A gateway with a verify listener, a real proxy asking it, and the upstream behind the proxy."""

    name: str  # "nginx" or "caddy"
    gateway: Gateway
    recorder: RecordingUpstream
    url: str  # the proxy's base URL
    _ids: int = 0

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def verify_port(self) -> int:
        assert self.gateway.verify is not None
        return self.gateway.verify.port

    def request_id(self) -> str:
        """A fresh, well-formed X-Request-Id: the verifier keeps a client's, so a refusal's body
        through the proxy and from a direct question can be compared byte for byte."""
        self._ids += 1
        return f"t-{self.name}-{self._ids}"

    async def through_proxy(
        self, method: str, target: str, *, key: str | None = None, headers: dict[str, str] | None = None
    ) -> Answer:
        return await ask(self.port, method, target, key=key, headers=headers)

    async def through_gateway_proxy(self, method: str, target: str, *, key: str | None = None) -> Answer:
        """The same request to the gateway's own proxy listener (proxy mode)."""
        return await ask(self.gateway.proxy.port, method, target, key=key)

    async def asked_directly(self, method: str, target: str, *, key: str | None, request_id: str) -> Answer:
        """The verifier's answer to the question the proxy asks about `method target` (the headers
        nginx and Caddy send), from a direct call."""
        headers = {"X-Forwarded-Method": method, "X-Forwarded-Uri": target, "X-Request-Id": request_id}
        return await ask(self.verify_port, "GET", "/verify", key=key, headers=headers)

    async def nothing_reached_the_upstream(self) -> None:
        await self.recorder.settle(quiet=0.05, most=1.0)
        seen = "\n  ".join(r.describe() for r in self.recorder.requests)
        assert not self.recorder.requests, f"{self.name} forwarded what the verifier refused:\n  {seen}"

    async def upstream_got_only(self, test_id: str) -> Recorded:
        """The one request the upstream read since the last reset, which must be `test_id`'s."""
        await self.recorder.settle(quiet=0.02, most=1.0)
        requests = self.recorder.requests
        assert [r.test_id for r in requests] == [test_id], [r.describe() for r in requests]
        (got,) = requests
        assert got.complete, got.describe()
        return got


async def ask(
    port: int, method: str, target: str, *, key: str | None = None, headers: dict[str, str] | None = None
) -> Answer:
    """One request on a connection of its own, the request target sent exactly as given."""
    lines = [f"{name}: {value}" for name, value in (headers or {}).items()]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    client = await Client.open(port)
    try:
        await client.send(raw_request(method, target, [*lines, "Connection: close"]))
        return await client.answer(head=method == "HEAD")
    finally:
        await client.close()


@contextlib.contextmanager
def running(name: str, workdir: Path, verify_url: str, upstream_url: str) -> Iterator[str]:
    starter = running_nginx if name == "nginx" else running_caddy
    with starter(workdir, verify_url, upstream_url, verify_timeout_s=2) as url:
        yield url


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingUpstream]:
    server = RecordingUpstream()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def front(
    request: pytest.FixtureRequest,
    gateway_factory: Callable[..., Any],
    recorder: RecordingUpstream,
    tmp_path: Path,
) -> AsyncIterator[Front]:
    """The gateway (verify listener on a free port, 127.0.0.1 trusted) and the parametrized proxy."""
    name: str = request.param
    gateway: Gateway = await gateway_factory(
        verify={"listen": {"host": "127.0.0.1", "port": 0}},
        trusted_proxies=["127.0.0.1/32"],
        routes=verify_routes() + proxy_routes(recorder.url),
    )
    with running(name, tmp_path / name, gateway.verify_url, recorder.url) as url:
        yield Front(name, gateway, recorder, url)


# Each test runs once per proxy; `front` is built for it (skipped when the binary is missing).
parametrize_proxies = pytest.mark.parametrize("front", PROXIES, indirect=True)


def values(request: Recorded, name: str) -> list[str]:
    """Every value the upstream read under `name`, also under its underscore spelling."""
    spellings = {name.lower(), name.lower().replace("-", "_")}
    return [v for n, v in request.headers if n.lower() in spellings]


def error_of(answer: Answer) -> dict[str, Any]:
    assert answer.headers.get("Content-Type", "").split(";")[0].strip() == "application/json", answer.raw_headers
    body: dict[str, Any] = json.loads(answer.body)
    return body


# --- allowed: the verifier's identity reaches the upstream, the client's does not ---------------------------


@parametrize_proxies
async def test_an_allowed_request_reaches_the_upstream_with_the_key_identity_the_verifier_gave(front: Front) -> None:
    gw = front.gateway
    created = await gw.create_key(name="reports", owner="acme", scopes=["admin", "reports:read"])
    request_id = front.request_id()
    forged = {**FORGED, **FORGED_UNDERSCORED, "X-Request-Id": request_id, TEST_ID: "allowed"}
    answer = await front.through_proxy("GET", "/admin/reports?q=1&r=%2F", key=created["key"], headers=forged)

    assert answer.from_upstream, (answer.status, answer.raw_headers, answer.body[:300])
    got = await front.upstream_got_only("allowed")
    assert got.method == "GET"
    assert got.target == "/admin/reports?q=1&r=%2F"  # the client's target, unchanged
    assert values(got, "X-Gateway-Key-Id") == [created["id"]]
    assert values(got, "X-Gateway-Key-Owner") == ["acme"]
    assert values(got, "X-Gateway-Key-Scopes") == ["admin reports:read"]
    assert values(got, "X-Request-Id") == [request_id]  # the verifier kept the client's well-formed id


@parametrize_proxies
async def test_an_allowed_post_reaches_the_upstream_with_its_method_and_body(front: Front) -> None:
    created = await front.gateway.create_key(name="writer", owner="acme")
    body = b'{"amount": 12}'
    client = await Client.open(front.port)
    try:
        head = [f"Authorization: Bearer {created['key']}", f"{TEST_ID}: post", f"Content-Length: {len(body)}"]
        await client.send(raw_request("POST", "/api/payments", [*head, "Connection: close"], body))
        answer = await client.answer()
    finally:
        await client.close()
    assert answer.from_upstream, (answer.status, answer.body[:300])
    got = await front.upstream_got_only("post")
    assert (got.method, got.target, bytes(got.body)) == ("POST", "/api/payments", body)
    assert values(got, "X-Gateway-Key-Id") == [created["id"]]
    assert values(got, "X-Gateway-Key-Scopes") in ([], [""])  # no scopes: nginx sends none, Caddy an empty one


@parametrize_proxies
async def test_a_public_route_passes_without_a_key_and_the_clients_identity_headers_do_not_reach_the_upstream(
    front: Front,
) -> None:
    # The verifier answers a public route with the three headers empty: nginx then sends none,
    # Caddy sends them empty; either way never the client's values.
    for test_id, key in (("public-no-key", None), ("public-with-key", "gw_not_looked_at")):
        front.recorder.reset()
        headers = {**FORGED, **FORGED_UNDERSCORED, TEST_ID: test_id}
        answer = await front.through_proxy("GET", "/public/status", key=key, headers=headers)
        assert answer.from_upstream, (answer.status, answer.raw_headers, answer.body[:300])
        got = await front.upstream_got_only(test_id)
        assert got.target == "/public/status"
        for name in IDENTITY:
            assert values(got, name) in ([], [""]), (name, got.headers)


# --- refused: the verifier's answer reaches the client, nothing reaches the upstream ------------------------


@dataclass(frozen=True)
class Refusal:
    method: str
    target: str
    key: str  # "none", "unknown", "disabled" or "reader" (a key without the admin scope)
    status: int
    code: str


REFUSALS = [
    Refusal("GET", "/api/orders", "none", 401, "missing_key"),
    Refusal("GET", "/api/orders", "unknown", 401, "key_not_found"),
    Refusal("GET", "/api/orders", "disabled", 403, "key_disabled"),
    Refusal("GET", "/admin/users", "reader", 403, "insufficient_permissions"),
    Refusal("GET", "/nowhere/at/all", "reader", 404, "route_not_found"),
    Refusal("POST", "/readonly/items", "reader", 405, "method_not_allowed"),
    Refusal("GET", "/api%2Forders", "reader", 400, "invalid_request"),
]


@parametrize_proxies
async def test_each_refusal_reaches_the_client_as_the_verifier_answered_it_and_nothing_reaches_the_upstream(
    front: Front,
) -> None:
    gw = front.gateway
    reader = await gw.create_key(name="reader", owner="acme", scopes=["reports:read"])
    disabled = await gw.create_key(name="gone", owner="acme")
    async with await gw.admin_call("POST", f"/v1/keys/{disabled['id']}/disable", token="developer", json={}) as r:
        assert r.status == 200, await r.text()
    keys: dict[str, str | None] = {
        "none": None,
        "unknown": "gw_" + "A" * 43,
        "disabled": disabled["key"],
        "reader": reader["key"],
    }

    for case in REFUSALS:
        request_id = front.request_id()
        key = keys[case.key]
        got = await front.through_proxy(
            case.method, case.target, key=key, headers={"X-Request-Id": request_id, TEST_ID: case.code}
        )
        direct = await front.asked_directly(case.method, case.target, key=key, request_id=request_id)
        assert direct.status == case.status and json.loads(direct.body)["error"]["code"] == case.code, (
            case,
            direct.body,
        )

        assert got.status == case.status, (case, got.status, got.raw_headers, got.body[:300])
        body = error_of(got)
        assert body["error"]["code"] == case.code, (case, body)
        assert body["error"]["status"] == case.status
        assert body["meta"] == {"requestId": request_id}
        assert got.body == direct.body, (case, got.body, direct.body)  # byte for byte
        assert got.body == direct.headers["X-Gateway-Error-Body"].encode()
        assert "X-Gateway-Error-Body" not in got.headers  # nginx builds its answer, Caddy drops it
        assert got.headers.get("X-Request-Id") == request_id
        if case.status == 401:
            assert got.headers.get("WWW-Authenticate", "").startswith("Bearer "), got.raw_headers
            assert got.headers["WWW-Authenticate"] == direct.headers["WWW-Authenticate"]
        else:
            assert "WWW-Authenticate" not in got.headers
        if case.status == 405:
            assert got.headers.get("Allow") == direct.headers["Allow"] == "GET", got.raw_headers

    await front.nothing_reached_the_upstream()


@parametrize_proxies
async def test_a_clients_own_forwarded_and_original_headers_do_not_change_what_the_verifier_decides(
    front: Front,
) -> None:
    # Both proxies overwrite X-Forwarded-Method/-Uri for the verifier; nginx sets X-Original-*, Caddy
    # deletes a client's. Were a client's copy to arrive, the verifier would decide on `/api/...`.
    reader = await front.gateway.create_key(name="reader", owner="acme", scopes=["reports:read"])
    spoof = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/orders"}
    spoof |= {"X-Original-Method": "GET", "X-Original-URI": "/api/orders", TEST_ID: "spoof"}
    for method, target in (("GET", "/admin/users"), ("DELETE", "/readonly/items")):
        request_id = front.request_id()
        got = await front.through_proxy(
            method, target, key=reader["key"], headers={**spoof, "X-Request-Id": request_id}
        )
        direct = await front.asked_directly(method, target, key=reader["key"], request_id=request_id)
        assert (got.status, got.body) == (direct.status, direct.body), (target, got.status, got.body[:300])
        assert error_of(got)["error"]["code"] in ("insufficient_permissions", "method_not_allowed")
    await front.nothing_reached_the_upstream()


# --- a disable: the very next request through the proxy is refused ------------------------------------------


@parametrize_proxies
async def test_the_first_request_through_the_proxy_after_a_disable_is_refused(front: Front) -> None:
    gw = front.gateway
    created = await gw.create_key(name="soon-gone", owner="acme")
    for n in range(2):  # the first fills the verifier's cache, the second is answered from it
        warm = await front.through_proxy("GET", "/api/orders", key=created["key"], headers={TEST_ID: f"warm-{n}"})
        assert warm.from_upstream, (warm.status, warm.body[:300])
    await front.recorder.settle(quiet=0.02, most=1.0)
    assert [r.test_id for r in front.recorder.requests] == ["warm-0", "warm-1"]
    front.recorder.reset()

    async with await gw.admin_call("POST", f"/v1/keys/{created['id']}/disable", token="developer", json={}) as r:
        answered = await r.json()
        assert r.status == 200, answered
    assert answered["enabled"] is False

    request_id = front.request_id()
    refused = await front.through_proxy(
        "GET", "/api/orders", key=created["key"], headers={"X-Request-Id": request_id, TEST_ID: "after"}
    )
    assert refused.status == 403, (refused.status, refused.body[:300])
    assert error_of(refused)["error"]["code"] == "key_disabled"
    assert error_of(refused)["meta"] == {"requestId": request_id}
    await front.nothing_reached_the_upstream()


# --- path tricks: refused as the proxy mode refuses them, or refused outright ---------------------------
#
# The proxy mode forwards the path it normalised, so it may decide `/api/../admin` as `/admin`. In
# verify mode nginx and Caddy forward the client's target as sent, and an upstream may read
# `/admin/../api` or `/admin//../api` otherwise than the gateway would (aiohttp's router does not
# resolve dot segments; RFC 3986 5.2.4 reads `/admin//../x` as `/admin/x`): a target with a `.`, `..`
# or empty segment is refused 400 there, whatever route it would normalise into.


# (target, the proxy mode's status, the verify mode's status): the key has no `admin` scope; `/api` is open to it.
PATH_TRICKS = [
    ("/api/../admin/users", 403, 400),
    ("/api/%2e%2e/admin/users", 403, 400),
    ("/api/%2E%2E/admin/users", 403, 400),
    ("/api/./../admin/users", 403, 400),
    ("//admin/users", 403, 400),
    ("/admin/../api/users", 200, 400),  # out of a scoped route: proxy mode forwards /api/users itself
    ("/admin/%2e%2e/api/users", 200, 400),
    ("/admin//../api/users", 200, 400),
    ("//api/users", 200, 400),
    ("/api/./users", 200, 400),
    ("/api//users", 200, 400),
    ("/api/v1/../users", 200, 400),
    ("/api%2Fusers", 400, 400),
    ("/api%2fusers", 400, 400),
    ("/api/x%2F..%2F..%2Fadmin", 400, 400),
    ("/api%5Cusers", 400, 400),
    ("/api/%00", 400, 400),
]
# nginx answers these 400 itself, before it asks the verifier.
REFUSED_BY_THE_PROXY_ITSELF = {("nginx", "/api/%00")}


@parametrize_proxies
async def test_path_tricks_are_refused_and_never_reach_the_upstream(front: Front) -> None:
    reader = await front.gateway.create_key(name="reader", owner="acme", scopes=["reports:read"])
    for target, proxy_status, verify_status in PATH_TRICKS:
        proxy_mode = await front.through_gateway_proxy("GET", target, key=reader["key"])
        assert proxy_mode.status == proxy_status, (target, proxy_mode.status, proxy_mode.body[:300])
        await front.recorder.settle(quiet=0.02, most=1.0)
        front.recorder.reset()  # what the proxy mode forwarded is not the question

        got = await front.through_proxy("GET", target, key=reader["key"], headers={TEST_ID: target})
        assert got.status == verify_status, (target, got.status, got.raw_headers, got.body[:300])
        if (front.name, target) in REFUSED_BY_THE_PROXY_ITSELF:
            assert got.headers.get("Content-Type") == "text/html", got.raw_headers  # nginx's own error page
        elif proxy_status == verify_status:
            assert error_of(got)["error"]["code"] == error_of(proxy_mode)["error"]["code"], target
        else:
            assert error_of(got)["error"]["code"] == "invalid_request", target
        await front.nothing_reached_the_upstream()


# --- the verifier down: fail closed ------------------------------------------------------------------------


@parametrize_proxies
async def test_a_verifier_that_went_down_fails_closed(front: Front) -> None:
    created = await front.gateway.create_key(name="k", owner="acme")
    warm = await front.through_proxy("GET", "/api/orders", key=created["key"], headers={TEST_ID: "warm"})
    assert warm.from_upstream, (warm.status, warm.body[:300])  # and the proxy keeps a connection to the verifier
    await front.recorder.settle(quiet=0.02, most=1.0)
    front.recorder.reset()

    assert front.gateway.verify is not None
    await front.gateway.verify.close()  # the verify listener stops; the proxy and admin listeners stay
    for n in range(2):
        got = await front.through_proxy("GET", "/api/orders", key=created["key"], headers={TEST_ID: f"down-{n}"})
        assert 500 <= got.status < 600, (got.status, got.raw_headers, got.body[:300])
        if front.name == "nginx":  # the shipped config's own answer; Caddy's is a bare 502
            assert got.status == 503 and error_of(got)["error"]["code"] == "auth_unavailable", got.body
        else:
            assert got.status == 502, got.status
    await front.nothing_reached_the_upstream()


@parametrize_proxies
async def test_a_proxy_pointed_at_a_dead_port_fails_closed(
    front: Front, tmp_path: Path, recorder: RecordingUpstream
) -> None:
    created = await front.gateway.create_key(name="k", owner="acme")
    with running(front.name, tmp_path / "dead", f"http://127.0.0.1:{free_port()}", recorder.url) as url:
        got = await ask(int(url.rsplit(":", 1)[1]), "GET", "/api/orders", key=created["key"])
    assert 500 <= got.status < 600, (got.status, got.raw_headers, got.body[:300])
    await front.nothing_reached_the_upstream()


# --- the configurations tested are the ones the docs ship --------------------------------------------------


def test_the_nginx_and_caddy_configurations_in_the_docs_are_the_ones_these_tests_run() -> None:
    doc = (ROOT / "docs" / "verify-proxies.md").read_text()
    blocks: dict[str, list[str]] = {}
    for language, text in re.findall(r"```(\w+)\n(.*?)```", doc, re.S):
        blocks.setdefault(language, []).append(text)
    assert blocks["nginx"] == [site_nginx("gateway-verify:8082", "upstream:9000", "80")]
    assert blocks["caddyfile"] == ["api.example.com {\n" + site_caddy("gateway-verify:8082", "upstream:9000") + "}\n"]
