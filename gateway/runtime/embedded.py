"""The embedded Redis (spec 2): a supervised `redis-server` child for one machine.

Bound to 127.0.0.1 on a free port, AOF with fsync on every write, data in
`redis.data_dir`. If it dies it is started again on the same port and data;
it is stopped when the gateway stops, and (on Linux) dies with its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("gateway.redis")

INSTALL_HINT: Final = (
    "redis-server was not found on PATH: install it (Debian/Ubuntu: apt-get install redis-server; "
    "macOS: brew install redis) or set redis.url to an existing Redis"
)


class MissingRedis(RuntimeError):
    pass


def find_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise MissingRedis(INSTALL_HINT)
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    def __init__(self, data_dir: Path, binary: str | None = None, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.binary = binary or find_binary()
        self.port = port or free_port()
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip

    async def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        await self._wait_ready()

    async def _wait_ready(self, seconds: float = 15.0) -> None:
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            deadline = asyncio.get_running_loop().time() + seconds
            while True:
                if self._proc is not None and self._proc.returncode is not None:
                    raise RuntimeError(
                        f"redis-server exited with status {self._proc.returncode} (see {self.data_dir / 'redis.log'})"
                    )
                try:
                    if await client.ping():
                        return
                except (RedisError, OSError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {seconds:g} s")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def start(self) -> str:
        await self._spawn()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        log.info("embedded redis-server started on 127.0.0.1:%d, data in %s", self.port, self.data_dir)
        return self.url

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self._proc is not None
            status = await self._proc.wait()
            if self._stopping:
                return
            log.error("embedded redis-server exited (status %s); restarting", status)
            await asyncio.sleep(0.2)
            try:
                await self._spawn()
            except Exception as exc:
                log.error("embedded redis-server failed to restart: %s", exc)
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.info("embedded redis-server stopped")
