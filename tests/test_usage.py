"""Per-key usage (spec 10) in one process against a real redis-server: the counter's bounds, the
flush and what the admin API reads of it, the request path writing nothing to Redis, the
configuration of `usage:` and `policies:`, and a policy's report, dry run and exemption after a
re-enable. The three-process tests are in tests/test_usage_replicas.py."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from redis.asyncio import Redis

from gateway import config as config_mod
from gateway.usage.counter import Counter
from tests.conftest import Gateway, RedisProcess, migrations_over


def asker(remote: str | None, *, trusted: bool = False, xff: str | None = None) -> Any:
    headers: CIMultiDict[str] = CIMultiDict()
    if xff is not None:
        headers["X-Forwarded-For"] = xff
    return SimpleNamespace(remote=remote, trusted=trusted, headers=CIMultiDictProxy(headers))


# the counter, alone --------------------------------------------------------------------


def test_counter_counts_outcomes_last_use_and_addresses() -> None:
    c = Counter()
    c.count("key_a", "forwarded", asker("10.0.0.1"), "api")
    c.count("key_a", "forwarded", asker("10.0.0.2"), "api")
    c.count("key_a", "insufficient_permissions", asker("10.0.0.2"), "billing")
    c.count("key_b", "key_disabled", asker("10.0.0.3"), "api")
    (batch,) = c.take()
    a, b = batch.tallies["key_a"], batch.tallies["key_b"]
    assert a.outcomes == {"forwarded": 2, "insufficient_permissions": 1}
    assert a.addresses == {"10.0.0.1", "10.0.0.2"}
    assert (a.last_ip, a.last_route) == ("10.0.0.2", "billing")
    assert abs(a.last_at - time.time()) < 5
    assert b.outcomes == {"key_disabled": 1}
    assert batch.minute == int(time.time() // 60) or batch.minute == int(time.time() // 60) - 1
    assert c.take() == []  # taken: the counter starts afresh


def test_counter_bounds_keys_and_addresses_per_interval() -> None:
    c = Counter(max_keys=2, max_addresses=3)
    for i in range(5):
        c.count("key_a", "forwarded", asker(f"10.0.0.{i}"), "api")
    c.count("key_b", "forwarded", asker("10.0.1.1"), "api")
    c.count("key_c", "forwarded", asker("10.0.1.1"), "api")  # a third key: past max_keys
    c.count("key_a", "forwarded", asker("10.0.0.1"), "api")  # a key already counted goes on being counted
    assert (c.untracked, c.addresses_dropped) == (1, 2)
    (batch,) = c.take()
    assert set(batch.tallies) == {"key_a", "key_b"}
    assert batch.tallies["key_a"].outcomes == {"forwarded": 6}
    assert len(batch.tallies["key_a"].addresses) == 3
    c.count("key_c", "forwarded", asker("10.0.1.1"), "api")  # a new interval: room again
    assert set(c.take()[0].tallies) == {"key_c"}


def test_counter_keeps_each_minute_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_800_000_030.0]
    monkeypatch.setattr("gateway.usage.counter.time.time", lambda: now[0])
    c = Counter()
    c.count("key_a", "forwarded", asker("10.0.0.1"), "api")
    now[0] += 60
    c.count("key_a", "forwarded", asker("10.0.0.1"), "api")
    c.count("key_a", "forwarded", asker("10.0.0.1"), "api")
    first, second = c.take()
    assert (first.minute, second.minute) == (30_000_000, 30_000_001)
    assert (first.tallies["key_a"].outcomes, second.tallies["key_a"].outcomes) == ({"forwarded": 1}, {"forwarded": 2})


def test_counter_behind_a_trusted_proxy_takes_the_forwarded_client() -> None:
    import ipaddress

    c = Counter(trusted_proxies=(ipaddress.ip_network("10.9.0.0/16"),))
    c.count("key_a", "forwarded", asker("10.9.0.1", trusted=True, xff="6.6.6.6, 203.0.113.7, 10.9.0.5"), "api")
    c.count("key_a", "forwarded", asker("198.51.100.1", xff="6.6.6.6"), "api")  # untrusted: its header is not believed
    c.count("key_b", "forwarded", asker("10.9.0.1", trusted=True, xff="not-an-address\udcff"), "api")
    (batch,) = c.take()
    assert batch.tallies["key_a"].addresses == {"203.0.113.7", "198.51.100.1"}
    assert batch.tallies["key_b"].addresses == {"10.9.0.1"}  # not an address: the peer's


# flush and the admin API -------------------------------------------------------------


async def traffic(gw: Gateway, key: str, plan: dict[str, int]) -> None:
    """`plan`: path -> how many requests (sequential, on the session's keep-alive connections)."""
    for path, n in plan.items():
        for _ in range(n):
            async with await gw.call("GET", path, key=key) as r:
                await r.read()


async def usage(gw: Gateway, key_id: str, window: str = "1h", token: str = "viewer") -> tuple[int, Any]:
    async with await gw.admin_call("GET", f"/v1/keys/{key_id}/usage?window={window}", token=token) as r:
        return r.status, await r.json()


async def test_counts_reach_the_usage_api_after_a_flush(gateway_factory: Callable[..., Any]) -> None:
    gw: Gateway = await gateway_factory(**{"usage.flush_seconds": 300})
    key = await gw.create_key(name="u", owner="acme")
    other = await gw.create_key(name="v", owner="acme")
    await traffic(gw, key["key"], {"/api/a": 5, "/billing/x": 3})
    await traffic(gw, other["key"], {"/api/b": 2})
    status, before = await usage(gw, key["id"])
    assert status == 200 and before["totals"]["requests"] == 0  # nothing written yet: no write per request
    assert await gw.replica.usage.flush() == 2  # type: ignore[union-attr]
    status, body = await usage(gw, key["id"])
    assert status == 200, body
    assert body["totals"] == {"requests": 8, "outcomes": {"forwarded": 5, "insufficient_permissions": 3}}
    assert body["distinct_addresses"] == 1
    assert body["bucket_seconds"] == 60 and len(body["buckets"]) == 60
    assert sum(b["requests"] for b in body["buckets"]) == 8
    assert body["last_used_ip"] == "127.0.0.1" and body["last_used_route"] == "billing"
    for window, unit, count in (("24h", 3600, 24), ("30d", 86400, 30)):
        status, wide = await usage(gw, key["id"], window)
        assert (wide["bucket_seconds"], len(wide["buckets"])) == (unit, count)
        assert wide["totals"] == body["totals"] and wide["distinct_addresses"] == 1
    # The record shows its last use; a key never used shows null.
    unused = await gw.create_key(name="w", owner="acme")
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}", token="viewer") as r:
        shown = await r.json()
    assert shown["last_used_ip"] == "127.0.0.1" and shown["last_used_at"] is not None
    async with await gw.admin_call("GET", f"/v1/keys/{unused['id']}", token="viewer") as r:
        assert (await r.json())["last_used_at"] is None
    # unused_since: keys not used since then (never used included).
    async with await gw.admin_call("GET", "/v1/keys?unused_since=30d&limit=100", token="viewer") as r:
        listed = await r.json()
    assert [k["id"] for k in listed["keys"]] == [unused["id"]]
    async with await gw.admin_call("GET", "/v1/keys?limit=100", token="viewer") as r:
        every = {k["id"]: k for k in (await r.json())["keys"]}
    assert every[other["id"]]["last_used_ip"] == "127.0.0.1" and every[unused["id"]]["last_used_at"] is None
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    async with await gw.admin_call("GET", f"/v1/keys?unused_since={future}&limit=100", token="viewer") as r:
        assert len((await r.json())["keys"]) == 3


async def test_usage_api_checks_its_input(gw: Gateway) -> None:
    key = await gw.create_key(name="u")
    for query in ("window=2h", "window=1h&x=1"):
        async with await gw.admin_call("GET", f"/v1/keys/{key['id']}/usage?{query}", token="viewer") as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_request"
    async with await gw.admin_call("GET", "/v1/keys/key_00000000000000000000/usage", token="viewer") as r:
        assert r.status == 404
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}/usage", token=None) as r:
        assert r.status == 401
    async with await gw.admin_call("GET", "/v1/keys?unused_since=lately", token="viewer") as r:
        assert r.status == 400 and "unused_since" in (await r.json())["error"]["detail"]


class Monitor:
    """Every command Redis runs while it is open (MONITOR on a raw socket, in a thread), with the
    commands scripts run inside; `writes()` those that change data, as (command, first key)."""

    WRITES: ClassVar = {"set", "hset", "hincrby", "pfadd", "zadd", "expire", "expireat", "pexpire", "xadd", "del",
                        "hdel", "zrem", "zremrangebyscore", "incr", "incrby", "hmset", "setex", "publish"}  # fmt: skip

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.lines: list[bytes] = []
        self._buffer = b""
        assert self.sock.recv(5) == b"+OK\r\n"
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                self._buffer += chunk
                *lines, self._buffer = self._buffer.split(b"\r\n")
                self.lines.extend(lines)

    def close(self) -> list[tuple[str, str]]:
        time.sleep(0.2)  # what Redis ran before the close reaches us
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)
        commands = []
        for line in self.lines:
            args = re.findall(rb'"((?:[^"\\]|\\.)*)"', line)
            if args:
                commands.append((args[0].decode().lower(), args[1].decode(errors="replace") if len(args) > 1 else ""))
        return commands

    @classmethod
    def writes(cls, commands: list[tuple[str, str]], prefix: str) -> list[tuple[str, str]]:
        """The writes, but for the live-replica registry's heartbeat (a ZADD on P replicas, by time)
        and the lease probes (a PUBLISH on P probe:<replica>, coherence/subscriber.py)."""
        return [(c, k) for c, k in commands if c in cls.WRITES and (c, k) != ("zadd", prefix + "replicas")
                and not (c == "publish" and k.startswith(prefix + "probe:"))]  # fmt: skip


async def test_no_redis_write_on_the_request_path(
    gateway_factory: Callable[..., Any], redis_server: RedisProcess
) -> None:
    gw: Gateway = await gateway_factory(**{"usage.flush_seconds": 300})
    key = await gw.create_key(name="u")
    await traffic(gw, key["key"], {"/api/warm": 1})  # the key in cache
    await gw.replica.usage.flush()  # type: ignore[union-attr]
    await migrations_over(gw.replica)  # the startup layout moves write, once, outside any request
    monitor = Monitor(redis_server.port)
    await traffic(gw, key["key"], {"/api/burst": 200, "/billing/no": 50})
    during = monitor.close()
    prefix = gw.replica.config.redis.prefix
    assert Monitor.writes(during, prefix) == []  # 250 requests, not one write
    monitor = Monitor(redis_server.port)
    assert await gw.replica.usage.flush() == 1  # type: ignore[union-attr]
    flush = monitor.close()
    assert [c for c, _ in flush if c in ("eval", "evalsha")] == ["eval"]  # one script call writes the interval
    assert {k for c, k in Monitor.writes(flush, prefix)} >= {prefix + "u:seen", prefix + "u:last"}
    _, body = await usage(gw, key["id"])
    assert body["totals"]["requests"] == 251


async def test_verifier_decisions_are_counted(gateway_factory: Callable[..., Any]) -> None:
    gw: Gateway = await gateway_factory(
        **{
            "usage.flush_seconds": 300,
            "verify": {"listen": {"host": "127.0.0.1", "port": 0}},
            "trusted_proxies": ["127.0.0.0/8"],
            "routes": [
                {"name": "v", "path_prefix": "/v", "mode": "verify"},
                {"name": "api", "path_prefix": "/api", "upstream": "http://127.0.0.1:1"},
            ],
        }
    )
    key = await gw.create_key(name="u")
    for _ in range(3):
        headers = {"Authorization": f"Bearer {key['key']}", "X-Original-Method": "GET", "X-Original-URI": "/v/x",
                   "X-Forwarded-For": "198.51.100.9"}  # fmt: skip
        async with gw.session.get(gw.verify_url + "/", headers=headers) as r:
            assert r.status == 200, await r.text()
    await gw.replica.usage.flush()  # type: ignore[union-attr]
    _, body = await usage(gw, key["id"])
    assert body["totals"] == {"requests": 3, "outcomes": {"verified": 3}}
    assert body["last_used_ip"] == "198.51.100.9"


# policies --------------------------------------------------------------------------------


async def audit(gw: Gateway, key_id: str) -> list[dict[str, Any]]:
    async with await gw.admin_call("GET", f"/v1/audit?key_id={key_id}", token="admin") as r:
        assert r.status == 200
        entries: list[dict[str, Any]] = (await r.json())["entries"]
        return entries


def policy(**fields: Any) -> dict[str, Any]:
    return {"name": "busy", "rule": "requests", "above": 3, "window": "10m", **fields}


async def test_dry_run_reports_once_and_changes_nothing(gateway_factory: Callable[..., Any]) -> None:
    gw: Gateway = await gateway_factory(**{"usage.flush_seconds": 300, "policies": [policy(dry_run=True)]})
    key = await gw.create_key(name="u")
    await traffic(gw, key["key"], {"/api/a": 5})
    await gw.replica.usage.flush()  # type: ignore[union-attr]
    await traffic(gw, key["key"], {"/api/a": 5})  # still matching: reported once a window only
    await gw.replica.usage.flush()  # type: ignore[union-attr]
    async with await gw.call("GET", "/api/after", key=key["key"]) as r:
        assert r.status == 200  # nothing changed
    entries = await audit(gw, key["id"])
    matches = [e for e in entries if e["action"] == "policy_match"]
    assert [e["action"] for e in entries] == ["policy_match", "create"]
    (match,) = matches
    assert match["actor"] == "policy:busy"
    assert match["detail"]["value"] == 5 and match["detail"]["dry_run"] is True
    assert match["reason"] == "policy busy: 5 requests in 10m, above 3"
    metrics = gw.replica.metrics.render().decode()
    assert 'gateway_policy_matches_total{outcome="dry_run",policy="busy"} 1.0' in metrics


async def test_report_action_reports(gateway_factory: Callable[..., Any]) -> None:
    rule = policy(name="probe", rule="refusals", code="insufficient_permissions", above=2, action="report")
    gw: Gateway = await gateway_factory(**{"usage.flush_seconds": 300, "policies": [rule]})
    key = await gw.create_key(name="u")
    await traffic(gw, key["key"], {"/api/a": 10, "/billing/x": 2})
    await gw.replica.usage.flush()  # type: ignore[union-attr]
    assert [e["action"] for e in await audit(gw, key["id"])] == ["create"]  # 2 is not above 2
    await traffic(gw, key["key"], {"/billing/x": 1})
    await gw.replica.usage.flush()  # type: ignore[union-attr]
    (match, _create) = await audit(gw, key["id"])
    assert (match["action"], match["actor"], match["detail"]["value"]) == ("policy_match", "policy:probe", 3)
    assert match["detail"]["code"] == "insufficient_permissions"


async def test_disable_once_and_a_reenabled_key_is_exempt_for_the_window(
    gateway_factory: Callable[..., Any],
) -> None:
    prefix = f"pol{time.time_ns()}:"
    overrides = {"usage.flush_seconds": 300, "policies": [policy()], "redis.prefix": prefix}
    a: Gateway = await gateway_factory(**overrides)
    b: Gateway = await gateway_factory(**overrides)  # a second replica on the same key table
    key = await a.create_key(name="u")
    await traffic(a, key["key"], {"/api/a": 2})
    await traffic(b, key["key"], {"/api/b": 2})  # 4 in all: neither replica alone is above 3
    # Both replicas write and judge at the same moment: exactly one acts.
    await asyncio.gather(a.replica.usage.flush(), b.replica.usage.flush())  # type: ignore[union-attr]
    entries = await audit(a, key["id"])
    disables = [e for e in entries if e["action"] == "disable"]
    assert len(disables) == 1, entries
    assert disables[0]["actor"] == "policy:busy" and disables[0]["detail"]["value"] == 4
    assert disables[0]["reason"] == "policy busy: 4 requests in 10m, above 3"
    for gw in (a, b):  # refused on both: the disable went through the confirmed propagation
        async with await gw.call("GET", "/api/x", key=key["key"]) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "key_disabled"
    async with await a.admin_call("GET", f"/v1/keys/{key['id']}", token="viewer") as r:
        record = await r.json()
    assert (record["enabled"], record["disabled_by"]) == (False, "policy:busy")
    async with await a.admin_call("POST", f"/v1/keys/{key['id']}/enable", token="developer", json={}) as r:
        assert r.status == 200
    await traffic(a, key["key"], {"/api/a": 10})
    await asyncio.gather(a.replica.usage.flush(), b.replica.usage.flush())  # type: ignore[union-attr]
    async with await b.call("GET", "/api/x", key=key["key"]) as r:
        assert r.status == 200  # not disabled again in the same window
    assert [e["action"] for e in await audit(a, key["id"])] == ["enable", "disable", "create"]


async def test_policies_reload_with_the_routes(gateway_factory: Callable[..., Any]) -> None:
    gw: Gateway = await gateway_factory(**{"usage.flush_seconds": 300})
    assert gw.replica.usage is not None and gw.replica.usage.engine.policies == ()
    assert gw.replica.usage.interval == 300
    new = config_mod.parse(
        "routes: [{name: api, path_prefix: /api, upstream: 'http://127.0.0.1:1'}]\n"
        "policies: [{name: p, rule: requests, above: 1, window: 1m}]\n"
    )
    gw.replica.reload_routes(new)  # what SIGHUP does (runtime/serve.py)
    assert [p.name for p in gw.replica.usage.engine.policies] == ["p"]
    assert gw.replica.usage.interval == 5.0  # with policies, at most 5 s between flushes
    assert gw.replica.api.usage_flush_seconds == 5.0  # what the usage API says of the lag


# configuration ---------------------------------------------------------------------------

ROUTES = "routes: [{name: api, path_prefix: /api, upstream: 'http://127.0.0.1:1'}]\n"


def test_usage_and_policies_config_defaults_and_values() -> None:
    cfg = config_mod.parse(ROUTES)
    assert cfg.usage == config_mod.UsageConfig(10.0, 100_000, 1_000) and cfg.policies == ()
    cfg = config_mod.parse(
        ROUTES + "usage: {flush_seconds: 2, max_keys: 50, max_addresses: 20}\n"
        "policies:\n"
        "  - {name: leaked, rule: distinct_addresses, above: 19, window: 10m}\n"
        "  - {name: probing, rule: refusals, code: insufficient_permissions, above: 5, window: 2h,"
        " action: report, dry_run: true}\n",
        environ={"GATEWAY_USAGE_FLUSH_SECONDS": "3"},
    )
    assert cfg.usage == config_mod.UsageConfig(3.0, 50, 20)
    assert cfg.policies == (
        config_mod.Policy("leaked", "distinct_addresses", 19, 600),
        config_mod.Policy("probing", "refusals", 5, 7200, "report", True, "insufficient_permissions"),
    )


def test_policy_problems_are_reported_together_with_their_paths() -> None:
    with pytest.raises(config_mod.ConfigError) as exc:
        config_mod.parse(
            ROUTES + "usage: {flush_seconds: 0, max_addresses: 100}\n"
            "policies:\n"
            "  - {name: a, rule: distinct_addresses, above: 100, window: 10m}\n"
            "  - {name: a, rule: refusals, above: 1, window: 90m, action: nuke, secret: x}\n"
            "  - {name: c, rule: requests, code: key_disabled, above: 1, window: 1h}\n"
            "  - {name: d, rule: refusals, code: teapot, above: -1, window: 25h}\n"
            "  - just a string\n"
        )
    lines = str(exc.value).splitlines()
    assert lines == [
        "<config>: usage.flush_seconds: 0: must be between 0.05 and 300",
        "<config>: policies[0].above: 100: must be below usage.max_addresses (100): "
        "a replica remembers at most that many addresses per key per flush",
        "<config>: policies[1].secret: (value not shown): unknown key (allowed: above, action, code, dry_run, name, "
        "rule, window)",
        "<config>: policies[1].window: '90m': must be a window such as 10m or 1h: 1m to 60m, or 1h to 24h",
        "<config>: policies[1].action: 'nuke': must be one of: disable, report",
        "<config>: policies[1].name: 'a': duplicate policy name",
        "<config>: policies[1].code: (absent): is required with rule: refusals (the refusal code counted)",
        "<config>: policies[2].code: 'key_disabled': only rule: refusals counts a code",
        "<config>: policies[3].above: -1: must be between 0 and 1e+12",
        "<config>: policies[3].window: '25h': must be a window such as 10m or 1h: 1m to 60m, or 1h to 24h",
        "<config>: policies[3].code: 'teapot': must be one of: key_disabled, key_revoked, key_expired, "
        "insufficient_permissions, upstream_unavailable, upstream_timeout, rate_limited, usage_exceeded",
        "<config>: policies[4]: 'str': must be a mapping",
    ]


async def test_sighup_reload_applies_the_file_s_policies(gateway_factory: Callable[..., Any], tmp_path: Any) -> None:
    from gateway.runtime import serve

    gw: Gateway = await gateway_factory(**{"usage.flush_seconds": 300})
    path = tmp_path / "gateway.yaml"
    path.write_text(ROUTES + "policies: [{name: p, rule: requests, above: 1, window: 1m}]\n")
    assert serve.reload_routes(gw.replica, str(path))
    assert gw.replica.usage is not None and [p.name for p in gw.replica.usage.engine.policies] == ["p"]
    path.write_text(ROUTES + "policies: [{name: p, rule: requests, above: -5, window: 1m}]\n")
    assert not serve.reload_routes(gw.replica, str(path))  # rejected: the running policies stay
    assert [p.above for p in gw.replica.usage.engine.policies] == [1]


async def test_a_failed_write_keeps_its_counts_for_the_next(gateway_factory: Callable[..., Any]) -> None:
    from tests.conftest import free_port

    gw: Gateway = await gateway_factory(**{"usage.flush_seconds": 300})
    flusher = gw.replica.usage
    assert flusher is not None
    key = await gw.create_key(name="u")
    await traffic(gw, key["key"], {"/api/a": 4})
    working = flusher.store.redis
    dead = Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    flusher.store.redis = dead  # Redis unreachable for the usage write
    try:
        assert await flusher.flush() == 0
    finally:
        flusher.store.redis = working
        await dead.aclose()
    await traffic(gw, key["key"], {"/api/a": 3})
    assert await flusher.flush() == 2  # the kept batch and the new one (same minute or not, both written)
    _, body = await usage(gw, key["id"])
    assert body["totals"] == {"requests": 7, "outcomes": {"forwarded": 7}}
    metrics = gw.replica.metrics.render().decode()
    assert 'gateway_usage_flushes_total{outcome="failed"} 1.0' in metrics
