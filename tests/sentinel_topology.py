"""A real Redis Sentinel topology for tests: one master, its replicas and three sentinels, each a
Debian `redis-server` / `redis-sentinel` process on a free loopback port.

`topology()` starts them and waits until every sentinel knows the master, every replica and the
other sentinels (so a failover can be agreed on); `master_port()` asks the sentinels which server
is master now.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.conftest import PortTaken, RedisProcess, free_port

MASTER_NAME = "gwmaster"
DOWN_AFTER_MS = 1000  # a master silent this long is down (subjectively; a quorum makes it so objectively)
FAILOVER_TIMEOUT_MS = 4000


def sentinel_binary() -> list[str]:
    if (found := shutil.which("redis-sentinel")) is not None:
        return [found]
    if (server := shutil.which("redis-server")) is not None:
        return [server, "--sentinel"]  # the same program
    pytest.fail("redis-sentinel is not installed: `make test` installs it (apt-get install redis-sentinel)")


@dataclass
class SentinelProcess:
    port: int
    workdir: Path
    master_port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / f"sentinel-{self.port}.conf"  # Sentinel rewrites its file: one each
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 2\n"
        )
        self.proc = subprocess.Popen(
            [*sentinel_binary(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Topology:
    master: RedisProcess
    replicas: list[RedisProcess]
    sentinels: list[SentinelProcess]
    stopped: list[RedisProcess] = field(default_factory=list)  # SIGSTOPped: SIGCONT before killing

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    @property
    def servers(self) -> list[RedisProcess]:
        return [self.master, *self.replicas]

    def master_port(self) -> int | None:
        """The master's port as a majority of the sentinels name it now; None without a majority."""
        votes: dict[int, int] = {}
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError, OSError):
                with sentinel.client() as client:
                    reply = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
                if reply:
                    port = int(reply[1])
                    votes[port] = votes.get(port, 0) + 1
        winner = max(votes, key=lambda p: votes[p], default=None)
        return winner if winner is not None and votes[winner] >= 2 else None

    def freeze_master(self) -> None:
        assert self.master.proc is not None
        self.master.proc.send_signal(signal.SIGSTOP)
        self.stopped.append(self.master)

    def thaw(self) -> None:
        for server in self.stopped:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)
        self.stopped.clear()


def _start_redis(workdir: Path, name: str, extra: list[str]) -> RedisProcess:
    for attempt in range(5):
        server = RedisProcess(free_port(), workdir / name, extra=extra)
        try:
            server.start()
        except PortTaken:
            if attempt == 4:
                raise
            continue
        return server
    raise AssertionError("unreachable")


def _online(replication: dict[str, object]) -> int:
    """How many replicas INFO replication shows in sync ('online', not still loading the first copy)."""
    states = [v.get("state") for k, v in replication.items() if k.startswith("slave") and isinstance(v, dict)]
    return states.count("online")


def _wait(what: str, seconds: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        time.sleep(0.1)
    raise AssertionError(f"the sentinel topology did not come up: {what}")


@contextlib.contextmanager
def topology(workdir: Path, replicas: int = 2) -> Iterator[Topology]:
    """One master with AOF, `replicas` replicas of it, three sentinels; all gone afterwards."""
    # AOF on every server; a replica's first sync starts at once (Redis 7 waits 5 s by default for
    # more replicas to share a diskless transfer).
    aof = ["--appendonly", "yes", "--appendfsync", "everysec", "--repl-diskless-sync-delay", "0"]
    master = _start_redis(workdir, "master", aof)
    started: list[RedisProcess] = [master]
    sentinels: list[SentinelProcess] = []
    try:
        for i in range(replicas):
            started.append(_start_redis(workdir, f"replica{i}", [*aof, "--replicaof", "127.0.0.1", str(master.port)]))
        with redis.Redis(port=master.port, socket_timeout=1) as client:
            _wait("replicas in sync", 20, lambda: _online(client.info("replication")) == replicas)
        for i in range(3):
            sentinel = SentinelProcess(free_port(), workdir / f"sentinel{i}", master.port)
            sentinel.start()
            sentinels.append(sentinel)
        topo = Topology(master, started[1:], sentinels)

        def every_sentinel_knows_all() -> bool:
            for s in sentinels:
                with s.client() as c:
                    known_replicas = c.execute_command("SENTINEL", "replicas", MASTER_NAME)
                    others = c.execute_command("SENTINEL", "sentinels", MASTER_NAME)
                if len(known_replicas) != replicas or len(others) != 2:
                    return False
            return True

        _wait("every sentinel knows the replicas and the other sentinels", 30, every_sentinel_knows_all)
        yield topo
        topo.thaw()
    finally:
        for server in started:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)
            server.kill()
        for sentinel in sentinels:
            sentinel.kill()
