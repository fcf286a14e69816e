"""Rate limits and credits on one or two in-process replicas against a real redis-server (spec 12).

Every gateway here is a real replica (its own proxy and admin listeners), Redis is a real
redis-server, and the upstream is a small aiohttp app that counts what it received: a test checks
what the other side got, not what the gateway says it did. Multi-process tests are in
tests/test_ratelimit_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from gateway import config as config_mod
from gateway.admin import bodies
from gateway.cli import keys as operator_cli
from gateway.ratelimit.limiter import IDLE_RETURN, LEASE_SHARE, SWEEP_EVERY
from gateway.ratelimit.policy import parse_spec, refusal_headers
from tests.conftest import Gateway, RedisProcess, free_port
from tests.test_cli import on, token  # noqa: F401 - `token` is a fixture
from tests.test_verify import ask, error_of, verify_gateway

Start = Callable[..., Awaitable[Gateway]]


class Counter:
    """The upstream: answers 200 and counts each request it received."""

    def __init__(self) -> None:
        self.received = 0

    def app(self) -> web.Application:
        async def handler(request: web.Request) -> web.Response:
            self.received += 1
            return web.json_response({"upstream": "counter"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        return app


@pytest.fixture
async def counter() -> AsyncIterator[tuple[Counter, str]]:
    c = Counter()
    server = TestServer(c.app(), host="127.0.0.1")
    await server.start_server()
    yield c, str(server.make_url("")).rstrip("/")
    await server.close()


def routes(upstream: str, **api: Any) -> list[dict[str, Any]]:
    return [{"name": "api", "path_prefix": "/api", "upstream": upstream, **api}]


async def status_of(gw: Gateway, key: str) -> tuple[int, str | None, dict[str, str]]:
    async with await gw.call("GET", "/api/x", key=key) as r:
        body = await r.json()
        code = body.get("error", {}).get("code") if r.status != 200 else None
        return r.status, code, dict(r.headers)


async def patch(gw: Gateway, key_id: str, body: dict[str, Any]) -> dict[str, Any]:
    async with await gw.admin_call("PATCH", f"/v1/keys/{key_id}", token="developer", json=body) as r:
        data: dict[str, Any] = await r.json()
        assert r.status == 200, data
        return data


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def window_start(redis: Redis, window_seconds: int, within: float = 0.3) -> int:
    """Wait until Redis's clock is in the first `within` of a window; its index."""
    w = window_seconds * 1000
    while True:
        now = await redis_ms(redis)
        if now % w < w * within:
            return now // w
        await asyncio.sleep((w - now % w) / 1000 + 0.002)


def until_clear_of_window_end(window_seconds: int, margin: float) -> float:
    """Seconds to sleep so that at least `margin` seconds of a window are left: 0, or past its end.

    Windows are aligned to Redis's clock (docs/ratelimits.md), and every redis-server of the suite
    runs on this host, so Redis's TIME is this host's wall clock. A test that counts requests in
    one window sleeps this long first, so its requests cannot straddle two windows (which would
    admit them)."""
    left = window_seconds - time.time() % window_seconds
    return 0.0 if left >= margin else left + 0.01


@pytest.fixture(autouse=True)
def clear_of_an_hour_end() -> None:
    """The tests below count in hour windows, each well within 30 s: none straddles two. (Before
    any gateway of the test starts: nothing in this process is serving yet.)"""
    time.sleep(until_clear_of_window_end(3600, 30))


async def counters(redis: Redis, prefix: str, key_id: str) -> dict[str, int]:
    """Each window counter of the key, by its scope (the window index left out)."""
    out: dict[str, int] = {}
    async for name in redis.scan_iter(match=f"{prefix}rl:{key_id}:*", count=1000):
        scope = name.decode().removeprefix(f"{prefix}rl:{key_id}:").rsplit(":", 2)[0]
        out[scope] = int(await redis.get(name) or 0)
    return out


def round_trips(gw: Gateway) -> int:
    assert gw.replica.limiter is not None
    return gw.replica.limiter.store.round_trips


# all or nothing, and a refusal consumes nothing -------------------------------------------------


async def test_two_limits_are_all_or_nothing_and_a_refusal_consumes_neither(
    gateway_factory: Start, counter: tuple[Counter, str], redis: Redis
) -> None:
    upstream, url = counter
    gw = await gateway_factory(routes=routes(url))
    prefix = gw.replica.config.redis.prefix
    created = await gw.create_key(
        ratelimits=[
            {"name": "small", "limit": 2, "window_seconds": 3600},
            {"name": "big", "limit": 5, "window_seconds": 3600},
        ]
    )
    key, key_id = created["key"], created["id"]
    answers = [await status_of(gw, key) for _ in range(6)]
    assert [a[0] for a in answers] == [200, 200, 429, 429, 429, 429]
    assert {a[1] for a in answers[2:]} == {"rate_limited"}
    assert answers[2][2]["RateLimit-Policy"] == '"small";q=2;w=3600'  # the limit that refused, only
    assert upstream.received == 2
    # The four refused requests took nothing from `big`, which had room for them.
    assert await counters(redis, prefix, key_id) == {"small": 2, "big": 2}

    await patch(gw, key_id, {"ratelimits": [{"name": "small", "limit": 100, "window_seconds": 3600},
                                            {"name": "big", "limit": 5, "window_seconds": 3600}]})  # fmt: skip
    answers = [await status_of(gw, key) for _ in range(5)]
    assert [a[0] for a in answers] == [200, 200, 200, 429, 429]
    assert answers[3][2]["RateLimit-Policy"] == '"big";q=5;w=3600'
    assert upstream.received == 5
    assert await counters(redis, prefix, key_id) == {"small": 5, "big": 5}


async def test_a_request_refused_by_its_limit_spends_no_credit_and_one_refused_for_credits_no_limit(
    gateway_factory: Start, counter: tuple[Counter, str], redis: Redis
) -> None:
    upstream, url = counter
    gw = await gateway_factory(routes=routes(url))
    prefix = gw.replica.config.redis.prefix
    created = await gw.create_key(
        ratelimits=[{"name": "minute", "limit": 2, "window_seconds": 3600}], credits={"remaining": 3}
    )
    key, key_id = created["key"], created["id"]
    assert created["credits"] == {"remaining": 3, "refill": None}
    assert [(await status_of(gw, key))[:2] for _ in range(4)] == [(200, None)] * 2 + [(429, "rate_limited")] * 2
    async with await gw.admin_call("GET", f"/v1/keys/{key_id}", token="viewer") as r:
        assert (await r.json())["credits"]["remaining"] == 1  # the two refusals spent nothing

    await patch(gw, key_id, {"ratelimits": [{"name": "minute", "limit": 10, "window_seconds": 3600}]})
    got = [(await status_of(gw, key)) for _ in range(3)]
    assert [g[:2] for g in got] == [(200, None), (429, "usage_exceeded"), (429, "usage_exceeded")]
    assert got[1][2]["Retry-After"] == "3600"  # no refill: an operator must add credits
    assert upstream.received == 3
    assert await counters(redis, prefix, key_id) == {"minute": 3}  # credit refusals counted nowhere

    data = await patch(gw, key_id, {"credits": {"add": 2}})
    assert data["credits"]["remaining"] == 2 and data["propagation"]["confirmed"] == 1
    assert [(await status_of(gw, key))[:2] for _ in range(3)] == [(200, None)] * 2 + [(429, "usage_exceeded")]
    assert upstream.received == 5


async def test_a_route_cost_and_default_limit_apply_to_each_key(
    gateway_factory: Start, counter: tuple[Counter, str]
) -> None:
    upstream, url = counter
    gw = await gateway_factory(
        routes=routes(url, cost=2, ratelimits=[{"name": "route-min", "limit": 3, "window_seconds": 3600}])
    )
    first = await gw.create_key(credits={"remaining": 5})
    second = await gw.create_key()  # no credits: the cost does not apply; the default limit does
    assert [(await status_of(gw, first["key"]))[:2] for _ in range(3)] == [(200, None)] * 2 + [(429, "usage_exceeded")]
    async with await gw.admin_call("GET", f"/v1/keys/{first['id']}", token="viewer") as r:
        assert (await r.json())["credits"]["remaining"] == 1
    got = [await status_of(gw, second["key"]) for _ in range(4)]
    assert [g[:2] for g in got] == [(200, None)] * 3 + [(429, "rate_limited")]  # its own count, not first's
    assert got[3][2]["RateLimit-Policy"] == '"route-min";q=3;w=3600'
    assert upstream.received == 5
    # A key's own limit of the same name replaces the route's default.
    third = await gw.create_key(ratelimits=[{"name": "route-min", "limit": 1, "window_seconds": 3600}])
    assert [(await status_of(gw, third["key"]))[:2] for _ in range(2)] == [(200, None), (429, "rate_limited")]


# the answer at the boundary ---------------------------------------------------------------------


@pytest.mark.slow
async def test_headers_at_the_boundary_and_the_next_window_admits_again(
    gateway_factory: Start, counter: tuple[Counter, str], redis: Redis
) -> None:
    upstream, url = counter
    gw = await gateway_factory(routes=routes(url))
    window = 3
    created = await gw.create_key(ratelimits=[{"name": "burst", "limit": 3, "window_seconds": window}])
    key = created["key"]
    while True:
        index = await window_start(redis, window)
        answers = [await status_of(gw, key) for _ in range(4)]
        after = await redis_ms(redis)
        if after // (window * 1000) == index:  # all four within one window (else a slow machine: again)
            break
        await asyncio.sleep(window)
    assert [a[:2] for a in answers] == [(200, None)] * 3 + [(429, "rate_limited")]
    headers = answers[3][2]
    left_ms = (index + 1) * window * 1000 - after  # the window's end, as seen just after the refusal
    t = int(headers["Retry-After"])
    assert math.ceil(left_ms / 1000) <= t <= math.ceil(left_ms / 1000) + 1  # never short of the reset
    assert headers["RateLimit-Policy"] == f'"burst";q=3;w={window}'
    assert headers["RateLimit"] == f'"burst";r=0;t={t}'
    assert headers["Content-Type"] == "application/json"
    # Wait out the window on Redis's clock: the next request passes, the limit counts afresh.
    await asyncio.sleep(((index + 1) * window * 1000 - await redis_ms(redis)) / 1000 + 0.01)
    assert await redis_ms(redis) >= (index + 1) * window * 1000
    assert [(await status_of(gw, key))[:2] for _ in range(3)] == [(200, None)] * 3
    assert upstream.received == 6


# accuracy with leased slices ---------------------------------------------------------------------


@pytest.mark.slow
async def test_two_replicas_sharing_a_limit_with_slices_admit_at_most_the_limit_and_refuse_late(
    gateway_factory: Start, counter: tuple[Counter, str], redis: Redis
) -> None:
    upstream, url = counter
    prefix = "rlshare" + os.urandom(3).hex() + ":"
    a = await gateway_factory(routes=routes(url), **{"redis.prefix": prefix})
    b = await gateway_factory(routes=routes(url), **{"redis.prefix": prefix})
    limit = 1000
    created = await a.create_key(ratelimits=[{"name": "hour", "limit": limit, "window_seconds": 3600}])
    key = created["key"]
    trips_before = round_trips(a) + round_trips(b)
    admitted_before_first_refusal: int | None = None
    admitted = 0

    async def one(gw: Gateway) -> int:
        return (await status_of(gw, key))[0]

    for _ in range(70):  # 1,400 requests, 20 at a time, both replicas
        statuses = await asyncio.gather(*(one(a if i % 2 else b) for i in range(20)))
        if admitted_before_first_refusal is None and 429 in statuses:
            admitted_before_first_refusal = admitted
        admitted += statuses.count(200)
    assert set(statuses) == {429}
    assert upstream.received == admitted
    assert limit * (1 - LEASE_SHARE) <= admitted <= limit
    assert admitted_before_first_refusal is not None
    assert admitted_before_first_refusal >= limit * 0.99 - 20  # the batch that saw it may hold 20 admitted
    trips = round_trips(a) + round_trips(b) - trips_before
    assert trips < admitted, "slices should spare a Redis round trip for most admitted requests"


# Redis gone or hung: on_store_error ----------------------------------------------------------------


async def _store_error_case(gateway_factory: Start, counter: tuple[Counter, str], tmp_path: Path, fault: str) -> None:
    upstream, url = counter
    own = RedisProcess(free_port(), tmp_path / "redis")
    own.start()
    try:
        gw = await gateway_factory(redis_url=own.url, routes=routes(url), **{"cache.serve_stale_seconds": 60})
        deny = await gw.create_key(ratelimits=[{"name": "m", "limit": 10, "window_seconds": 60}])
        allow = await gw.create_key(
            ratelimits=[{"name": "m", "limit": 10, "window_seconds": 60, "on_store_error": "allow"}]
        )
        paid = await gw.create_key(
            ratelimits=[{"name": "m", "limit": 10, "window_seconds": 60, "on_store_error": "allow"}],
            credits={"remaining": 10},
        )
        for created in (deny, allow, paid):
            assert (await status_of(gw, created["key"]))[0] == 200  # cached, and a request counted
        assert upstream.received == 3
        assert own.proc is not None
        if fault == "killed":
            own.kill()
        else:
            os.kill(own.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        got = {name: await status_of(gw, c["key"]) for name, c in (("deny", deny), ("allow", allow), ("paid", paid))}
        assert time.monotonic() - started < 12  # bounded: a hung Redis costs a request seconds, not forever
        assert got["deny"][:2] == (503, "ratelimit_unavailable") and got["deny"][2]["Retry-After"] == "1"
        assert got["allow"][:2] == (200, None)
        assert got["paid"][:2] == (503, "ratelimit_unavailable")  # credits never pass unchecked
        assert upstream.received == 4
        async with await gw.admin_call("GET", "/metrics", token=None) as r:
            text = await r.text()
        assert 'gateway_ratelimit_store_error_decisions_total{decision="denied",route="api"} 2.0' in text
        assert 'gateway_ratelimit_store_error_decisions_total{decision="allowed",route="api"} 1.0' in text
    finally:
        if own.proc is not None and own.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(own.proc.pid, signal.SIGCONT)
        own.kill()


@pytest.mark.slow
async def test_on_store_error_deny_and_allow_with_redis_killed(
    gateway_factory: Start, counter: tuple[Counter, str], tmp_path: Path
) -> None:
    await _store_error_case(gateway_factory, counter, tmp_path, "killed")


@pytest.mark.slow
async def test_on_store_error_deny_and_allow_with_redis_hung(
    gateway_factory: Start, counter: tuple[Counter, str], tmp_path: Path
) -> None:
    await _store_error_case(gateway_factory, counter, tmp_path, "stopped")


# input ------------------------------------------------------------------------------------------------


async def test_patch_refuses_bad_input_and_changes_nothing(gw: Gateway) -> None:
    created = await gw.create_key(name="before")
    for body, field in (
        ({"ratelimits": [{"name": "x", "limit": 0, "window_seconds": 60}]}, "limit"),
        ({"ratelimits": [{"name": "x", "limit": 5, "window_seconds": 86401}]}, "window_seconds"),
        (
            {"ratelimits": [{"name": "x", "limit": 5, "window_seconds": 60, "on_store_error": "maybe"}]},
            "on_store_error",
        ),
        ({"ratelimits": [{"name": "a b", "limit": 5, "window_seconds": 60}]}, "name"),
        ({"ratelimits": [{"name": "x", "limit": 5, "window_seconds": 60}] * 2}, "duplicate"),
        ({"credits": {"remaining": -1}}, "credits.remaining"),
        ({"credits": {"remaining": 1, "add": 1}}, "not both"),
        ({"credits": {}}, "give remaining, add or refill"),
        ({"credits": {"refill": {"amount": 5}}}, "credits.refill"),
        ({"key": "x"}, "unknown field"),
        ({}, "at least one field"),
    ):
        async with await gw.admin_call("PATCH", f"/v1/keys/{created['id']}", token="developer", json=body) as r:
            data = await r.json()
            assert r.status == 400, (body, data)
            assert data["error"]["code"] == "invalid_request" and field in data["error"]["detail"], data
    async with await gw.admin_call("PATCH", f"/v1/keys/{created['id']}", token="viewer", json={"name": "x"}) as r:
        assert r.status == 403
    async with await gw.admin_call("GET", f"/v1/keys/{created['id']}", token="viewer") as r:
        shown = await r.json()
    assert shown["name"] == "before" and shown["ratelimits"] == [] and shown["credits"] is None


async def test_patch_changes_fields_and_is_audited(gw: Gateway) -> None:
    created = await gw.create_key(name="before", scopes=["a"])
    data = await patch(
        gw,
        created["id"],
        {
            "name": "after",
            "scopes": ["b", "c"],
            "meta": {"plan": "pro"},
            "ratelimits": [{"name": "m", "limit": 100, "window_seconds": 60}],
            "credits": {"remaining": 50, "refill": {"amount": 50, "interval": 86400}},
        },
    )
    assert data["name"] == "after" and data["scopes"] == ["b", "c"] and data["meta"] == {"plan": "pro"}
    assert data["ratelimits"] == [{"name": "m", "limit": 100, "window_seconds": 60, "on_store_error": "deny"}]
    assert data["credits"] == {"remaining": 50, "refill": {"amount": 50, "interval": 86400}}
    assert data["propagation"]["replicas"] == 1
    data = await patch(gw, created["id"], {"credits": None, "ratelimits": None})
    assert data["credits"] is None and data["ratelimits"] == []
    async with await gw.admin_call("GET", f"/v1/audit?key_id={created['id']}", token="admin") as r:
        entries = (await r.json())["entries"]
    assert [e["action"] for e in entries] == ["update", "update", "create"]
    assert entries[1]["detail"] == {
        "fields": ["credits", "meta", "name", "ratelimits", "scopes"],
        "credits_set": 50,
    }


def test_route_limits_are_validated_with_every_problem_at_once() -> None:
    raw = """
routes:
  - name: api
    path_prefix: /api
    upstream: http://127.0.0.1:9
    cost: -1
    ratelimits: [{name: m, limit: 0, window_seconds: 60}]
  - name: open
    path_prefix: /open
    upstream: http://127.0.0.1:9
    auth: none
    ratelimits: [{name: m, limit: 5, window_seconds: 60}]
"""
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.parse(raw, source="gw.yaml")
    text = str(caught.value)
    assert "routes[0].ratelimits: [{'name': 'm', 'limit': 0, 'window_seconds': 60}]: [0] limit: must be" in text
    assert "routes[0].cost: -1: must be between 0 and 1e+06" in text
    assert "routes[1].ratelimits: (value not shown): a public route (auth: none) has no key to limit" in text
    good = config_mod.parse(
        raw.replace("cost: -1", "cost: 3").replace("limit: 0", "limit: 7").split("  - name: open")[0]
    )
    assert good.routes[0].cost == 3
    assert good.routes[0].ratelimits == (config_mod.RateLimit("m", 7, 60, "deny"),)


def test_limit_specs_and_headers() -> None:
    assert parse_spec("100/60s") == config_mod.RateLimit("default", 100, 60)
    assert parse_spec("1000/1h", "hourly") == config_mod.RateLimit("hourly", 1000, 3600)
    assert parse_spec("5/1d").window_seconds == 86400
    for bad in ("100", "0/60s", "10/0s", "10/2d", "ten/60s", "10/60x"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    headers = refusal_headers([(parse_spec("10/60s", "a"), 0, 1), (parse_spec("5/1h", "b"), 0, 59_001)])
    assert headers == {
        "Retry-After": "60",
        "RateLimit-Policy": '"a";q=10;w=60, "b";q=5;w=3600',
        "RateLimit": '"a";r=0;t=1, "b";r=0;t=60',
    }
    with pytest.raises(bodies.BadInput):
        bodies.credits({"remaining": True}, patch=False)


# the CLI ------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("token")  # GATEWAY_ADMIN_TOKEN holds the admin token
async def test_cli_keys_update_sets_limits_and_credits_in_force_on_the_next_request(
    gateway_factory: Start, counter: tuple[Counter, str], capsys: pytest.CaptureFixture[str]
) -> None:
    upstream, url = counter
    gw = await gateway_factory(routes=routes(url))
    created = await gw.create_key(name="cli")
    run = await on(gw, capsys, "keys", "update", created["id"], "--limit", "2/1h", "--credits", "1000", "--json")
    assert run.code == 0, run.err
    data = run.json()
    assert data["ratelimits"] == [{"name": "default", "limit": 2, "window_seconds": 3600, "on_store_error": "deny"}]
    assert data["credits"] == {"remaining": 1000, "refill": None} and data["propagation"]["confirmed"] == 1
    assert [(await status_of(gw, created["key"]))[:2] for _ in range(3)] == [(200, None)] * 2 + [(429, "rate_limited")]
    run = await on(gw, capsys, "keys", "update", created["id"], "--limit", "hourly=10/1h", "--limit", "daily=20/1d",
                   "--on-store-error", "allow", "--add-credits", "-998", "--refill", "50/1d")  # fmt: skip
    assert run.code == 0, run.err
    lines = dict(line.split(":", 1) for line in run.out.splitlines())
    assert lines["ratelimits"].strip() == (
        "hourly=10/3600s (allow on store error), daily=20/86400s (allow on store error)"
    )
    assert lines["credits"].strip() == "0 left, refilled to 50 every 86400 s"  # 1000 - 2 spent - 998
    assert lines["propagation"].strip().startswith("confirmed by 1/1")
    assert (await status_of(gw, created["key"]))[:2] == (429, "usage_exceeded")
    assert upstream.received == 2
    for argv, message in (
        (["--limit", "100"], "--limit: '100': a rate limit is LIMIT/WINDOW"),
        (["--limit", "5/2d"], "the window must be from 1 s to 1 day"),
        (["--refill", "x"], "--refill:"),
        (["--no-credits", "--credits", "5"], "--no-credits: not with"),
        ([], "nothing to change"),
    ):
        run = await on(gw, capsys, "keys", "update", created["id"], *argv)
        assert run.code == operator_cli.EXIT_USAGE, (argv, run.err)
        assert message in run.error_line, run.err


async def test_a_bulk_import_takes_limits_but_refuses_credits_per_line(gw: Gateway) -> None:
    limit = {"name": "m", "limit": 1, "window_seconds": 3600}
    key = "imported_" + os.urandom(12).hex()
    lines = [
        {"key": key, "ratelimits": [limit]},
        {"key": "imported_" + os.urandom(12).hex(), "credits": {"remaining": 5}},
    ]
    body = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    async with await gw.admin_call("POST", "/v1/keys/import", token="developer", data=body) as r:
        assert r.status == 200
        results = [orjson.loads(line) for line in (await r.read()).splitlines()]
    assert results[0]["result"] == "imported"
    assert results[1]["result"] == "rejected" and "credits: not in a bulk import" in results[1]["detail"]
    assert [(await status_of(gw, key))[:2] for _ in range(2)] == [(200, None), (429, "rate_limited")]


@pytest.mark.slow
async def test_a_replica_gives_back_an_idle_slice_and_the_window_counts_only_what_was_spent(
    gateway_factory: Start, counter: tuple[Counter, str], redis: Redis
) -> None:
    _, url = counter
    gw = await gateway_factory(routes=routes(url))
    prefix = gw.replica.config.redis.prefix
    limit = {"name": "h", "limit": 100_000, "window_seconds": 3600}
    idle = await gw.create_key(ratelimits=[limit])
    busy = await gw.create_key(ratelimits=[limit])
    assert (await status_of(gw, idle["key"]))[0] == 200
    leased = (await counters(redis, prefix, idle["id"]))["h"]
    # One replica live (plus one): a slice of up to 0.8% of 100,000 / 2 = 400 besides the request's own.
    assert 1 < leased <= 401
    await asyncio.sleep(IDLE_RETURN + SWEEP_EVERY)  # the slice idles past IDLE_RETURN
    assert (await status_of(gw, busy["key"]))[0] == 200  # a request's check sweeps idle slices
    deadline = time.monotonic() + 5
    while (await counters(redis, prefix, idle["id"]))["h"] != 1:
        assert time.monotonic() < deadline, "the idle slice was not given back"
        await asyncio.sleep(0.02)


async def test_the_verify_listener_checks_limits_and_credits_too(
    gateway_factory: Start, counter: tuple[Counter, str]
) -> None:
    _, url = counter
    gw = await verify_gateway(
        gateway_factory, url, routes=[{"name": "v-api", "path_prefix": "/api", "mode": "verify", "cost": 2}]
    )
    limited = await gw.create_key(ratelimits=[{"name": "m", "limit": 2, "window_seconds": 3600}])
    paid = await gw.create_key(credits={"remaining": 3})
    got = [await ask(gw, "GET", "/api/x", key=limited["key"]) for _ in range(3)]
    assert [g[0] for g in got] == [200, 200, 429]
    assert error_of(*got[2]) == "rate_limited"
    assert got[2][1]["RateLimit-Policy"] == '"m";q=2;w=3600' and got[2][1]["Retry-After"]
    got = [await ask(gw, "GET", "/api/x", key=paid["key"]) for _ in range(2)]
    assert [g[0] for g in got] == [200, 429] and error_of(*got[1]) == "usage_exceeded"
    async with await gw.admin_call("GET", f"/v1/keys/{paid['id']}", token="viewer") as r:
        assert (await r.json())["credits"]["remaining"] == 1  # cost 2: one question paid, one refused


@pytest.mark.slow
async def test_credits_refill_to_their_amount_each_interval(
    gateway_factory: Start, counter: tuple[Counter, str]
) -> None:
    upstream, url = counter
    gw = await gateway_factory(routes=routes(url))
    created = await gw.create_key(credits={"remaining": 1, "refill": {"amount": 2, "interval": 2}})
    assert created["credits"] == {"remaining": 1, "refill": {"amount": 2, "interval": 2}}
    key = created["key"]
    first = [await status_of(gw, key) for _ in range(2)]
    assert [f[:2] for f in first] == [(200, None), (429, "usage_exceeded")]
    wait = int(first[1][2]["Retry-After"])
    assert 1 <= wait <= 2  # the next refill, never short of it
    await asyncio.sleep(wait + 0.05)
    assert [(await status_of(gw, key))[:2] for _ in range(3)] == [(200, None)] * 2 + [(429, "usage_exceeded")]
    assert upstream.received == 3
