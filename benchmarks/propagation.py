"""Disable -> refused on every replica: how long it takes, with 3 replicas on loopback.

Starts one redis-server (AOF, fsync always, as production should), an upstream
and 3 `gateway serve` processes sharing it. For each of N keys: the key is
warmed (cached) on all three replicas, then the clock starts, the key is
disabled through one replica's admin API (round-robin), and one request per
replica is sent at once after the answer; the clock stops when all three
refused it. Prints p50/p99/max of that latency and of the admin call alone,
counts any request forwarded after the disable answered (must be 0), and
compares with a baseline measured in the same run: one admin read plus one
request to each replica, interleaved with the disables: the floor any
confirmation scheme pays.

    .venv/bin/python benchmarks/propagation.py [--disables 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, pct, stop_processes, wait_ready  # noqa: E402
from gateway.admin.auth import hash_token  # noqa: E402


class Cluster:
    """redis-server and the gateway processes, started and stopped outside the event loop."""

    def __init__(self, replicas: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        self.upstream_port = free_port()
        redis_port = free_port()
        self.redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
             "--dir", str(self.tmp), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.token = "gwadm_bench_" + secrets.token_urlsafe(16)
        entry = {"name": "bench", "role": "admin", "hash": hash_token(self.token)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nodes: list[tuple[str, str]] = []
        for i in range(replicas):
            proxy_port, admin_port = free_port(), free_port()
            cfg = {
                "listen": {"host": "127.0.0.1", "port": proxy_port},
                "admin": {"listen": {"host": "127.0.0.1", "port": admin_port}, "tokens": [entry]},
                "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "prefix": "bench:"},
                "routes": [
                    {"name": "api", "path_prefix": "/api", "upstream": f"http://127.0.0.1:{self.upstream_port}"}
                ],
            }
            path = self.tmp / f"gateway-{i}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            with open(self.tmp / f"gateway-{i}.log", "wb") as log:
                argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-level", "warning"]
                self.procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log, env=dict(os.environ)))
            self.nodes.append((f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}"))

    def stop(self) -> None:
        stop_processes(self.procs, self.redis, self.tmp)


async def run(cluster: Cluster, disables: int, replicas: int) -> int:
    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", lambda r: web.json_response({"ok": True}))
    upstream_runner = web.AppRunner(upstream_app, access_log=None)
    await upstream_runner.setup()
    await web.TCPSite(upstream_runner, "127.0.0.1", cluster.upstream_port).start()
    nodes, token = cluster.nodes, cluster.token

    admin_headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for _, admin in nodes:
                await wait_ready(session, admin + "/readyz")

            async def call(url: str, key: str) -> int:
                async with session.get(url + "/api/x", headers={"Authorization": f"Bearer {key}"}) as r:
                    await r.read()
                    return r.status

            keys = []
            for _ in range(disables):
                async with session.post(nodes[0][1] + "/v1/keys", json={"name": "bench"}, headers=admin_headers) as r:
                    keys.append(await r.json())

            for _, admin in nodes:  # each process verifies the admin token (argon2id) once: not measured
                async with session.get(admin + "/v1/keys?limit=1", headers=admin_headers) as r:
                    await r.read()

            refused_ms: list[float] = []
            admin_ms: list[float] = []
            reported_ms: list[float] = []
            unconfirmed = 0
            fenced = 0  # live replicas answered for by their lapsed lease instead of an ack (spec 8)
            forwarded_after = 0
            baseline: list[float] = []
            for i, created in enumerate(keys):
                statuses = await asyncio.gather(*(call(proxy, created["key"]) for proxy, _ in nodes))
                assert statuses == [200] * replicas, statuses  # cached everywhere
                admin = nodes[i % replicas][1]
                # Baseline, interleaved: an admin read, then one request to each replica.
                t0 = time.perf_counter()
                async with session.get(f"{admin}/v1/keys/{created['id']}", headers=admin_headers) as r:
                    await r.read()
                await asyncio.gather(*(call(proxy, created["key"]) for proxy, _ in nodes))
                baseline.append((time.perf_counter() - t0) * 1000)

                t0 = time.perf_counter()
                async with session.post(
                    f"{admin}/v1/keys/{created['id']}/disable", json={"reason": "bench"}, headers=admin_headers
                ) as r:
                    answer = await r.json()
                t1 = time.perf_counter()
                prop = answer["propagation"]
                unconfirmed += prop["confirmed"] != prop["replicas"] or prop["replicas"] != replicas
                fenced += prop.get("fenced", 0)
                while True:
                    statuses = await asyncio.gather(*(call(proxy, created["key"]) for proxy, _ in nodes))
                    forwarded_after += statuses.count(200)
                    if all(s == 403 for s in statuses):
                        break
                t2 = time.perf_counter()
                admin_ms.append((t1 - t0) * 1000)
                refused_ms.append((t2 - t0) * 1000)
                reported_ms.append(prop["ms"])
    finally:
        await upstream_runner.cleanup()

    def row(name: str, values: list[float]) -> str:
        return (
            f"{name:<44} p50 {pct(values, 50):7.2f}  p99 {pct(values, 99):7.2f}  "
            f"max {max(values):7.2f}  mean {statistics.fmean(values):7.2f}"
        )

    print(f"disable -> refused on all replicas: {disables} disables, {replicas} replicas, loopback, ms")
    print(row("disable sent -> all replicas refuse", refused_ms))
    print(row("disable admin call (answer)", admin_ms))
    print(row("propagation.ms reported by the answer", reported_ms))
    print(row("baseline: admin read + 1 request per replica", baseline))
    p99 = pct(refused_ms, 99)
    print(f"ratio p99 refused / p99 baseline: {p99 / pct(baseline, 99):.2f}x")
    for name, window_ms in (("Kong poll 5 s", 5000), ("Tyk fallback 10 s", 10000), ("Unkey/Zuplo 60 s", 60000)):
        print(f"ratio {name} window / our p99: {window_ms / p99:,.0f}x")
    print(f"answers with confirmed < replicas: {unconfirmed} (replicas fenced by their lease: {fenced})")
    print(f"requests forwarded after the disable answered: {forwarded_after}")
    return 1 if forwarded_after or unconfirmed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--disables", type=int, default=200)
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args()
    cluster = Cluster(args.replicas)
    try:
        code = asyncio.run(run(cluster, args.disables, args.replicas))
    finally:
        cluster.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
