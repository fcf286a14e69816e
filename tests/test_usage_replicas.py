"""Per-key usage and policies across real gateway processes (spec 10): counts summed over the
replicas equal what their access logs record, the last use shows within flush_seconds + 1 s, a
replica's request path writes nothing to Redis and its SIGTERM writes what it held, and a policy
over three replicas trips once, within 10 s, on figures no single replica saw.

Every gateway is a `python -m gateway serve` process (tests/test_replicas.py starts them), Redis a
redis-server the session started, the upstream a threaded echo server; clients use several
loopback source addresses (127.0.0.x) for distinct client addresses."""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import AdminTokens, RedisProcess
from tests.test_replicas import (
    START_TIMEOUT,
    EchoHandler,
    Node,
    error_code,
    gateway_config,
    serving,
    start_gateway,
    stop_gateway,
    wait_ready,
    wait_until,
)
from tests.test_usage import Monitor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with serving(EchoHandler) as url:
        yield url


def config(upstream: str, tokens: AdminTokens, redis_url: str, prefix: str, **usage: Any) -> dict[str, Any]:
    raw = gateway_config(upstream, tokens, redis_url, prefix)
    raw["routes"].append({"name": "billing", "path_prefix": "/billing", "upstream": upstream, "scopes": ["b:r"]})
    raw["usage"] = {"flush_seconds": usage.pop("flush_seconds", 0.5)}
    if "policies" in usage:
        raw["policies"] = usage.pop("policies")
    return raw


@contextlib.contextmanager
def cluster(
    tmp_path: Path, upstream: str, tokens: AdminTokens, redis_url: str, count: int, **usage: Any
) -> Iterator[list[Node]]:
    prefix = f"use{secrets.token_hex(4)}:"
    nodes: list[Node] = []
    try:
        for i in range(count):
            nodes.append(start_gateway(tmp_path, f"r{i}", config(upstream, tokens, redis_url, prefix, **usage), tokens))
        for node in nodes:
            wait_ready(node, START_TIMEOUT)
        yield nodes
    finally:
        for node in nodes:
            stop_gateway(node)


def call(node: Node, key: str, path: str = "/api/x", source: str = "127.0.0.1") -> tuple[int, str | None]:
    """One request on a fresh connection from loopback address `source`."""
    port = int(node.proxy_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        return response.status, error_code(response.read())
    finally:
        conn.close()


def access_log(nodes: list[Node]) -> Counter[tuple[str, str]]:
    """(key id, code) -> requests, from every replica's access log."""
    seen: Counter[tuple[str, str]] = Counter()
    for node in nodes:
        for line in node.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == "request" and record.get("key_id"):
                seen[(record["key_id"], record["code"])] += 1
    return seen


def usage(node: Node, key_id: str, window: str = "1h") -> dict[str, Any]:
    status, body = node.admin("GET", f"/v1/keys/{key_id}/usage?window={window}", role="viewer")
    assert status == 200, body
    return body


def create(node: Node) -> dict[str, Any]:
    status, body = node.admin("POST", "/v1/keys", {"name": "usage-test", "owner": "acme"})
    assert status == 201, body
    return body


def test_counts_summed_over_replicas_equal_their_access_logs(
    tmp_path: Path, upstream_url: str, admin_tokens: AdminTokens, redis_server: RedisProcess
) -> None:
    with cluster(tmp_path, upstream_url, admin_tokens, redis_server.url, 3) as nodes:
        keys = [create(nodes[0]) for _ in range(3)]
        status, _ = nodes[0].admin("POST", f"/v1/keys/{keys[2]['id']}/disable", {"reason": "test"})
        assert status == 200
        plan = [("/api/x", 0, 11), ("/billing/x", 0, 3), ("/api/y", 1, 7), ("/api/z", 2, 4)]  # path, key, n per node

        def send(node: Node, n_node: int) -> None:
            for path, k, n in plan:
                for _ in range(n + n_node):  # a different number on each replica
                    call(node, keys[k]["key"], path)

        threads = [threading.Thread(target=send, args=(node, i)) for i, node in enumerate(nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        sent = 3 * sum(n for _, _, n in plan) + 3 * len(plan)
        expected = {k["id"]: Counter[str]() for k in keys}

        def logged() -> bool:  # each replica logs a request just after its answer went out
            for k in expected.values():
                k.clear()
            for (key_id, code), n in access_log(nodes).items():
                if key_id in expected:
                    expected[key_id][code] = n
            return sum(sum(k.values()) for k in expected.values()) == sent

        wait_until(logged, 10, "the access logs never held every request")
        assert expected[keys[0]["id"]] == {"forwarded": 3 * 11 + 3, "insufficient_permissions": 3 * 3 + 3}
        assert expected[keys[2]["id"]] == {"key_disabled": 3 * 4 + 3}

        def flushed() -> bool:
            return all(usage(nodes[1], k["id"])["totals"]["outcomes"] == dict(expected[k["id"]]) for k in keys)

        wait_until(flushed, 10, "the usage figures never matched the access logs")
        time.sleep(1.2)  # two more flush intervals: nothing counted twice
        assert flushed()
        for window in ("24h", "30d"):
            assert usage(nodes[2], keys[1]["id"], window)["totals"]["outcomes"] == dict(expected[keys[1]["id"]])


def test_last_use_shows_within_flush_seconds_plus_one(
    tmp_path: Path, upstream_url: str, admin_tokens: AdminTokens, redis_server: RedisProcess
) -> None:
    flush = 1.0
    with cluster(tmp_path, upstream_url, admin_tokens, redis_server.url, 2, flush_seconds=flush) as nodes:
        key = create(nodes[0])
        assert nodes[0].admin("GET", f"/v1/keys/{key['id']}", role="viewer")[1]["last_used_at"] is None
        for source in ("127.0.0.2", "127.0.0.3"):  # a first use, then a later one from elsewhere
            before = time.time()
            assert call(nodes[1], key["key"], source=source) == (200, None)
            used = time.monotonic()
            record: dict[str, Any] = {}

            def shown(source: str = source, before: float = before) -> bool:
                nonlocal record
                record = nodes[0].admin("GET", f"/v1/keys/{key['id']}", role="viewer")[1]
                return record["last_used_ip"] == source

            wait_until(shown, flush + 5, "the last use never showed")
            lag = time.monotonic() - used
            assert lag <= flush + 1.0, lag
            at = time.mktime(time.strptime(record["last_used_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            assert before - 1 <= at <= time.time(), record


def test_request_path_writes_nothing_and_sigterm_writes_what_was_held(
    tmp_path: Path, upstream_url: str, admin_tokens: AdminTokens, redis_server: RedisProcess
) -> None:
    with cluster(tmp_path, upstream_url, admin_tokens, redis_server.url, 2, flush_seconds=300) as nodes:
        key = create(nodes[0])
        assert call(nodes[0], key["key"]) == (200, None)  # the key in the replica's cache
        prefix = yaml.safe_load((tmp_path / "r0.yaml").read_text())["redis"]["prefix"]
        client = redis.Redis.from_url(redis_server.url)

        def stats() -> dict[str, int]:
            info = client.info("commandstats")
            return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}

        # The one-time moves of an earlier layout (runtime/replica.py) run once each replica's key
        # filter is ready (a SCAN, a script, a marker set): not the request path, so wait them out.
        for node in nodes:
            wait_until(lambda node=node: "gateway_layout_migration_pending 0.0" in node.metrics(), 15,
                       f"{node.name}: the startup migration did not end")  # fmt: skip
        before = stats()
        monitor = Monitor(redis_server.port)
        for _ in range(150):
            call(nodes[0], key["key"])
        for _ in range(20):
            call(nodes[0], key["key"], "/billing/x")
        during = monitor.close()
        after = stats()
        client.close()
        # INFO commandstats: no write command ran but the live-replica heartbeat's (EVALSHA -> TIME, ZADD)
        # and the lease probes' PUBLISH (coherence/subscriber.py); MONITOR below tells those apart.
        changed = {n for n in after if after[n] != before.get(n, 0)}
        assert not changed & (Monitor.WRITES | {"eval"}) - {"zadd", "publish"}, changed
        writes = [(c, k) for c, k in Monitor.writes(during, prefix) if not k.endswith("replicas")]
        assert writes == []  # 170 requests, not one write (flushing held off: 300 s)
        assert len(during) > 170  # the monitor saw the replicas' own traffic (heartbeats, lookups)
        assert usage(nodes[1], key["id"])["totals"]["requests"] == 0
        monitor = Monitor(redis_server.port)
        nodes[0].proc.send_signal(signal.SIGTERM)
        assert nodes[0].proc.wait(timeout=30) == 0
        stopped = monitor.close()
        assert [c for c, _ in stopped if c == "eval"] == ["eval"]  # the last write: one script call
        assert (("hset", prefix + "u:last")) in stopped
        body = usage(nodes[1], key["id"])
        assert body["totals"]["outcomes"] == {"forwarded": 151, "insufficient_permissions": 20}


def test_a_policy_over_three_replicas_trips_once_within_10s(
    tmp_path: Path, upstream_url: str, admin_tokens: AdminTokens, redis_server: RedisProcess
) -> None:
    policies = [
        {"name": "spread", "rule": "distinct_addresses", "above": 4, "window": "10m", "action": "disable"},
        {"name": "watch", "rule": "requests", "above": 8, "window": "10m", "dry_run": True},
    ]
    # The default flush_seconds (10): with policies a replica writes every 5 s, so the 10 s holds as shipped.
    with cluster(tmp_path, upstream_url, admin_tokens, redis_server.url, 3, flush_seconds=10,
                 policies=policies) as nodes:  # fmt: skip
        key = create(nodes[0])
        # Two addresses on each replica: no replica alone sees more than 4, the sum is 6.
        sources = [f"127.0.0.{i}" for i in range(2, 8)]
        crossed = 0.0
        for i, source in enumerate(sources):
            assert call(nodes[i // 2], key["key"], source=source) == (200, None)
            if i == 4:
                crossed = time.monotonic()  # the fifth distinct address: above 4 from here on

        def refused_everywhere() -> bool:
            # From an address already counted: the polling itself adds none.
            return all(call(node, key["key"], source=sources[0]) == (403, "key_disabled") for node in nodes)

        wait_until(refused_everywhere, 12, "the key was not refused on every replica")
        took = time.monotonic() - crossed
        assert took <= 10.0, took
        status, record = nodes[1].admin("GET", f"/v1/keys/{key['id']}", role="viewer")
        assert (record["enabled"], record["disabled_by"]) == (False, "policy:spread")
        status, body = nodes[2].admin("GET", f"/v1/audit?key_id={key['id']}", role="admin")
        disables = [e for e in body["entries"] if e["action"] == "disable"]
        assert len(disables) == 1, body["entries"]
        (entry,) = disables
        assert entry["actor"] == "policy:spread" and entry["detail"]["value"] in (5, 6)
        assert f"{entry['detail']['value']} distinct client addresses in 10m, above 4" in entry["reason"]

        # Re-enabled, the key is exempt from `spread` for its window: new addresses do not trip it again.
        status, _ = nodes[0].admin("POST", f"/v1/keys/{key['id']}/enable", {})
        assert status == 200
        for i in range(8, 14):
            assert call(nodes[i % 3], key["key"], source=f"127.0.0.{i}") == (200, None)
        time.sleep(2 * 5 + 1)  # two flush intervals (5 s with policies) and their evaluation
        assert all(call(node, key["key"], source=sources[0]) == (200, None) for node in nodes)
        status, body = nodes[0].admin("GET", f"/v1/audit?key_id={key['id']}", role="admin")
        actions = [(e["action"], e["actor"]) for e in body["entries"]]
        assert actions.count(("disable", "policy:spread")) == 1, actions
        # The dry run reported once (its hold lasts its window) and changed nothing.
        assert actions.count(("policy_match", "policy:watch")) == 1, actions
        metrics = "".join(node.metrics() for node in nodes)
        assert 'gateway_policy_matches_total{outcome="disabled",policy="spread"} 1.0' in metrics
        assert 'gateway_policy_matches_total{outcome="dry_run",policy="watch"} 1.0' in metrics
