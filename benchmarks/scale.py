"""The key table at scale (issue 15): for each table size, written in the gateway's own format.

For every size (default 10k and 100k; `--sizes 10000,100000,1000000` for the full table) on a
fresh redis-server (no persistence: memory is what is measured), with an in-process upstream:

1. one `gateway serve` (the importer) imports N keys through `POST /v1/keys/import` (NDJSON,
   IMPORT_MAX_LINES lines a request, `--streams` requests at once): import keys/s;
2. Redis bytes per key: `INFO memory` used_memory after the import less before it, over N (the
   record, its id index, the listing index, and the import's audit entry, index included); then
   `--changes` keys are disabled through the admin API and the growth per change is added: the
   "create + one change" figure the issue's target is about;
3. replica ready: a second `gateway serve` started on the table; seconds from its spawn until its
   /metrics shows gateway_key_filter_ready 1 (process start, imports, subscription, the SCAN and
   the sort); its RSS less the importer's RSS before the import, over N: gateway RSS per key;
4. proxied p50/p99 (ms, loopback, one client connection) with valid keys through the new replica:
   `--requests` requests cycling over 100 keys of the table (cached after their first request).

    .venv/bin/python benchmarks/scale.py [--sizes 10000,100000] [--changes 2000] [--requests 3000]

Prints one row a size. Bounded: each phase has a timeout; the processes are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import yaml
from aiohttp import web
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, pct, stop_processes  # noqa: E402
from gateway.admin.api import IMPORT_MAX_LINES  # noqa: E402
from gateway.admin.auth import hash_token  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Table:
    """A redis-server, and `gateway serve` processes sharing it."""

    def __init__(self, upstream_port: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="gw-scale-"))
        self.upstream_port = upstream_port
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", str(self.tmp), "--appendonly", "no", "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.token = "gwadm_bench_" + secrets.token_urlsafe(16)
        self.entry = {"name": "bench", "role": "admin", "hash": hash_token(self.token)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.bytecode = True  # gateways start with cached bytecode (see gateway())

    def gateway(self) -> tuple[subprocess.Popen[bytes], str, str]:
        """A new `gateway serve`: (process, proxy URL, admin URL)."""
        n = len(self.procs)
        proxy_port, admin_port = free_port(), free_port()
        cfg = {
            "listen": {"host": "127.0.0.1", "port": proxy_port},
            "admin": {"listen": {"host": "127.0.0.1", "port": admin_port}, "tokens": [self.entry]},
            "redis": {"url": f"redis://127.0.0.1:{self.redis_port}/0", "prefix": "scale:"},
            "routes": [{"name": "api", "path_prefix": "/api", "upstream": f"http://127.0.0.1:{self.upstream_port}"}],
        }
        path = self.tmp / f"gateway-{n}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with open(self.tmp / f"gateway-{n}.log", "wb") as log:
            argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-level", "warning"]
            # Bytecode cached as an installed gateway has it (pip compiles at install; the image's
            # PYTHONDONTWRITEBYTECODE applies after that): with it off here, every start would
            # compile the gateway's modules again (~0.3 s of the replica's start on this machine).
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            if not self.bytecode:
                env["PYTHONDONTWRITEBYTECODE"] = "1"
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log, env=env)
        self.procs.append(proc)
        return proc, f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}"

    def stop(self) -> None:
        stop_processes(self.procs, self.redis, self.tmp)


async def filter_ready(session: aiohttp.ClientSession, admin: str, seconds: float) -> None:
    """Until the replica's key filter may refuse (its /metrics), polled every 20 ms."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            async with session.get(admin + "/metrics") as r:
                if r.status == 200 and "gateway_key_filter_ready 1.0" in await r.text():
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.02)
    raise SystemExit(f"key filter not ready within {seconds}s: {admin}")


async def measure(n: int, args: argparse.Namespace, upstream_port: int) -> dict[str, float]:
    table = Table(upstream_port)
    headers = {"Authorization": f"Bearer {table.token}"}
    try:
        redis = Redis(port=table.redis_port)
        importer, _, admin = table.gateway()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            await filter_ready(session, admin, 60)
            async with session.get(admin + "/v1/keys?limit=1", headers=headers) as r:  # the token verified once
                await r.read()
            for _ in range(600):  # the startup's one-time id index pass (store.migrate_ids) is over
                if (await redis.get("scale:ids-bucketed") or b"").startswith(b"moved"):
                    break
                await asyncio.sleep(0.05)
            rss_empty = rss_bytes(importer.pid)
            memory_before = (await redis.info("memory"))["used_memory"]

            keys = ["legacy_" + secrets.token_urlsafe(24) for _ in range(n)]
            chunks = [
                b"".join(orjson.dumps({"key": k, "name": f"customer {i}"}) + b"\n" for i, k in
                         enumerate(keys[start : start + IMPORT_MAX_LINES], start))
                for start in range(0, n, IMPORT_MAX_LINES)
            ]  # fmt: skip
            queue = list(reversed(chunks))
            imported: list[str] = []

            async def stream() -> None:
                while queue:
                    body = queue.pop()
                    async with session.post(admin + "/v1/keys/import", data=body, headers=headers) as r:
                        assert r.status == 200, await r.text()
                        for line in (await r.read()).splitlines():
                            result = orjson.loads(line)
                            assert result.get("result") == "imported", result
                            imported.append(result["id"])

            t0 = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(stream() for _ in range(args.streams))), 900)
            import_s = time.perf_counter() - t0
            assert len(imported) == n
            memory_imported = (await redis.info("memory"))["used_memory"]

            changes = min(n, args.changes)
            for key_id in imported[:changes]:
                async with session.post(f"{admin}/v1/keys/{key_id}/disable", json={"reason": "bench"},
                                        headers=headers) as r:  # fmt: skip
                    assert r.status == 200, await r.text()
            memory_changed = (await redis.info("memory"))["used_memory"]

            t0 = time.perf_counter()
            replica, proxy, replica_admin = table.gateway()
            await filter_ready(session, replica_admin, 120)
            ready_s = time.perf_counter() - t0
            rss_replica = rss_bytes(replica.pid)

            sample = keys[changes : changes + 100] or keys[:100]
            latencies: list[float] = []
            for i in range(args.requests):
                key = sample[i % len(sample)]
                t1 = time.perf_counter()
                async with session.get(proxy + "/api/x", headers={"Authorization": f"Bearer {key}"}) as r:
                    await r.read()
                    assert r.status == 200, r.status
                latencies.append((time.perf_counter() - t1) * 1000)
        await redis.aclose()
    finally:
        table.stop()
    per_create = (memory_imported - memory_before) / n
    return {
        "keys": n,
        "redis_create": per_create,
        "redis_change": per_create + (memory_changed - memory_imported) / changes,
        "ready_s": ready_s,
        "rss_per_key": (rss_replica - rss_empty) / n,
        "import_rate": n / import_s,
        "import_s": import_s,
        "p50": pct(latencies, 50),
        "p99": pct(latencies, 99),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="table sizes, comma-separated")
    parser.add_argument("--changes", type=int, default=2000, help="keys disabled to measure a change's bytes")
    parser.add_argument("--requests", type=int, default=3000, help="proxied requests for p50/p99")
    parser.add_argument("--streams", type=int, default=2, help="import requests at once")
    args = parser.parse_args()

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", lambda r: web.json_response({"ok": True}))
    runner = web.AppRunner(upstream_app, access_log=None)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(await measure(n, args, upstream_port))
            r = rows[-1]
            print(f"  {n:,} keys done: import {r['import_s']:.1f} s, ready {r['ready_s']:.2f} s", flush=True)
    finally:
        await runner.cleanup()
    print()
    print("| keys | Redis bytes/key (create / + one change) | replica ready (key filter built) "
          "| gateway RSS/key | import keys/s | proxied p50 / p99 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['keys']:,} | {r['redis_create']:,.0f} B / {r['redis_change']:,.0f} B | {r['ready_s']:.2f} s "
              f"| {r['rss_per_key']:,.0f} B | {r['import_rate']:,.0f} ({r['import_s']:.1f} s) "
              f"| {r['p50']:.2f} / {r['p99']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
