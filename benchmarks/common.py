"""Small helpers the benchmark scripts share: a free loopback port, a percentile, waiting for a
gateway's readiness, stopping a run's processes. Scripts run as `python benchmarks/NAME.py` and
put the repository root on `sys.path` before importing this module as `benchmarks.common`."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    """The p-th percentile by nearest rank (p in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def wait_ready(session: aiohttp.ClientSession, url: str, seconds: float = 30) -> None:
    """Poll `url` until it answers 200; give up with SystemExit after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"not ready: {url}")


def stop_processes(procs: list[subprocess.Popen[bytes]], redis: subprocess.Popen[bytes], tmp: Path) -> None:
    """SIGTERM every gateway (and helper) process, SIGKILL what has not exited in 15 s, then stop
    redis-server and remove the run's directory."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    redis.terminate()
    redis.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)
