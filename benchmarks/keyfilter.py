"""The key filter's lookup (KnownKeys.absent, on the request path on a cache miss) and its memory.

Against the structure it replaced (a Python set of the 64-bit prefixes, the baseline), with the
same keys: build time, bytes per key (tracemalloc), and absent() per lookup, half of the probes
held and half not, as the median of interleaved rounds with the range.

    .venv/bin/python benchmarks/keyfilter.py [--keys 1000000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.keytable.keyfilter import KnownKeys, Prefixes


class SetFilter:
    """The baseline: what KnownKeys held before issue 15 (a set of ints), its absent() alike."""

    def __init__(self, hashes: list[str]) -> None:
        self.hashes = {int(h[:16], 16) for h in hashes}

    def absent(self, key_hash: str) -> bool:
        return int(key_hash[:16], 16) not in self.hashes


async def batches(hashes: list[str]) -> AsyncIterator[Prefixes]:
    for start in range(0, len(hashes), 5000):
        yield np.array([int(h[:16], 16) for h in hashes[start : start + 5000]], np.uint64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    hashes = [os.urandom(32).hex() for _ in range(args.keys)]

    tracemalloc.start()
    t0 = time.perf_counter()
    baseline = SetFilter(hashes)
    set_s, set_bytes = time.perf_counter() - t0, tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    tracemalloc.start()
    t0 = time.perf_counter()
    known = KnownKeys()
    assert asyncio.run(known.rebuild(batches(hashes)))
    known_s, known_bytes = time.perf_counter() - t0, tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    probes = [os.urandom(32).hex() for _ in range(20_000)] + hashes[:20_000]
    results: dict[str, list[float]] = {"set (baseline)": [], "KnownKeys": []}
    for n in range(args.rounds):
        pair = [("set (baseline)", baseline), ("KnownKeys", known)]
        for name, subject in pair if n % 2 else pair[::-1]:
            t0 = time.perf_counter()
            for key_hash in probes:
                subject.absent(key_hash)
            results[name].append((time.perf_counter() - t0) / len(probes) * 1e9)
    print(f"{args.keys:,} keys")
    print(f"{'':16} {'build s':>8} {'bytes/key':>10} {'absent() ns: median (range)':>30}")
    for name, seconds, size in (("set (baseline)", set_s, set_bytes), ("KnownKeys", known_s, known_bytes)):
        v = results[name]
        spread = f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"
        print(f"{name:16} {seconds:8.2f} {size / args.keys:10.1f} {spread:>30}")


if __name__ == "__main__":
    main()
