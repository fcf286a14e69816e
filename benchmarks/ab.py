"""Two checkouts of the gateway, A against B, on one scenario: CPU per request, interleaved rounds.

    git worktree add --detach /tmp/before <commit>
    .venv/bin/python benchmarks/ab.py --a /tmp/before --b . --scenario refusal
    .venv/bin/python benchmarks/ab.py --a /tmp/before --b . --scenario proxied

Each checkout's `python -m gateway serve` runs pinned to CPU 1 with an embedded Redis; wrk (and,
for `proxied`, a minimal upstream) on CPU 0. `refusal` is `GET /api/hello` without a key (401
missing_key); `proxied` is the same request on a public route, forwarded to the upstream. Each
round measures A and B once (the order alternates), the CPU per request being the growth of the
process's utime+stime over one wrk run divided by the requests it completed; each gateway is
started for its measurement and stopped after it, so only one runs at a time. Printed: each side's
median with its range, and the median of the per-round B/A ratios with its range. Where `make bench`
compares the gateway with nginx, this compares the gateway with itself across a change.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RESPONSE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{"hello":"world"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream(port: int) -> None:
    """A minimal keep-alive upstream: one fixed answer per request head (no request bodies here)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        try:
            while data := await reader.read(65536):
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    writer.write(_RESPONSE)
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def start(checkout: Path, upstream_port: int, public: bool) -> tuple[subprocess.Popen[bytes], int]:
    tmp = Path(tempfile.mkdtemp(prefix="gw-ab-"))
    port, admin = free_port(), free_port()
    auth = ", auth: none" if public else ""
    (tmp / "gateway.yaml").write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{listen: {{host: 127.0.0.1, port: {admin}}}}}\n"
        f"redis: {{url: embedded, data_dir: {tmp}/data}}\n"
        f'routes:\n  - {{name: api, path_prefix: /api, upstream: "http://127.0.0.1:{upstream_port}"{auth}}}\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # `-m gateway` from the checkout's cwd
    argv = ["taskset", "-c", "1", sys.executable, "-m", "gateway", "serve", "--config", str(tmp / "gateway.yaml"),
            "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    time.sleep(1.5)  # subscribed and ready
    return proc, port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(proc: subprocess.Popen[bytes], port: int, seconds: int) -> float:
    url = f"http://127.0.0.1:{port}/api/hello"
    wrk = ["taskset", "-c", "0", "wrk", "-t1", "-c64"]
    subprocess.run([*wrk, "-d1s", url], capture_output=True, check=True)  # warm-up
    before = cpu_seconds(proc.pid)
    out = subprocess.run([*wrk, f"-d{seconds}s", url], capture_output=True, text=True, check=True).stdout
    used = cpu_seconds(proc.pid) - before
    found = re.search(r"(\d+) requests in", out)
    assert found is not None, out
    return used / int(found.group(1)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="the checkout measured first (e.g. before a change)")
    parser.add_argument("--b", type=Path, required=True, help="the other checkout")
    parser.add_argument("--scenario", choices=["refusal", "proxied"], default="refusal")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    up_port = free_port()
    up = subprocess.Popen(["taskset", "-c", "0", sys.executable, __file__, "--upstream", str(up_port)])
    checkouts = {"A": args.a, "B": args.b}
    results: dict[str, list[float]] = {"A": [], "B": []}
    try:
        for n in range(args.rounds):
            for side in ("A", "B") if n % 2 == 0 else ("B", "A"):
                # One gateway at a time: a second one idling on the same CPU (its Redis, its timers)
                # biased an A/A comparison by up to 15%.
                proc, port = start(checkouts[side], up_port, args.scenario == "proxied")
                try:
                    results[side].append(measure(proc, port, args.seconds))
                finally:
                    proc.terminate()
                    proc.wait()
    finally:
        up.terminate()
    for side, path in (("A", args.a), ("B", args.b)):
        v = results[side]
        print(f"{side} {path}: {statistics.median(v):.1f} us/req [{min(v):.1f}-{max(v):.1f}] over {len(v)} rounds")
    ratios = [b / a for a, b in zip(results["A"], results["B"], strict=True)]
    print(
        f"B/A per round ({args.scenario}): median {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream":
        upstream(int(sys.argv[2]))
    else:
        main()
