"""Several gateway processes on one Redis (spec 2 and 8): a disable is in force on every replica at once.

Every gateway here is a real `python -m gateway serve --config FILE` process, Redis is a real
redis-server the test starts, the upstream is a small threaded echo server in this process,
and everything listens on loopback. Each test kills what it started, in a `finally`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import redis
import yaml

from gateway.coherence.channel import Codec
from tests.conftest import AdminTokens, RedisProcess, free_port
from tests.kernel_stamps import SO_TIMESTAMPNS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
HTTP_TIMEOUT = 5.0
HEALTH_CHECK_SECONDS = 0.5
PROPAGATION_TIMEOUT = 1.0
AOF = ["--appendonly", "yes", "--appendfsync", "always"]


# the upstream ------------------------------------------------------------------------


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def arrived(self) -> None:
        """Called as each request's head is read (before its body); a subclass records it here."""

    def _answer(self) -> None:
        self.arrived()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"upstream": "echo", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@contextlib.contextmanager
def serving(
    handler: type[BaseHTTPRequestHandler], stop_timeout: float = STOP_TIMEOUT, *, stamped: bool = False
) -> Iterator[str]:
    """`handler` on a loopback port in a thread; yields its URL. `stamped`: the kernel stamps every
    segment as it arrives, from a connection's first (tests/kernel_stamps.py)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if stamped:  # accepted sockets inherit it, so no segment arrives unstamped
        server.socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=stop_timeout)


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[str]:
    with serving(EchoHandler) as url:
        yield url


# HTTP ------------------------------------------------------------------------------------


def request(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    timeout: float = HTTP_TIMEOUT,
) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        h = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data, headers=h)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def error_code(raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def metric(text: str, sample: str) -> float:
    """The value of one sample line in Prometheus text (0 when the labelled series does not exist yet)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def invalidations(text: str, outcome: str) -> float:
    return metric(text, f'gateway_invalidations_total{{outcome="{outcome}"}}')


# gateway processes --------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """The test's environment without any GATEWAY_* override that could change the config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Node:
    """One `gateway serve` process (with --workers: the supervising parent) and its two listeners."""

    name: str
    proc: subprocess.Popen[bytes]
    proxy_url: str
    admin_url: str
    log: Path
    tokens: AdminTokens

    def proxy(self, key: str, path: str = "/api/hello", *, close: bool = False) -> tuple[int, str | None]:
        headers = {"Authorization": f"Bearer {key}"}
        if close:
            headers["Connection"] = "close"
        status, raw = request("GET", self.proxy_url + path, headers=headers)
        if status == 200:
            assert json.loads(raw)["upstream"] == "echo", raw
        return status, error_code(raw)

    def admin(self, method: str, path: str, body: Any = None, *, role: str = "developer") -> tuple[int, Any]:
        token = getattr(self.tokens, role)
        status, raw = request(method, self.admin_url + path, headers={"Authorization": f"Bearer {token}"}, body=body)
        return status, json.loads(raw)

    def ready(self) -> bool:
        try:
            return request("GET", self.admin_url + "/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def readyz(self) -> int:
        return request("GET", self.admin_url + "/readyz")[0]

    def metrics(self) -> str:
        status, raw = request("GET", self.admin_url + "/metrics")
        assert status == 200
        return raw.decode()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_gateway(
    workdir: Path, name: str, raw: dict[str, Any], tokens: AdminTokens, *args: str, env: dict[str, str] | None = None
) -> Node:
    """`gateway serve` on `raw` as its config file; `env` adds environment variables."""
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
            cwd=ROOT,
            env={**base_env(), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: workers of --workers die with it
        )
    return Node(
        name,
        proc,
        f"http://127.0.0.1:{raw['listen']['port']}",
        f"http://127.0.0.1:{raw['admin']['listen']['port']}",
        log,
        tokens,
    )


def stop_gateway(node: Node) -> None:
    """SIGKILL the process group this test started (SIGCONT first, in case it was frozen)."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.proc.wait(timeout=STOP_TIMEOUT)


def wait_until(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def wait_ready(node: Node, seconds: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not node.ready():
        if node.proc.poll() is not None:
            raise AssertionError(f"{node.name} exited with {node.proc.returncode}:\n{node.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name}: /readyz never answered 200:\n{node.output()}")
        time.sleep(0.05)


def gateway_config(
    upstream_url: str,
    tokens: AdminTokens,
    redis_url: str,
    prefix: str,
    *,
    secret: str | None = None,
    health_check_seconds: float = HEALTH_CHECK_SECONDS,
) -> dict[str, Any]:
    redis_section: dict[str, Any] = {
        "url": redis_url,
        "prefix": prefix,
        "health_check_seconds": health_check_seconds,
    }
    if secret is not None:
        redis_section["channel_secret"] = secret
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "tokens": tokens.entries,
            "propagation_timeout_seconds": PROPAGATION_TIMEOUT,
        },
        "redis": redis_section,
        "cache": {"ttl_seconds": 30},
        "routes": [{"name": "api", "path_prefix": "/api", "upstream": upstream_url}],
    }


@dataclass
class Cluster:
    nodes: list[Node]
    redis_url: str
    prefix: str
    secret: str | None
    tokens: AdminTokens

    def create_key(self, via: int = 0) -> dict[str, Any]:
        status, body = self.nodes[via].admin("POST", "/v1/keys", {"name": "replicas-test", "owner": "acme"})
        assert status == 201, body
        return body

    def disable(self, key_id: str, via: int = 0) -> tuple[int, Any]:
        return self.nodes[via].admin("POST", f"/v1/keys/{key_id}/disable", {"reason": "replicas test"})

    def cache_everywhere(self, key: str) -> None:
        """A successful request on every replica, so each one holds the key in its cache."""
        for node in self.nodes:
            assert node.proxy(key) == (200, None), node.name

    def wait_all_ready(self, seconds: float = 15.0) -> None:
        for node in self.nodes:
            wait_ready(node, seconds)

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=1)

    def live_replicas(self) -> int:
        client = self.redis_client()
        try:
            now = time.time() * 1000
            return int(client.zcount(self.prefix + "replicas", now, "+inf"))
        finally:
            client.close()


@contextlib.contextmanager
def running_cluster(
    workdir: Path,
    upstream_url: str,
    tokens: AdminTokens,
    redis_url: str,
    *,
    count: int = 3,
    secret: str | None = None,
    health_check_seconds: float = HEALTH_CHECK_SECONDS,
) -> Iterator[Cluster]:
    """`count` gateway processes on one Redis and one prefix, each ready (/readyz 200) before the yield."""
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = f"rep{secrets.token_hex(4)}:"
    nodes: list[Node] = []
    try:
        for i in range(count):
            raw = gateway_config(
                upstream_url, tokens, redis_url, prefix, secret=secret, health_check_seconds=health_check_seconds
            )
            nodes.append(start_gateway(workdir, f"replica{i}", raw, tokens))
        cluster = Cluster(nodes, redis_url, prefix, secret, tokens)
        cluster.wait_all_ready(START_TIMEOUT)
        wait_until(lambda: cluster.live_replicas() == count, 10, "not every replica joined the live set")
        yield cluster
    finally:
        for node in nodes:
            stop_gateway(node)


@contextlib.contextmanager
def redis_process(data_dir: Path, *, port: int | None = None, extra: list[str] | None = None) -> Iterator[RedisProcess]:
    server = RedisProcess(port or free_port(), data_dir, extra=list(extra or []))
    try:
        server.start()
        yield server
    finally:
        server.kill()


# traffic ---------------------------------------------------------------------------------


@dataclass
class Sent:
    at: float  # time.monotonic() just before the request was written
    status: int
    code: str | None


@dataclass
class Hammer:
    """One thread, one keep-alive connection, the same key again and again; every answer recorded."""

    node: Node
    key: str
    stop: threading.Event
    pause: float = 0.0  # between one answer and the next request (0: back to back)
    sent: list[Sent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"hammer-{self.node.name}", daemon=True)
        self.thread.start()

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(timeout=HTTP_TIMEOUT * 2)
        assert not self.thread.is_alive(), "a traffic thread did not stop"

    def _run(self) -> None:
        parts = urlsplit(self.node.proxy_url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=HTTP_TIMEOUT)
        headers = {"Authorization": f"Bearer {self.key}"}
        try:
            while not self.stop.is_set():
                at = time.monotonic()
                try:
                    conn.request("GET", "/api/hammer", headers=headers)
                    response = conn.getresponse()
                    raw = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.errors.append(f"{self.node.name}: {exc!r}")
                    conn.close()
                    time.sleep(0.01)
                    continue
                self.sent.append(Sent(at, response.status, error_code(raw)))
                if self.pause:
                    self.stop.wait(self.pause)
        except BaseException as exc:  # never let a thread die silently
            self.errors.append(f"{self.node.name}: unexpected {exc!r}")
        finally:
            conn.close()


@contextlib.contextmanager
def hammering(targets: list[tuple[Node, str]], pause: float = 0.0) -> Iterator[list[Hammer]]:
    stop = threading.Event()
    hammers = [Hammer(node, key, stop, pause) for node, key in targets]
    for hammer in hammers:
        hammer.start()
    try:
        yield hammers
    finally:
        stop.set()
        for hammer in hammers:
            hammer.join()


# fixtures ---------------------------------------------------------------------------------

CHANNEL_SECRET = "replicas-test-channel-secret-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def shared_cluster(
    tmp_path_factory: pytest.TempPathFactory, echo_upstream: str, admin_tokens: AdminTokens
) -> Iterator[Cluster]:
    """Three replicas on one redis-server, channel messages signed, for the tests that leave it whole."""
    workdir = tmp_path_factory.mktemp("cluster")
    with (
        redis_process(workdir / "redis") as server,
        running_cluster(workdir, echo_upstream, admin_tokens, server.url, secret=CHANNEL_SECRET) as cluster,
    ):
        yield cluster


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Cluster:
    """The shared cluster, checked whole and steady: every process alive, ready and in the live set."""
    for node in shared_cluster.nodes:
        assert node.proc.poll() is None, f"{node.name} died:\n{node.output()}"
    shared_cluster.wait_all_ready(15)
    wait_until(lambda: shared_cluster.live_replicas() == 3, 10, "not every replica is in the live set")
    return shared_cluster


# tests ---------------------------------------------------------------------------------------


def test_a_disable_through_any_replica_is_confirmed_by_all_three_and_the_next_request_on_each_is_refused(
    cluster: Cluster,
) -> None:
    for i in range(20):
        created = cluster.create_key(via=i % 3)
        key = created["key"]
        cluster.cache_everywhere(key)

        status, body = cluster.disable(created["id"], via=i % 3)
        assert status == 200, body
        assert body["enabled"] is False
        assert body["propagation"]["replicas"] == 3, (i, body["propagation"])
        assert body["propagation"]["confirmed"] == 3, (i, body["propagation"])

        for node in cluster.nodes:
            assert node.proxy(key) == (403, "key_disabled"), (i, node.name)


def test_under_load_on_two_replicas_no_request_sent_after_the_disable_answer_is_forwarded(cluster: Cluster) -> None:
    created = cluster.create_key()
    key = created["key"]
    cluster.cache_everywhere(key)
    a, b, c = cluster.nodes
    with hammering([(b, key), (b, key), (c, key), (c, key)]) as hammers:
        wait_until(
            lambda: all(sum(s.status == 200 for s in h.sent) >= 20 for h in hammers),
            10,
            "the traffic threads did not get going",
        )
        status, body = cluster.disable(created["id"], via=0)
        returned = time.monotonic()
        assert status == 200, body
        assert (body["propagation"]["replicas"], body["propagation"]["confirmed"]) == (3, 3), body["propagation"]
        wait_until(
            lambda: all(sum(s.at > returned for s in h.sent) >= 20 for h in hammers),
            10,
            "the traffic threads stopped sending after the disable",
        )

    for hammer in hammers:
        assert hammer.errors == []
        before = [s for s in hammer.sent if s.at <= returned]
        after = [s for s in hammer.sent if s.at > returned]
        assert any(s.status == 200 for s in before)
        assert {(s.status, s.code) for s in before} <= {(200, None), (403, "key_disabled")}
        forwarded = [s for s in after if (s.status, s.code) != (403, "key_disabled")]
        assert forwarded == [], (
            f"{hammer.node.name}: {len(forwarded)} of {len(after)} requests sent "
            f"{(forwarded[0].at - returned) * 1000:.1f} ms or more after the disable answer were not refused: "
            f"{forwarded[:3]}"
        )
    assert a.proxy(key) == (403, "key_disabled")


def test_forged_and_garbage_channel_messages_are_ignored_and_counted_and_a_signed_one_is_applied(
    cluster: Cluster,
) -> None:
    created = cluster.create_key()
    key = created["key"]
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    cluster.cache_everywhere(key)
    before = [node.metrics() for node in cluster.nodes]

    evict = {"t": "e", "n": "forged" + secrets.token_hex(4), "o": "r_attacker", "k": [[key_hash, 99]]}

    def signed(payload: bytes) -> bytes:
        return hmac.new(CHANNEL_SECRET.encode(), payload, hashlib.sha256).hexdigest().encode() + b"." + payload

    garbage = bytes(b for b in os.urandom(256) if b != ord("."))
    forged = {
        "unsigned": [b"." + orjson.dumps(evict)],
        "bad_signature": [Codec("not-the-channel-secret").evict(evict["n"], "r_attacker", [(key_hash, 99)])],
        "malformed": [
            garbage,
            orjson.dumps(evict),  # no "<mac>." wrapper at all
            signed(orjson.dumps({"t": "e", "n": "x1", "o": "r_attacker", "k": key_hash})),
            signed(orjson.dumps([["e", key_hash]])),
        ],
    }
    channel = cluster.prefix + "events"
    client = cluster.redis_client()
    try:
        for messages in forged.values():
            for message in messages:
                assert client.publish(channel, message) == 3  # every replica is subscribed and receives it

        def counted() -> bool:
            texts = [node.metrics() for node in cluster.nodes]
            return all(
                invalidations(now, "ignored_" + reason) - invalidations(then, "ignored_" + reason) == len(messages)
                for now, then in zip(texts, before, strict=True)
                for reason, messages in forged.items()
            )

        wait_until(counted, 5, "the replicas did not count every forged or garbage message as ignored")
        for node, then in zip(cluster.nodes, before, strict=True):
            now = node.metrics()
            assert invalidations(now, "applied") == invalidations(then, "applied"), node.name
            assert metric(now, "gateway_cache_coherent") == 1.0, node.name
            assert node.ready(), node.name
            assert node.proxy(key) == (200, None), node.name

        # The real thing, signed with the shared secret, is applied by every replica (and only once).
        real = Codec(CHANNEL_SECRET).evict("real" + secrets.token_hex(4), "r_test", [(key_hash, 1)])
        assert client.publish(channel, real) == 3

        def applied() -> bool:
            return all(
                invalidations(node.metrics(), "applied") >= invalidations(then, "applied") + 1
                for node, then in zip(cluster.nodes, before, strict=True)
            )

        wait_until(applied, 5, "a correctly signed evict message was not applied by every replica")
        for node, then in zip(cluster.nodes, before, strict=True):
            assert invalidations(node.metrics(), "applied") == invalidations(then, "applied") + 1, node.name
            assert node.ready(), node.name
            assert node.proxy(key) == (200, None), node.name  # evicted, read again from Redis: still enabled
    finally:
        client.close()


def test_a_disable_right_after_every_subscription_is_killed_is_refused_by_every_replica(cluster: Cluster) -> None:
    client = cluster.redis_client()
    try:
        for i in range(3):
            cluster.wait_all_ready(15)
            created = cluster.create_key()
            key = created["key"]
            cluster.cache_everywhere(key)

            killed = client.client_kill_filter(_type="pubsub")
            status, body = cluster.disable(created["id"], via=i)
            assert killed == 3
            assert status == 200, body
            assert body["enabled"] is False
            for node in cluster.nodes:
                assert node.proxy(key) == (403, "key_disabled"), (i, node.name, body["propagation"])
    finally:
        client.close()
    cluster.wait_all_ready(15)  # and they all come back


def test_redis_killed_mid_traffic_fails_closed_with_503_and_recovers_when_it_returns_without_a_gateway_restart(
    tmp_path: Path, echo_upstream: str, admin_tokens: AdminTokens
) -> None:
    with (
        redis_process(tmp_path / "redis", extra=AOF) as server,
        running_cluster(tmp_path, echo_upstream, admin_tokens, server.url) as cluster,
    ):
        client = cluster.redis_client()
        try:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
        finally:
            client.close()
        created = cluster.create_key()
        key = created["key"]
        cluster.cache_everywhere(key)
        pids = [node.proc.pid for node in cluster.nodes]
        replacement: RedisProcess | None = None
        try:
            with hammering([(node, key) for node in cluster.nodes]) as hammers:
                wait_until(
                    lambda: all(sum(s.status == 200 for s in h.sent) >= 10 for h in hammers),
                    10,
                    "the traffic threads did not get going",
                )
                server.kill()  # SIGKILL, and reaped: Redis is gone
                killed = time.monotonic()
                # The key is in every replica's cache, but serve_stale_seconds is 0: fail closed at once.
                for node in cluster.nodes:
                    assert node.proxy(key) == (503, "auth_unavailable"), node.name
                    assert node.readyz() == 503, node.name
                wait_until(
                    lambda: all(sum(s.at > killed for s in h.sent) >= 10 for h in hammers),
                    10,
                    "the traffic threads stopped sending after Redis died",
                )

            for hammer in hammers:
                assert hammer.errors == []
                outcomes = {(s.status, s.code) for s in hammer.sent}
                assert outcomes <= {(200, None), (503, "auth_unavailable")}, outcomes
                late = [s for s in hammer.sent if s.at > killed and (s.status, s.code) != (503, "auth_unavailable")]
                assert late == [], f"{hammer.node.name} answered {late[:3]} after Redis was killed"

            # Redis comes back on the same port and data; the very same gateway processes recover.
            replacement = RedisProcess(server.port, server.data_dir, extra=AOF)
            replacement.start()
            cluster.wait_all_ready(15)
            for node in cluster.nodes:
                assert node.proxy(key) == (200, None), node.name
            assert [node.proc.pid for node in cluster.nodes] == pids
            assert all(node.proc.poll() is None for node in cluster.nodes)
            status, body = cluster.disable(created["id"], via=1)
            assert status == 200, body
            assert (body["propagation"]["replicas"], body["propagation"]["confirmed"]) == (3, 3), body["propagation"]
            for node in cluster.nodes:
                assert node.proxy(key) == (403, "key_disabled"), node.name
        finally:
            if replacement is not None:
                replacement.kill()


def test_a_disable_answered_just_before_redis_is_killed_is_still_in_force_after_redis_restarts(
    tmp_path: Path, echo_upstream: str, admin_tokens: AdminTokens
) -> None:
    with (
        redis_process(tmp_path / "redis", extra=AOF) as server,
        running_cluster(tmp_path, echo_upstream, admin_tokens, server.url) as cluster,
    ):
        created = cluster.create_key()
        key = created["key"]
        cluster.cache_everywhere(key)
        status, body = cluster.disable(created["id"], via=2)
        assert status == 200, body
        server.kill()
        replacement = RedisProcess(server.port, server.data_dir, extra=AOF)
        try:
            for node in cluster.nodes:
                assert node.proxy(key) == (503, "auth_unavailable"), node.name
            replacement.start()
            cluster.wait_all_ready(15)
            for node in cluster.nodes:
                assert node.proxy(key) == (403, "key_disabled"), node.name
            status, record = cluster.nodes[0].admin("GET", f"/v1/keys/{created['id']}", role="viewer")
            assert status == 200, record
            assert record["enabled"] is False
            assert record["disabled_reason"] == "replicas test"
        finally:
            replacement.kill()


def test_two_workers_on_one_port_both_honour_a_disable(
    tmp_path: Path, echo_upstream: str, admin_tokens: AdminTokens
) -> None:
    with redis_process(tmp_path / "redis") as server:
        prefix = f"workers{secrets.token_hex(4)}:"
        raw = gateway_config(echo_upstream, admin_tokens, server.url, prefix)
        node = start_gateway(tmp_path, "workers", raw, admin_tokens, "--workers", "2")
        cluster = Cluster([node], server.url, prefix, None, admin_tokens)
        try:
            wait_ready(node)
            wait_until(lambda: cluster.live_replicas() == 2, 15, f"two workers did not join:\n{node.output()}")
            created = cluster.create_key()
            key = created["key"]
            # SO_REUSEPORT spreads fresh connections over both workers: each caches the key.
            for _ in range(20):
                assert node.proxy(key, close=True) == (200, None)

            status, body = cluster.disable(created["id"])
            assert status == 200, body
            assert (body["propagation"]["replicas"], body["propagation"]["confirmed"]) == (2, 2), body["propagation"]
            for _ in range(20):
                assert node.proxy(key, close=True) == (403, "key_disabled")
        finally:
            stop_gateway(node)


def test_a_frozen_replica_does_not_hang_a_disable_and_refuses_the_key_once_it_resumes(
    tmp_path: Path, echo_upstream: str, admin_tokens: AdminTokens
) -> None:
    # A health-check interval long enough that the frozen replica stays in the live set (its
    # heartbeat lasts 3 intervals) for the whole wait: the answer must then come from the timeout.
    with (
        redis_process(tmp_path / "redis") as server,
        running_cluster(tmp_path, echo_upstream, admin_tokens, server.url, health_check_seconds=3) as cluster,
    ):
        created = cluster.create_key()
        key = created["key"]
        cluster.cache_everywhere(key)
        frozen = cluster.nodes[2]
        unconfirmed_before = metric(cluster.nodes[0].metrics(), "gateway_propagation_unconfirmed_total")
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            status, body = cluster.disable(created["id"], via=0)
            elapsed = time.monotonic() - started
            assert status == 200, body
            assert body["propagation"]["replicas"] == 3, body["propagation"]
            assert body["propagation"]["confirmed"] == 2, body["propagation"]
            assert body["propagation"]["fenced"] == 1, body["propagation"]  # its lease lapsed before the answer
            assert elapsed < PROPAGATION_TIMEOUT + 1.5, elapsed
            assert body["propagation"]["ms"] >= PROPAGATION_TIMEOUT * 1000 * 0.9, body["propagation"]
            unconfirmed = metric(cluster.nodes[0].metrics(), "gateway_propagation_unconfirmed_total")
            assert unconfirmed == unconfirmed_before + 1
            for node in cluster.nodes[:2]:
                assert node.proxy(key) == (403, "key_disabled"), node.name
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
        assert frozen.proxy(key) == (403, "key_disabled")
        wait_ready(frozen, 15)
        assert frozen.proxy(key) == (403, "key_disabled")
