"""A replica's ready time on a large table, started again and again (issue 15: at most 3 s on 1M keys).

Three tables of N keys each on fresh redis-servers, written directly (not through the gateway,
which `benchmarks/scale.py` does: minutes for 1M keys), the same keys in each, each with the `ids`
listing (a sorted set of every id):

- `idix`: this version's layout: `k:<sha256>` records, the id index in 65,536 bucketed hashes
  (`idix:`), the audit index (`auditix:`, one entry a key), `ids-bucketed` "moved": the key
  filter is built from the id index (KeyStore.indexed_prefixes: the index holds every listed id);
- `idix, scan`: the same layout with `ids-bucketed` "moving" (set again before each start: the
  id move a replica then runs once its filter is ready would mark it "moved"), so the filter is
  built by the SCAN of the key space, as before the index path;
- `id:<id>`: the layout before it, a string `id:<id>` a key instead of `idix:` (twice the Redis
  keys for the key filter's SCAN to walk; `ids-bucketed` is set so that no replica moves them,
  and the index, empty, does not match `ids`: the SCAN).

Then `--starts` rounds, each starting one `gateway serve` on each table in turn (interleaved, so
the machine's other load falls on both alike): seconds from spawn until its admin listener
answers, and until /metrics shows gateway_key_filter_ready 1 (polled every 10 ms), and Redis's
own time in SCAN and in HVALS during that start (INFO commandstats). Prints each start, then the medians with
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


def fill(port: int, n: int, legacy: bool, marker: str) -> int:
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
        pipe.zadd("scale:ids", {key_id: 1.7e9 + i})
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    r.set("scale:audit-moved", "bench")
    r.set("scale:ids-bucketed", marker)
    return int(r.dbsize())


async def start(table: Table, session: aiohttp.ClientSession, marker: str) -> tuple[float, float, float, float]:
    """(admin up s, filter ready s, Redis SCAN s, Redis HVALS s) of one `gateway serve` on the table."""
    r = redis.Redis(port=table.redis_port)
    r.set("scale:ids-bucketed", marker)
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
                    stats = r.info("commandstats")
                    scan = stats.get("cmdstat_scan", {}).get("usec", 0) / 1e6
                    hvals = stats.get("cmdstat_hvals", {}).get("usec", 0) / 1e6
                    return up, ready, scan, hvals
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
    # name: (table, written in the layout before the index, ids-bucketed before each start)
    layouts = {"idix": (False, "moved bench"), "idix, scan": (False, "moving"), "id:<id>": (True, "moved bench")}
    tables = {name: Table(free_port()) for name in layouts}
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in tables}
    try:
        await asyncio.sleep(0.5)  # the redis-servers start
        for name, table in tables.items():
            table.bytecode = not args.no_bytecode
            legacy, marker = layouts[name]
            print(f"{name}: {fill(table.redis_port, args.keys, legacy, marker):,} Redis keys", flush=True)
        async with aiohttp.ClientSession() as session:
            for _ in range(args.starts):
                for name, table in tables.items():
                    got = await start(table, session, layouts[name][1])
                    results[name].append(got)
                    print(f"  {name}: admin up {got[0]:.2f} s, ready {got[1]:.2f} s, Redis SCAN {got[2]:.2f} s, "
                          f"HVALS {got[3]:.2f} s", flush=True)  # fmt: skip
    finally:
        for table in tables.values():
            table.stop()
    print(f"\n{args.keys:,} keys, {args.starts} starts each, load {os.getloadavg()[0]:.1f}: median (min-max)")
    for name, rows in results.items():
        cols = [
            f"{label} {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})"
            for label, v in zip(("admin up", "ready", "Redis SCAN", "HVALS"), zip(*rows, strict=True), strict=True)
        ]
        print(f"  {name}: " + ", ".join(cols))


if __name__ == "__main__":
    asyncio.run(main())
