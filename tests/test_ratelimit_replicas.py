"""Rate limits and credits over three real gateway processes on one redis-server (spec 12).

Built like tests/test_replicas.py (whose helpers it uses): every gateway is a real
`python -m gateway serve` process, Redis a real redis-server, the upstream a threaded HTTP server
in this process that counts each request it received. The guarantees checked: a PATCH is in force
on the next request on every replica once it answers (the same confirmed propagation as a
disable), and N credits admit exactly N requests however many replicas serve them concurrently.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AdminTokens
from tests.test_ratelimit import until_clear_of_window_end
from tests.test_replicas import (
    Cluster,
    EchoHandler,
    gateway_config,
    metric,
    redis_process,
    running_cluster,
    start_gateway,
    stop_gateway,
    wait_ready,
)

pytestmark = pytest.mark.slow


class CountingHandler(EchoHandler):
    received = 0
    lock = threading.Lock()

    def arrived(self) -> None:
        with CountingHandler.lock:
            CountingHandler.received += 1


class Backlogged(ThreadingHTTPServer):
    """http.server with room for a burst: its default listen backlog (5) drops the connections of
    100 requests forwarded at once, and the gateway then answers 504 for the upstream."""

    request_queue_size = 1024
    daemon_threads = True


@pytest.fixture(scope="module")
def counting_upstream() -> Iterator[str]:
    server = Backlogged(("127.0.0.1", 0), CountingHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, counting_upstream: str, admin_tokens: AdminTokens
) -> Iterator[Cluster]:
    workdir: Path = tmp_path_factory.mktemp("ratelimit-cluster")
    with (
        redis_process(workdir / "redis") as server,
        running_cluster(workdir, counting_upstream, admin_tokens, server.url) as cluster,
    ):
        yield cluster


def create(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
    status, created = cluster.nodes[0].admin("POST", "/v1/keys", body)
    assert status == 201, created
    return created


def patch(cluster: Cluster, key_id: str, body: dict[str, Any], via: int) -> dict[str, Any]:
    status, data = cluster.nodes[via].admin("PATCH", f"/v1/keys/{key_id}", body)
    assert status == 200, data
    assert (data["propagation"]["replicas"], data["propagation"]["confirmed"]) == (3, 3), data["propagation"]
    return data


def test_a_patch_is_in_force_on_the_next_request_on_every_replica(cluster: Cluster) -> None:
    hour = {"name": "hour", "window_seconds": 3600}
    time.sleep(until_clear_of_window_end(3600, 60))  # every request below counts in one hour window
    created = create(cluster, {"name": "patch-me", "ratelimits": [{**hour, "limit": 1000}]})
    key, key_id = created["key"], created["id"]
    cluster.cache_everywhere(key)  # each replica holds the record (and a slice of the window)
    for round_ in range(3):
        patch(cluster, key_id, {"ratelimits": [{**hour, "limit": 2}]}, via=round_)  # below what was granted
        for node in cluster.nodes:
            assert node.proxy(key) == (429, "rate_limited"), (round_, node.name)
        patch(cluster, key_id, {"ratelimits": [{**hour, "limit": 1000}]}, via=(round_ + 1) % 3)
        for node in cluster.nodes:
            assert node.proxy(key) == (200, None), (round_, node.name)
    # Credits: a balance of 0 refuses on every replica at once; 2 more admit exactly two, anywhere.
    patch(cluster, key_id, {"credits": {"remaining": 0}}, via=1)
    for node in cluster.nodes:
        assert node.proxy(key) == (429, "usage_exceeded"), node.name
    patch(cluster, key_id, {"credits": {"add": 2}}, via=2)
    answers = [node.proxy(key) for node in cluster.nodes]
    assert sorted(answers, key=str) == sorted([(200, None), (200, None), (429, "usage_exceeded")], key=str)
    # And removing them lifts the refusal everywhere on the next request.
    patch(cluster, key_id, {"credits": None}, via=0)
    for node in cluster.nodes:
        assert node.proxy(key) == (200, None), node.name


async def _flood(cluster: Cluster, key: str, total: int) -> Counter[tuple[int, str | None]]:
    """`total` requests at once, spread evenly over the replicas, each on its own connection."""
    headers = {"Authorization": f"Bearer {key}", "Connection": "close"}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    go = asyncio.Event()

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, str | None]:
        await go.wait()
        url = cluster.nodes[i % len(cluster.nodes)].proxy_url + "/api/flood"
        async with session.get(url, headers=headers) as r:
            body = await r.json()
            return r.status, None if r.status == 200 else body["error"]["code"]

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(one(session, i)) for i in range(total)]
        await asyncio.sleep(0)
        go.set()
        return Counter(await asyncio.gather(*tasks))


async def test_n_credits_admit_exactly_n_requests_over_three_replicas_under_1000_concurrent(cluster: Cluster) -> None:
    for credits, total in ((100, 1000), (1, 300)):
        created = create(cluster, {"name": "credits", "credits": {"remaining": credits}})
        before = CountingHandler.received
        outcomes = await _flood(cluster, created["key"], total)
        assert outcomes == Counter({(200, None): credits, (429, "usage_exceeded"): total - credits}), outcomes
        assert CountingHandler.received - before == credits  # what the upstream received
        status, shown = cluster.nodes[1].admin("GET", f"/v1/keys/{created['id']}", role="viewer")
        assert status == 200 and shown["credits"]["remaining"] == 0


def test_on_store_error_in_a_gateway_process_with_redis_hung_then_killed(
    tmp_path: Path, counting_upstream: str, admin_tokens: AdminTokens
) -> None:
    """One `gateway serve` process whose cache may serve stale entries for a minute, so the key
    decision passes without Redis and the rate-limit step is what decides: `deny` and credits answer
    503 ratelimit_unavailable, `allow` forwards, each decision counted; first with Redis frozen
    (SIGSTOP: a Redis that hangs), then with Redis killed."""
    with redis_process(tmp_path / "redis") as server:
        raw = gateway_config(counting_upstream, admin_tokens, server.url, "rlerr:")
        raw["cache"]["serve_stale_seconds"] = 60
        node = start_gateway(tmp_path, "alone", raw, admin_tokens)
        try:
            wait_ready(node)
            limit = {"name": "m", "limit": 100, "window_seconds": 3600}
            keys = {
                "deny": node.admin("POST", "/v1/keys", {"ratelimits": [limit]})[1]["key"],
                "allow": node.admin("POST", "/v1/keys", {"ratelimits": [{**limit, "on_store_error": "allow"}]})[1][
                    "key"
                ],
                "credits": node.admin("POST", "/v1/keys", {"credits": {"remaining": 100}})[1]["key"],
            }
            for fault in ("hung", "killed"):
                wait_ready(node)  # subscribed again (after SIGCONT): its cache was cleared, so fill it
                for key in keys.values():
                    assert node.proxy(key) == (200, None)
                before = CountingHandler.received
                assert server.proc is not None
                if fault == "hung":
                    os.kill(server.proc.pid, signal.SIGSTOP)
                else:
                    server.kill()
                try:
                    started = time.monotonic()
                    got = {name: node.proxy(key) for name, key in keys.items()}
                    assert time.monotonic() - started < 15  # each a few seconds at most, never hung
                finally:
                    if fault == "hung":
                        os.kill(server.proc.pid, signal.SIGCONT)
                assert got == {
                    "deny": (503, "ratelimit_unavailable"),
                    "allow": (200, None),
                    "credits": (503, "ratelimit_unavailable"),
                }, fault
                assert CountingHandler.received - before == 1  # only `allow` reached the upstream
            text = node.metrics()
            assert metric(text, 'gateway_ratelimit_store_error_decisions_total{decision="denied",route="api"}') == 4
            assert metric(text, 'gateway_ratelimit_store_error_decisions_total{decision="allowed",route="api"}') == 2
        finally:
            stop_gateway(node)
