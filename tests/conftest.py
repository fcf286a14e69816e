"""Fixtures: real redis-server processes, a real upstream HTTP server, a real gateway on loopback.

- `redis_server`: one redis-server per test session on a free port (tests isolate by prefix). Under
  pytest-xdist each worker is a session of its own, so each worker has its own redis-server.
- `upstream`: an aiohttp echo server (tests/upstream_app.py) on a free port.
- `gw`: a gateway replica (proxy + admin listeners) built from a Config around them.
- `admin_tokens`: the admin tokens every gateway under test is configured with, hashed with cheap
  argon2id parameters (verification reads the parameters from the hash, so checking them is cheap
  and still real argon2id). tests/test_admin_hardening.py keeps hashes with the production parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from argon2 import PasswordHasher
from redis.asyncio import Redis
from redis.exceptions import RedisError
from yarl import URL

from gateway import config as config_mod
from gateway.h1 import server as http1
from gateway.runtime.replica import Replica, build
from gateway.runtime.serve import listen_client
from tests.upstream_app import make_upstream

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _own_ports() -> list[int]:
    """This process's share of the ports outside the kernel's ephemeral range, in a random order:
    each pytest-xdist worker its own slice, so two workers never hand out the same port."""
    low, high = _ephemeral_range()
    ports = [p for p in range(10_000, 65_000) if not low <= p <= high]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) if worker.isdigit() else 0
    mine = ports[index::count] if count > 1 else ports
    secrets.SystemRandom().shuffle(mine)
    return mine


_PORTS = _own_ports()
_next_port = 0


def free_port() -> int:
    """A free loopback port for a server a test starts. Not one the kernel hands out (bind to port
    0): that can be taken, before the server binds it, as the source port of any outgoing
    connection (the suite makes thousands). Each worker takes ports from a slice of its own outside
    the ephemeral range, never the same one twice (a server a test stopped may still be closing)."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port % len(_PORTS)]
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in this worker's range")


class PortTaken(RuntimeError):
    """The server could not bind its port."""


def _redis_pid(port: int) -> int | None:
    """The process id of the redis-server answering on `port` (INFO server), None when it is not ready."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"INFO server\r\n")
        data = b""
        while b"\r\n" not in data or len(data) < int(data[1 : data.index(b"\r\n")] or 0) + data.index(b"\r\n") + 2:
            chunk = s.recv(65536)
            if not chunk:
                return None
            data += chunk
            if not data.startswith(b"$"):
                return None  # an error such as -LOADING
    match = re.search(rb"process_id:(\d+)", data)
    return int(match[1]) if match else None


@dataclass
class RedisProcess:
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts redis-server and waits until it answers. Raises PortTaken when it could not bind:
        the port may be taken between free_port() and the bind (by another xdist worker, say)."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PortTaken(f"redis-server exited ({self.proc.returncode}): port {self.port} taken?")
            try:
                # Our own process answers, not another one that holds the port.
                if _redis_pid(self.port) == self.proc.pid:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """This session's (this xdist worker's) redis-server."""
    data_dir = tmp_path_factory.mktemp("redis")
    for attempt in range(5):
        server = RedisProcess(free_port(), data_dir)
        try:
            server.start()
        except PortTaken:
            if attempt == 4:
                raise
            continue
        break
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=1)
    yield client
    await client.aclose()


# argon2id with the least work it allows: the hash is a real argon2id hash (the config accepts it,
# the verifier checks it with argon2), only cheap to check. gateway hash-token keeps the production
# parameters (argon2-cffi's defaults, RFC 9106 low-memory); tests/test_admin_hardening.py uses those.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def cheap_hash(token: str) -> str:
    """An argon2id hash of `token` that takes microseconds to verify."""
    return CHEAP_HASHER.hash(token)


@dataclass(frozen=True)
class AdminTokens:
    viewer: str
    developer: str
    admin: str
    entries: list[dict[str, str]]


@pytest.fixture(scope="session")
def admin_tokens() -> AdminTokens:
    """Tokens shaped gwadm_<id>_<secret> (spec 7). The viewer's and developer's entries carry
    their id; the admin's is a legacy entry (no id), so every gateway under test runs the
    migration case: both kinds in one config."""
    tokens = {role: f"gwadm_{role}_" + secrets.token_urlsafe(24) for role in ("viewer", "developer", "admin")}
    entries = [
        {"name": f"ops-{role}", "role": role, "hash": cheap_hash(tok), **({"id": role} if role != "admin" else {})}
        for role, tok in tokens.items()
    ]
    return AdminTokens(tokens["viewer"], tokens["developer"], tokens["admin"], entries)


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    server = TestServer(make_upstream(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


def make_config(
    *,
    redis_url: str,
    upstream_url: str,
    tokens: list[dict[str, str]],
    overrides: dict[str, Any] | None = None,
) -> config_mod.Config:
    """A config dict like an operator's file, validated by the real loader."""
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"listen": {"host": "127.0.0.1", "port": 0}, "tokens": tokens},
        "redis": {"url": redis_url, "prefix": f"t{secrets.token_hex(4)}:"},
        "cache": {"ttl_seconds": 30, "negative_ttl_seconds": 2},
        "routes": [
            {"name": "billing", "path_prefix": "/billing", "upstream": upstream_url, "scopes": ["billing:read"]},
            {"name": "api", "path_prefix": "/api", "upstream": upstream_url},
            {
                "name": "api-stripped",
                "path_prefix": "/stripped",
                "upstream": upstream_url + "/base",
                "strip_prefix": True,
            },
            {"name": "get-only", "path_prefix": "/readonly", "upstream": upstream_url, "methods": ["GET"]},
            {"name": "public", "path_prefix": "/public", "upstream": upstream_url, "auth": "none"},
            {"name": "with-auth", "path_prefix": "/passauth", "upstream": upstream_url, "forward_authorization": True},
            {"name": "slow", "path_prefix": "/slowroute", "upstream": upstream_url, "timeout_seconds": 0.3},
            {"name": "dead", "path_prefix": "/dead", "upstream": "http://127.0.0.1:1"},
        ],
    }
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    import yaml

    return config_mod.parse(yaml.safe_dump(raw), source="<test>")


class ProxyTestServer:
    """The replica's own proxy listener (gateway/h1/server.py) on a free loopback port."""

    def __init__(self, server: http1.Server) -> None:
        self.server = server
        self.host = "127.0.0.1"
        self.port = 0

    async def start_server(self) -> None:
        await self.server.start(self.host, 0)
        self.port = self.server.port

    def make_url(self, path: str) -> URL:
        return URL(f"http://{self.host}:{self.port}{path}")

    async def close(self) -> None:
        await self.server.shutdown(0)


@dataclass
class Gateway:
    replica: Replica
    proxy: ProxyTestServer
    admin: TestServer
    session: aiohttp.ClientSession
    tokens: AdminTokens
    verify: ProxyTestServer | None = None  # the verify listener, when the config has a `verify` section

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def verify_url(self) -> str:
        assert self.verify is not None, "this gateway's config has no verify section"
        return f"http://127.0.0.1:{self.verify.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin.port}"

    async def call(
        self, method: str, path: str, *, key: str | None = None, headers: dict[str, str] | None = None, **kw: Any
    ) -> aiohttp.ClientResponse:
        """A request to the proxy; `key` becomes the bearer credential."""
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        return await self.session.request(method, self.proxy_url + path, headers=h, allow_redirects=False, **kw)

    async def admin_call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "admin",
        json: Any = None,
        **kw: Any,
    ) -> aiohttp.ClientResponse:
        """A request to the admin API; `token` is a role name (its token is used) or a raw token."""
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {getattr(self.tokens, token, token)}"
        return await self.session.request(method, self.admin_url + path, headers=headers, json=json, **kw)

    async def create_key(self, **body: Any) -> dict[str, Any]:
        async with await self.admin_call("POST", "/v1/keys", token="developer", json=body) as r:
            assert r.status == 201, await r.text()
            data: dict[str, Any] = await r.json()
            return data


async def start_replica(cfg: config_mod.Config, stack: contextlib.AsyncExitStack, **build_kw: Any) -> Replica:
    """Build a replica around its own Redis clients and run its subscriber until `stack` closes.

    When Redis answers, waits (bounded) until the subscription is live, so a test
    starts from the steady state; a test of an unreachable Redis starts at once.
    """
    url = cfg.redis.url or ""
    client = Redis.from_url(url, socket_timeout=1, socket_connect_timeout=0.5)
    listener = listen_client(url)
    stack.push_async_callback(client.aclose)
    stack.push_async_callback(listener.aclose)
    replica = build(cfg, client, listener, **build_kw)
    await stack.enter_async_context(replica.running())
    try:
        reachable = bool(await client.ping())
    except (RedisError, OSError):
        reachable = False
    if reachable:
        deadline = time.monotonic() + 5
        # The steady state: subscribed, and the key filter built (when it is on).
        while not replica.coherence.coherent or (replica.lookup.known.enabled and not replica.lookup.known.ready):
            assert time.monotonic() < deadline, "the invalidation subscription (or the key filter) did not come up"
            await asyncio.sleep(0.005)
    return replica


async def command_calls(redis: Redis, command: str) -> int:
    """How many times the redis-server has run `command` (lower case), scripts' calls included
    (INFO commandstats): a test counts what a replica asked of Redis between two reads of it."""
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def get_calls(redis: Redis) -> int:
    """GETs run so far: reading a key is one GET (store.get_by_hash)."""
    return await command_calls(redis, "get")


async def migrations_over(*replicas: Replica, seconds: float = 15.0) -> None:
    """Wait until each replica's startup layout migrations (runtime/replica.py `_migrate`) have
    ended: they SCAN the database and run a script that GETs, so a test that counts Redis commands
    server-wide must not start counting before (`gateway_layout_migration_pending` is 0)."""
    deadline = time.monotonic() + seconds
    for replica in replicas:
        while replica.metrics.registry.get_sample_value("gateway_layout_migration_pending") != 0:
            assert time.monotonic() < deadline, "the startup layout migration did not end"
            await asyncio.sleep(0.01)


async def serve_replica(
    replica: Replica, stack: contextlib.AsyncExitStack, tokens: AdminTokens, **session_kw: Any
) -> Gateway:
    """The replica's proxy, admin (and verify) listeners on free loopback ports and a client session
    (`session_kw` for aiohttp.ClientSession), all closed when `stack` closes."""
    proxy = ProxyTestServer(replica.proxy_server)
    admin = TestServer(replica.admin_app, host="127.0.0.1")
    await proxy.start_server()
    stack.push_async_callback(proxy.close)
    await admin.start_server()
    stack.push_async_callback(admin.close)
    verify = None
    if replica.verify_server is not None:
        verify = ProxyTestServer(replica.verify_server)
        await verify.start_server()
        stack.push_async_callback(verify.close)
    session = aiohttp.ClientSession(auto_decompress=False, **session_kw)
    stack.push_async_callback(session.close)
    return Gateway(replica, proxy, admin, session, tokens, verify)


@pytest.fixture
async def gateway_factory(
    redis_server: RedisProcess, upstream: TestServer, admin_tokens: AdminTokens
) -> AsyncIterator[Callable[..., Any]]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(redis_url: str | None = None, **overrides: Any) -> Gateway:
            cfg = make_config(
                redis_url=redis_url or redis_server.url,
                upstream_url=str(upstream.make_url("")).rstrip("/"),
                tokens=admin_tokens.entries,
                overrides=overrides,
            )
            replica = await start_replica(cfg, stack)
            return await serve_replica(replica, stack, admin_tokens)

        yield start


@pytest.fixture
async def gw(gateway_factory: Callable[..., Any]) -> Gateway:
    gateway: Gateway = await gateway_factory()
    return gateway


__all__ = [
    "Gateway",
    "PortTaken",
    "ProxyTestServer",
    "RedisProcess",
    "cheap_hash",
    "command_calls",
    "free_port",
    "get_calls",
    "make_config",
    "migrations_over",
    "web",
]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per CPU. About half of the suite's test time is waiting, and two per
    CPU ran it in ~85 s instead of ~110 s before the usage, console, rate-limit and Sentinel tests
    came; with them (a headless Chromium, 1,000 concurrent requests over three gateway processes,
    a Sentinel topology) two per CPU starved a worker past a 2 s Redis command timeout in a fresh
    CI run. Timing tests compare the kernel's receive stamps (tests/kernel_stamps.py), so this is
    about CPU for the gateways under test, not about measurement: `pytest -n 4` is fine locally."""
    return max(1, os.cpu_count() or 1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `slow` go first (in their order). Under pytest-xdist (`-n auto --dist loadfile`,
    pyproject.toml: each test file runs on one worker, so a module-scoped fixture such as the checkov
    report or the shared cluster of tests/test_replicas.py is built once) the files with the longest
    tests then start at once, each on a worker of its own, instead of ending the run with one worker
    busy and the other idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
