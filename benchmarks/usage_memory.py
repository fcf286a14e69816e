"""Redis memory of usage figures (docs/usage.md): keys used every minute for a day, written by the
real flush script, measured with INFO memory and MEMORY USAGE in a redis-server of its own.

    .venv/bin/python benchmarks/usage_memory.py [--keys 200]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from gateway.usage.counter import Batch, Tally  # noqa: E402
from gateway.usage.store import UsageStore  # noqa: E402

THREE = {"forwarded": 40, "insufficient_permissions": 1, "key_expired": 1}
CASES = (
    ("one outcome, 1 new address a minute", {"forwarded": 40}, 1),
    ("three outcomes, 2 new addresses a minute", THREE, 2),
    ("three outcomes, 40 new addresses a minute", THREE, 40),
)


async def measure(port: int, keys: int, label: str, outcomes: dict[str, int], addresses: int) -> None:
    r = Redis(port=port)
    await r.flushall()
    base = int((await r.info("memory"))["used_memory"])
    store = UsageStore(r, "gw:")
    now = int(time.time() // 60)
    for minute in range(now - 1439, now + 1):  # a day; what has expired by now is gone (EXPIREAT in the past)
        tallies = {}
        for k in range(keys):
            t = Tally()
            t.outcomes = dict(outcomes)
            t.addresses = {f"10.{k % 250}.{(minute * 7 + i) % 250}.{i % 250}" for i in range(addresses)}
            t.last_at, t.last_ip, t.last_route = minute * 60.0, "10.0.0.1", "api"
            tallies[f"key_{k:020x}"] = t
        await store.write([Batch(minute, tallies)])
    used = int((await r.info("memory"))["used_memory"]) - base
    kinds: dict[str, int] = {}
    async for name in r.scan_iter(match="gw:u:*", count=1000):
        kind = name.decode().split(":")[2]
        kinds[kind] = kinds.get(kind, 0) + int(await r.memory_usage(name) or 0)
    parts = ", ".join(f"{k} {v / keys / 1024:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    print(
        f"{label}: {used / keys / 1024:.1f} KiB a key ({await r.dbsize() / keys:.0f} Redis keys; KiB by kind: {parts})"
    )
    await r.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
                                stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(0.5)
            print(f"{args.keys} keys, each used every minute for a day:")
            for label, outcomes, addresses in CASES:
                asyncio.run(measure(port, args.keys, label, outcomes, addresses))
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
