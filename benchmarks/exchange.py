"""What `Proxy.handle` itself costs per request: a refusal (401 missing_key) and a forwarded request
(a key found in the cache, then a stand-in upstream that answers at once), with no sockets.

    .venv/bin/python -m benchmarks.exchange                      # this checkout's proxy
    git show HEAD:gateway/proxy.py > /tmp/before.py
    .venv/bin/python -m benchmarks.exchange --against /tmp/before.py

With `--against`, the other proxy.py is loaded beside this one (same gateway modules around it) and
the two are measured in interleaved rounds, so drift on the machine falls on both alike. Each
round times `--requests` requests per case; the headline is the median µs per request over the
rounds with the range (min-max). Run it pinned (`taskset -c 1`) on a quiet machine. `--access-log`
writes the access log (JSON, to /dev/null) as a production gateway does; without it the access
logger is off and only the metric is counted, where a per-request object weighs the most.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import config as config_mod
from gateway import proxy as proxy_now
from gateway.h1.compat import EMPTY_PAYLOAD, RawRequestMessage
from gateway.h1.server import Request
from gateway.keytable.cache import KeyCache
from gateway.keytable.lease import Coherence
from gateway.keytable.lookup import KeyLookup
from gateway.keytable.record import KeyRecord, digest
from gateway.logs import JsonFormatter
from gateway.metrics import Metrics
from gateway.routing import RouteTable

TOKEN = "gw_" + "b3nch" * 8
CONFIG = """
listen: {host: 127.0.0.1, port: 0}
admin:
  listen: {host: 127.0.0.1, port: 0}
  tokens: []
redis: {url: "redis://127.0.0.1:1/0"}
routes:
  - {name: api, path_prefix: /api, upstream: "http://127.0.0.1:1"}
"""


class _Conn:
    """All a listener's Request asks of its connection; the answer's bytes are dropped."""

    remote = "127.0.0.1"
    trusted = False
    closing = False
    transport = None

    def send(self, data: bytes) -> None:
        pass

    def limit_body(self, payload: object, max_bytes: int) -> None:
        pass


class _Upstream:
    """Stands in for the upstream client: answers 200 at once."""

    async def forward(self, request: Request, *_: object, **__: object) -> int:
        request.reply(200, "OK", b"Content-Type: text/plain\r\n", b"ok")
        return 200


def _message(headers: list[tuple[str, str]]) -> RawRequestMessage:
    fields = CIMultiDictProxy(CIMultiDict(headers))
    raw = tuple((k.encode(), v.encode()) for k, v in headers)
    return RawRequestMessage(
        "GET", "/api/v1/items?page=2", (1, 1), fields, raw, False, None, False, False, URL("/api/v1/items?page=2")
    )


def _proxy(module: ModuleType) -> Any:
    cfg = config_mod.parse(CONFIG, source="<bench>")
    coherence = Coherence(lease_seconds=1e9)
    coherence.restored()
    cache = KeyCache(ttl_seconds=1e9, negative_ttl_seconds=1e9, max_entries=1000)
    record = KeyRecord(id="key_bench", hash=digest(TOKEN), owner="bench")
    cache.put(digest(TOKEN), record, cache.generation)
    lookup = KeyLookup(store=cast(Any, None), cache=cache, coherence=coherence, serve_stale_seconds=0)
    return module.Proxy(RouteTable(cfg.routes), lookup, cfg.keys, Metrics(), forwarder=_Upstream())


def _cases(proxy: Any) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
    refused = _message([("Host", "bench"), ("User-Agent", "bench/1")])
    forwarded = _message([("Host", "bench"), ("User-Agent", "bench/1"), ("Authorization", "Bearer " + TOKEN)])
    conn: Any = _Conn()
    return {
        "refusal": lambda: proxy.handle(Request(conn, refused, EMPTY_PAYLOAD)),
        "forwarded": lambda: proxy.handle(Request(conn, forwarded, EMPTY_PAYLOAD)),
    }


async def _time(case: Callable[[], Coroutine[Any, Any, None]], n: int) -> float:
    started = time.thread_time()  # CPU time: a round the scheduler cut short is not counted as cost
    for _ in range(n):
        await case()
    return (time.thread_time() - started) / n * 1e6


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("gateway._proxy_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another proxy.py to measure beside this checkout's")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--access-log", action="store_true", help="write the JSON access log to /dev/null")
    args = parser.parse_args()

    access = logging.getLogger("gateway.access")
    access.propagate = False
    if args.access_log:
        handler = logging.StreamHandler(open(os.devnull, "w"))
        handler.setFormatter(JsonFormatter())
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    else:
        access.setLevel(logging.WARNING)
    asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> None:
    variants = {"now": _proxy(proxy_now)}
    if args.against is not None:
        variants = {"before": _proxy(_load(args.against)), **variants}
    cases = {name: _cases(p) for name, p in variants.items()}
    for per_case in cases.values():  # warm up: caches, templates, the metric's children
        for case in per_case.values():
            await _time(case, 2000)

    results: dict[tuple[str, str], list[float]] = {}
    order = list(cases.items())
    for _ in range(args.rounds):
        for variant, per_case in order:  # interleaved: each round measures every variant
            for case_name, case in per_case.items():
                results.setdefault((case_name, variant), []).append(await _time(case, args.requests))
        order.reverse()  # A B, B A, ...: neither goes first every time

    mode = "access log on" if args.access_log else "access log off"
    print(
        f"Proxy.handle, µs per request ({args.rounds} interleaved rounds x {args.requests}; {mode}): median [min-max]"
    )
    for case_name in ("refusal", "forwarded"):
        line = [f"  {case_name:<10}"]
        for variant in cases:
            rounds = results[(case_name, variant)]
            line.append(f"{variant}: {statistics.median(rounds):6.2f} [{min(rounds):.2f}-{max(rounds):.2f}]")
        if "before" in cases:
            # Paired: each round's two measurements ran back to back, so their ratio cancels drift.
            pairs = zip(results[(case_name, "now")], results[(case_name, "before")], strict=True)
            changes = [(now / before - 1) * 100 for now, before in pairs]
            line.append(
                f"change per round: {statistics.median(changes):+.1f}% [{min(changes):+.1f}..{max(changes):+.1f}]"
            )
        print("   ".join(line))


if __name__ == "__main__":
    main()
