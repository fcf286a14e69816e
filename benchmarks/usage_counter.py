"""What per-key usage counting costs the request path: `Gate._record` with the usage counter
against `Gate._record` without it (usage=None), in the same process, interleaved rounds.

`_record` is where every request ends (one metric increment, the access log, and now the counter).
Both variants run the same `_record` of a real `Proxy` on the same exchanges; the access log is
off (its cost is the same in both and only adds noise). Traffic: 1,000 keys, 50 client addresses,
two routes, 1 request in 10 refused; the counter is emptied (as the flusher does) every 100,000
requests. Prints, per request, the median and the range over rounds of both variants and of their
difference: the counting's cost. A full `make bench` puts it against nginx.

    .venv/bin/python benchmarks/usage_counter.py [--rounds 11] [--requests 200000]
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from multidict import CIMultiDict, CIMultiDictProxy  # noqa: E402

from gateway.keytable.record import KeyRecord  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.proxy import Exchange, Proxy  # noqa: E402
from gateway.usage.counter import Counter  # noqa: E402


def exchanges(n: int) -> list[tuple[Exchange, str, int]]:
    headers = CIMultiDictProxy(CIMultiDict({"User-Agent": "bench"}))
    requests = [SimpleNamespace(remote=f"10.1.0.{i}", trusted=False, headers=headers, method="GET") for i in range(50)]
    records = [KeyRecord(id=f"key_{i:020x}", hash=f"{i:064x}") for i in range(1000)]
    out = []
    for i in range(n):
        refused = i % 10 == 9
        ex = Exchange(requests[i % 50], "req_bench", 0.0, "GET", "/api/x", "billing" if refused else "api",  # type: ignore[arg-type]
                      records[(i * 7) % 1000])  # fmt: skip
        out.append((ex, "insufficient_permissions" if refused else "forwarded", 403 if refused else 200))
    return out


def run(proxy: Proxy, work: list[tuple[Exchange, str, int]], counter: Counter | None) -> float:
    """Seconds per request."""
    record = proxy._record
    gc.disable()
    started = time.perf_counter()
    for i in range(0, len(work), 100_000):
        for exchange, code, status in work[i : i + 100_000]:
            record(exchange, code, status)  # type: ignore[arg-type]
        if counter is not None:
            counter.take()
    elapsed = time.perf_counter() - started
    gc.enable()
    return elapsed / len(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    logging.getLogger("gateway.access").setLevel(logging.WARNING)
    metrics = Metrics()
    counter = Counter()
    without = Proxy(None, None, None, metrics, forwarder=None)  # type: ignore[arg-type]
    with_usage = Proxy(None, None, None, metrics, forwarder=None, usage=counter)  # type: ignore[arg-type]
    work = exchanges(args.requests)
    run(without, work[:20_000], None)  # warm both paths
    run(with_usage, work[:20_000], counter)
    base: list[float] = []
    counted: list[float] = []
    for r in range(args.rounds):
        order = [(without, None, base), (with_usage, counter, counted)]
        for proxy, c, out in order if r % 2 == 0 else reversed(order):
            out.append(run(proxy, work, c) * 1e6)
    diff = [c - b for b, c in zip(base, counted, strict=True)]

    def show(name: str, values: list[float]) -> str:
        return f"{name:<28} median {statistics.median(values):6.3f} us  range {min(values):6.3f} .. {max(values):6.3f}"

    print(f"{args.rounds} interleaved rounds of {args.requests} requests, Python {sys.version.split()[0]}")
    print(show("_record without usage", base))
    print(show("_record with usage", counted))
    print(show("counting (difference)", diff))


if __name__ == "__main__":
    main()
