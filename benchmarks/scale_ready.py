"""A replica's ready time on a large table, started again and again (issue 15: at most 3 s on 1M keys).

Two tables of N keys each on two fresh redis-servers, written directly (not through the gateway,
which `benchmarks/scale.py` does: minutes for 1M keys), the same keys in both:

- `idix`: this version's layout: `k:<sha256>` records, the id index in 65,536 bucketed hashes
  (`idix:`), the audit index (`auditix:`, one entry a key);
- `id:<id>`: the layout before it, a string `id:<id>` a key instead of `idix:` (twice the Redis
  keys for the key filter's SCAN to walk; `ids-bucketed` is set so that no replica moves them).

Then `--starts` rounds, each starting one `gateway serve` on each table in turn (interleaved, so
the machine's other load falls on both alike): seconds from spawn until its admin listener
answers, and until /metrics shows gateway_key_filter_ready 1 (polled every 10 ms), and Redis's
own time in SCAN during that start (INFO commandstats). Prints each start, then the medians with
their ranges. `--no-bytecode` starts them with PYTHONDONTWRITEBYTECODE=1 (every start compiles the
gateway's modules again); by default replicas start with cached bytecode, as an installed
gateway does.

    .venv/bin/python benchmarks/scale_ready.py [--keys 1000000] [--starts 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.scale import Table, free_port  # noqa: E402


def bucket(key_id: str) -> str:
    return hashlib.sha1(key_id.encode(), usedforsecurity=False).hexdigest()[:4]


def fill(port: int, n: int, legacy: bool) -> int:
    """N records under the prefix `scale:` (Table's); the Redis keys the table has."""
    r = redis.Redis(port=port)
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        seed = i.to_bytes(8, "big")
        key_hash = hashlib.sha256(seed).hexdigest()
        key_id = "key_" + hashlib.sha1(seed, usedforsecurity=False).hexdigest()[:20]
        record = {"id": key_id, "hash": key_hash, "name": f"customer {i}", "created_at": 1.7e9, "imported": True,
                  "version": 1}  # fmt: skip
        pipe.set(f"scale:k:{key_hash}", orjson.dumps(record))
        if legacy:
            pipe.set(f"scale:id:{key_id}", key_hash)
        else:
            pipe.hset(f"scale:idix:{bucket(key_id)}", key_id, bytes.fromhex(key_hash))
        pipe.hset(f"scale:auditix:{bucket(key_id)}", key_id, f"{1_700_000_000_000 + i}-0")
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    r.set("scale:audit-moved", "bench")
    r.set("scale:ids-bucketed", "moved bench")  # no replica moves anything: each table stays as written
    return int(r.dbsize())


async def start(table: Table, session: aiohttp.ClientSession) -> tuple[float, float, float]:
    """(admin up s, filter ready s, Redis SCAN s) of one `gateway serve` on the table."""
    r = redis.Redis(port=table.redis_port)
    r.config_resetstat()
    t0 = time.perf_counter()
    proc, _, admin = table.gateway()
    up: float | None = None
    try:
        while time.perf_counter() - t0 < 60:
            try:
                async with session.get(admin + "/metrics") as resp:
                    text = await resp.text()
                up = up if up is not None else time.perf_counter() - t0
                if "gateway_key_filter_ready 1.0" in text:
                    ready = time.perf_counter() - t0
                    scan = r.info("commandstats").get("cmdstat_scan", {}).get("usec", 0) / 1e6
                    return up, ready, scan
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.01)
        raise SystemExit("key filter not ready within 60 s")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        table.procs.remove(proc)
        r.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--no-bytecode", action="store_true")
    args = parser.parse_args()
    tables = {"idix": Table(free_port()), "id:<id>": Table(free_port())}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in tables}
    try:
        await asyncio.sleep(0.5)  # the redis-servers start
        for name, table in tables.items():
            table.bytecode = not args.no_bytecode
            print(f"{name}: {fill(table.redis_port, args.keys, name != 'idix'):,} Redis keys", flush=True)
        async with aiohttp.ClientSession() as session:
            for _ in range(args.starts):
                for name, table in tables.items():
                    got = await start(table, session)
                    results[name].append(got)
                    print(f"  {name}: admin up {got[0]:.2f} s, ready {got[1]:.2f} s, Redis SCAN {got[2]:.2f} s",
                          flush=True)  # fmt: skip
    finally:
        for table in tables.values():
            table.stop()
    print(f"\n{args.keys:,} keys, {args.starts} starts each, load {os.getloadavg()[0]:.1f}: median (min-max)")
    for name, rows in results.items():
        cols = [
            f"{label} {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})"
            for label, v in zip(("admin up", "ready", "Redis SCAN"), zip(*rows, strict=True), strict=True)
        ]
        print(f"  {name}: " + ", ".join(cols))


if __name__ == "__main__":
    asyncio.run(main())
