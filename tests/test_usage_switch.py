"""`usage.enabled` (spec 10): the switch that turns per-key usage counting off. Off, a replica builds
no counter and no flusher: requests are served, nothing is counted (not on the request path, not
on SIGTERM's last flush), and the admin API answers as it does without a usage store (the usage
endpoint: 404 "Usage is not counted here"; no `last_used_at` on the records). `make bench` runs a
second gateway with it off to measure what counting costs (docs/performance.md).

The config tests are pure; the others run a gateway in process and as a real `gateway serve`
process (env override `GATEWAY_USAGE_ENABLED=false`) against a real redis-server, each next to a
gateway with counting on, so a check that finds nothing counted could have found something."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from gateway import config as config_mod
from tests.conftest import AdminTokens, Gateway, RedisProcess
from tests.test_replicas import (
    START_TIMEOUT,
    EchoHandler,
    gateway_config,
    serving,
    start_gateway,
    stop_gateway,
    wait_ready,
)

ROUTES = "routes: [{name: api, path_prefix: /api, upstream: 'http://127.0.0.1:1'}]\n"
POLICY = "policies: [{name: leaked, rule: requests, above: 5, window: 10m}]\n"


# config ------------------------------------------------------------------------------------


def test_enabled_by_default_and_switched_off_in_the_file_or_the_environment() -> None:
    assert config_mod.parse(ROUTES).usage.enabled is True
    assert config_mod.parse(ROUTES + "usage: {enabled: false}\n").usage.enabled is False
    off = config_mod.parse(ROUTES + "usage: {enabled: true, flush_seconds: 2}\n",
                           environ={"GATEWAY_USAGE_ENABLED": "false"})  # fmt: skip
    assert off.usage == config_mod.UsageConfig(2.0, 100_000, 1_000, enabled=False)
    on = config_mod.parse(ROUTES + "usage: {enabled: false}\n", environ={"GATEWAY_USAGE_ENABLED": "true"})
    assert on.usage.enabled is True


def test_a_non_boolean_and_policies_without_counting_are_reported_with_their_paths() -> None:
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.parse(ROUTES + "usage: {enabled: sometimes, max_keys: 0}\n")
    problems = {p.path: p for p in caught.value.problems}
    assert set(problems) == {"usage.enabled", "usage.max_keys"}  # every problem at once
    assert problems["usage.enabled"].value == "sometimes" and "true or false" in problems["usage.enabled"].rule
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.parse(ROUTES + POLICY, environ={"GATEWAY_USAGE_ENABLED": "false"})
    (problem,) = caught.value.problems
    assert problem.path == "policies" and "usage.enabled" in problem.rule
    assert config_mod.parse(ROUTES + POLICY).policies  # counting on: the same policies are fine


# one replica, in process -----------------------------------------------------------------


async def usage_keys(client: AsyncRedis, prefix: str) -> list[bytes]:
    return [k async for k in client.scan_iter(match=prefix + "u:*", count=1000)]


async def test_off_serves_counts_nothing_and_the_usage_endpoint_says_so(
    gateway_factory: Callable[..., Any], redis_server: RedisProcess
) -> None:
    on: Gateway = await gateway_factory(**{"usage.flush_seconds": 300})
    off: Gateway = await gateway_factory(**{"usage.flush_seconds": 300, "usage.enabled": False})
    assert off.replica.usage is None and off.replica.proxy.usage is None and off.replica.api.usage is None
    counted = {}
    for gw in (on, off):
        key = await gw.create_key(name="switch")
        for _ in range(5):
            async with await gw.call("GET", "/api/x", key=key["key"]) as r:
                assert r.status == 200
        counted[gw is on] = key
    assert on.replica.usage is not None
    assert await on.replica.usage.flush() == 1  # the control: counting on writes what it counted
    client = AsyncRedis.from_url(redis_server.url)
    try:
        assert await usage_keys(client, on.replica.config.redis.prefix)
        assert await usage_keys(client, off.replica.config.redis.prefix) == []
    finally:
        await client.aclose()
    async with await on.admin_call("GET", f"/v1/keys/{counted[True]['id']}/usage", token="viewer") as r:
        assert r.status == 200 and (await r.json())["totals"]["requests"] == 5
    async with await off.admin_call("GET", f"/v1/keys/{counted[False]['id']}/usage", token="viewer") as r:
        body = await r.json()
    assert r.status == 404 and body["error"]["code"] == "not_found"
    assert body["error"]["detail"] == "Usage is not counted here"
    async with await off.admin_call("GET", f"/v1/keys/{counted[False]['id']}", token="viewer") as r:
        shown = await r.json()
    assert r.status == 200 and "last_used_at" not in shown  # no usage store: the record as it is
    async with await off.admin_call("GET", "/v1/keys?unused_since=30d&limit=100", token="viewer") as r:
        body = await r.json()
    # The filter needs the usage figures: without them it is refused, never "every key is unused".
    assert r.status == 404 and body["error"]["detail"] == "Usage is not counted here: unused_since needs it"


# real gateway processes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with serving(EchoHandler) as url:
        yield url


@pytest.mark.slow
def test_a_gateway_process_with_counting_off_writes_no_usage_even_on_sigterm(
    tmp_path: Path, upstream_url: str, admin_tokens: AdminTokens, redis_server: RedisProcess
) -> None:
    """The file says enabled: true, the environment says false: the environment wins (as for every
    override). A SIGTERM makes a counting replica write what it held; this one has nothing to write."""
    nodes = {}
    try:
        for name, env in (("on", {}), ("off", {"GATEWAY_USAGE_ENABLED": "false"})):
            raw = gateway_config(upstream_url, admin_tokens, redis_server.url, f"sw{secrets.token_hex(4)}:")
            raw["usage"] = {"enabled": True, "flush_seconds": 300}
            nodes[name] = (start_gateway(tmp_path, name, raw, admin_tokens, env=env), raw["redis"]["prefix"])
        for node, _ in nodes.values():
            wait_ready(node, START_TIMEOUT)
        keys = {}
        for name, (node, _) in nodes.items():
            status, key = node.admin("POST", "/v1/keys", {"name": "switch"})
            assert status == 201, key
            keys[name] = key
            for _ in range(20):
                assert node.proxy(key["key"]) == (200, None)
        off = nodes["off"][0]
        status, body = off.admin("GET", f"/v1/keys/{keys['off']['id']}/usage", role="viewer")
        assert (status, body["error"]["detail"]) == (404, "Usage is not counted here")
        for node, _ in nodes.values():
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(timeout=30) == 0, node.output()
        client = redis.Redis.from_url(redis_server.url)
        try:
            on_prefix, off_prefix = nodes["on"][1], nodes["off"][1]
            assert list(client.scan_iter(match=on_prefix + "u:*", count=1000))  # the control: SIGTERM's last write
            assert client.hget(on_prefix + "u:last", keys["on"]["id"]) is not None
            assert list(client.scan_iter(match=off_prefix + "u:*", count=1000)) == []
            assert list(client.scan_iter(match=off_prefix + "k*", count=1000))  # the key table is there: same Redis
        finally:
            client.close()
    finally:
        for node, _ in nodes.values():
            stop_gateway(node)
