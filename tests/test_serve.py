"""`python -m gateway serve --config FILE` as an operator runs it (spec 2): real processes, real sockets.

Each test writes a config into tmp_path, starts an upstream and the gateway as
child processes, talks HTTP to them, and always kills what it started.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import AdminTokens, RedisProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

pytestmark = pytest.mark.slow


# processes -----------------------------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    """The test's environment without any GATEWAY_* override that could change the config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def upstream_process() -> Iterator[str]:
    """tests/upstream_app.py (the echo upstream) in a process of its own; yields its base URL."""
    port = free_port()
    code = (
        "import sys; from aiohttp import web; from tests.upstream_app import make_upstream; "
        "web.run_app(make_upstream(), host='127.0.0.1', port=int(sys.argv[1]), print=None)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(port)],
        cwd=ROOT,
        env=base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, "the test upstream exited"
            with contextlib.suppress(OSError):
                if request("GET", f"http://127.0.0.1:{port}/up", timeout=1)[0] == 200:
                    break
            assert time.monotonic() < deadline, "the test upstream did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@contextlib.contextmanager
def gateway_process(config: Path, log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m gateway serve --config FILE`, its stdout and stderr both into `log`."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            cwd=config.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


def wait_ready(proc: subprocess.Popen[bytes], admin_url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the gateway exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError):
            if request("GET", admin_url + "/readyz", timeout=1)[0] == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"/readyz never answered 200:\n{log.read_text()}")


def terminate(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=STOP_TIMEOUT)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "?")
    return state not in ("Z", "X")


def redis_children(data_dir: Path) -> list[int]:
    """Live redis-server processes working in this data dir (redis-server chdirs to its --dir and
    rewrites its command line, so the working directory is what identifies it)."""
    wanted = data_dir.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cwd = (entry / "cwd").resolve(strict=True)
        except OSError:
            continue
        if comm.startswith("redis-server") and cwd == wanted and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


# HTTP ------------------------------------------------------------------------------


def request(
    method: str, url: str, *, headers: dict[str, str] | None = None, body: Any = None, timeout: float = 5
) -> tuple[int, dict[str, str], bytes]:
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = None
        h = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        conn.request(method, "/" + path, body=data, headers=h)
        r = conn.getresponse()
        return r.status, {k: v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


class Client:
    def __init__(self, proxy_url: str, admin_url: str, tokens: AdminTokens) -> None:
        self.proxy_url = proxy_url
        self.admin_url = admin_url
        self.tokens = tokens

    def admin(self, method: str, path: str, *, token: str | None = None, body: Any = None) -> tuple[int, Any]:
        """`token` is a role name (its token is used) or a raw token; the developer's by default."""
        raw_token = getattr(self.tokens, token or "developer", token)
        status, _, raw = request(
            method, self.admin_url + path, headers={"Authorization": f"Bearer {raw_token}"}, body=body
        )
        return status, json.loads(raw)

    def proxy(self, path: str, *, key: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        status, _, raw = request("GET", self.proxy_url + path, headers=h)
        return status, json.loads(raw)


# config ----------------------------------------------------------------------------


def write_config(tmp_path: Path, upstream_url: str, tokens: AdminTokens, redis: dict[str, Any]) -> tuple[Path, Client]:
    proxy_port, admin_port = free_port(), free_port()
    raw = {
        "listen": {"host": "127.0.0.1", "port": proxy_port},
        "admin": {"listen": {"host": "127.0.0.1", "port": admin_port}, "tokens": tokens.entries},
        "redis": redis,
        "routes": [
            {"name": "api", "path_prefix": "/api", "upstream": upstream_url},
            {"name": "public", "path_prefix": "/public", "upstream": upstream_url, "auth": "none"},
            {"name": "dead", "path_prefix": "/dead", "upstream": "http://127.0.0.1:1"},
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, Client(f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}", tokens)


# tests ----------------------------------------------------------------------------


def test_embedded_mode_runs_its_own_redis_serves_keys_and_stops_it_on_sigterm(
    tmp_path: Path, admin_tokens: AdminTokens
) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "gateway.log"
    spawned: list[int] = []
    try:
        with upstream_process() as upstream_url:
            config, client = write_config(tmp_path, upstream_url, admin_tokens, {"data_dir": str(data_dir)})
            with gateway_process(config, log, base_env()) as gw:
                wait_ready(gw, client.admin_url, log)
                spawned = redis_children(data_dir)
                assert len(spawned) == 1, f"expected one redis-server child for {data_dir}, found {spawned}"
                assert parent_of(spawned[0]) == gw.pid

                status, created = client.admin("POST", "/v1/keys", body={"name": "serve", "owner": "acme"})
                assert status == 201, created
                key = created["key"]
                status, echo = client.proxy("/api/hello", key=key)
                assert status == 200, echo
                assert dict(echo["headers"])["X-Gateway-Key-Id"] == created["id"]
                assert echo["path"] == "/api/hello"
                status, body = client.proxy("/api/hello")
                assert status == 401 and body["error"]["code"] == "missing_key"

                status, disabled = client.admin("POST", f"/v1/keys/{created['id']}/disable", body={"reason": "test"})
                assert status == 200, disabled
                status, body = client.proxy("/api/hello", key=key)
                assert status == 403 and body["error"]["code"] == "key_disabled"

                assert terminate(gw) == 0, log.read_text()
                deadline = time.monotonic() + 5
                while pid_alive(spawned[0]) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not pid_alive(spawned[0]), "the embedded redis-server outlived the gateway"
                assert redis_children(data_dir) == []

            names = {p.name for p in data_dir.iterdir()}
            assert names & {"appendonlydir", "appendonly.aof"}, names

            # The table is durable: a new gateway on the same data dir still knows the key, disabled.
            with gateway_process(config, log, base_env()) as gw:
                wait_ready(gw, client.admin_url, log)
                spawned = redis_children(data_dir)
                status, body = client.proxy("/api/hello", key=key)
                assert status == 403 and body["error"]["code"] == "key_disabled"
                status, record = client.admin("GET", f"/v1/keys/{created['id']}", token="viewer")
                assert status == 200 and record["disabled_reason"] == "test"
                assert terminate(gw) == 0, log.read_text()
    finally:
        for pid in spawned:  # only if a failed assertion left the gateway's own child behind
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_embedded_mode_without_redis_server_on_path_exits_2_with_one_line_saying_how_to_install_it(
    tmp_path: Path, admin_tokens: AdminTokens
) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)
    data_dir = tmp_path / "data"
    config, _ = write_config(tmp_path, "http://127.0.0.1:9", admin_tokens, {"data_dir": str(data_dir)})
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        cwd=tmp_path,
        env=base_env(PATH=str(bare)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "redis-server" in lines[0]
    assert "install" in lines[0].lower()
    assert "Traceback" not in output
    assert redis_children(data_dir) == []


@pytest.mark.parametrize("log_level", ["info", "debug"])
def test_the_gateways_output_never_contains_keys_admin_tokens_or_bearer_headers(
    tmp_path: Path, admin_tokens: AdminTokens, redis_server: RedisProcess, log_level: str
) -> None:
    log = tmp_path / "gateway.log"
    secrets_used: list[str] = [admin_tokens.viewer, admin_tokens.developer, admin_tokens.admin]
    with upstream_process() as upstream_url:
        redis_cfg = {"url": redis_server.url, "prefix": f"serve{secrets.token_hex(4)}:"}
        config, client = write_config(tmp_path, upstream_url, admin_tokens, redis_cfg)
        with gateway_process(config, log, base_env(GATEWAY_LOGGING_LEVEL=log_level)) as gw:
            wait_ready(gw, client.admin_url, log)

            status, created = client.admin("POST", "/v1/keys", body={"name": "a", "owner": "acme"})
            assert status == 201
            key = created["key"]
            status, other = client.admin("POST", "/v1/keys", body={"name": "b", "prefix": "acme_"})
            assert status == 201
            imported = "legacy-" + secrets.token_urlsafe(24)
            status, _ = client.admin("POST", "/v1/keys", body={"key": imported})
            assert status == 201
            bad_import = "leakcheck-" + secrets.token_urlsafe(12) + " !"
            status, _ = client.admin("POST", "/v1/keys", body={"key": bad_import})
            assert status == 400
            secrets_used += [key, other["key"], imported, bad_import]

            for k in (key, other["key"], imported):
                assert client.proxy("/api/use", key=k)[0] == 200
            assert client.proxy("/dead/x", key=key)[0] == 502

            wrong_token = "gwadm_wrong_" + secrets.token_urlsafe(24)
            secrets_used.append(wrong_token)
            assert client.admin("GET", "/v1/keys", token=wrong_token)[0] == 401
            assert client.admin("POST", f"/v1/keys/{created['id']}/revoke", token="viewer")[0] == 403

            unknown = "gw_" + secrets.token_urlsafe(24)
            oversized = "gw_" + secrets.token_urlsafe(600)
            odd = "gw_" + secrets.token_urlsafe(16) + "\u00e9"
            secrets_used += [unknown, oversized[:40], odd[:20]]
            assert client.proxy("/api/x", key=unknown)[1]["error"]["code"] == "key_not_found"
            assert client.proxy("/api/x", key=oversized)[1]["error"]["code"] == "malformed_key"
            status, _, _ = request("GET", client.proxy_url + "/api/x", headers={"Authorization": f"Bearer {odd}"})
            assert status == 401
            basic = "Basic " + secrets.token_urlsafe(18)
            secrets_used.append(basic.split()[1])
            assert client.proxy("/api/x", headers={"Authorization": basic})[1]["error"]["code"] == "malformed_key"
            public_secret = "pub_" + secrets.token_urlsafe(24)
            secrets_used.append(public_secret)
            assert client.proxy("/public/x", key=public_secret)[0] == 200
            two = [("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {unknown}")]
            conn = http.client.HTTPConnection("127.0.0.1", int(client.proxy_url.rsplit(":", 1)[1]), timeout=5)
            try:
                conn.putrequest("GET", "/api/x")
                for name, value in two:
                    conn.putheader(name, value)
                conn.endheaders()
                assert conn.getresponse().status == 400
            finally:
                conn.close()

            status, rotated = client.admin("POST", f"/v1/keys/{created['id']}/rotate", body={"grace_seconds": 0})
            assert status == 201
            secrets_used.append(rotated["key"])
            assert client.proxy("/api/x", key=key)[1]["error"]["code"] == "key_expired"
            assert client.admin("POST", f"/v1/keys/{rotated['id']}/disable", body={"reason": "done"})[0] == 200
            assert client.proxy("/api/x", key=rotated["key"])[1]["error"]["code"] == "key_disabled"

            assert terminate(gw) == 0
    output = log.read_text(errors="replace")
    assert "listening" in output  # the gateway did log; it just must not log secrets
    assert "Bearer " not in output
    for secret in secrets_used:
        assert secret not in output, f"a secret ({secret[:6]}...) appears in the gateway's output"


def wait_for(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_dead_embedded_redis_is_restarted_on_the_same_data(tmp_path: Path, admin_tokens: AdminTokens) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "gateway.log"
    spawned: list[int] = []
    try:
        with upstream_process() as upstream_url:
            config, client = write_config(tmp_path, upstream_url, admin_tokens, {"data_dir": str(data_dir)})
            with gateway_process(config, log, base_env()) as gw:
                wait_ready(gw, client.admin_url, log)
                status, created = client.admin("POST", "/v1/keys", body={"name": "survivor"})
                assert status == 201
                spawned = redis_children(data_dir)
                assert len(spawned) == 1
                os.kill(spawned[0], signal.SIGKILL)
                wait_for(lambda: not pid_alive(spawned[0]), 5, "redis-server did not die")

                def restarted() -> bool:
                    spawned[:] = redis_children(data_dir)
                    return len(spawned) == 1

                wait_for(restarted, 15, f"the gateway did not restart redis-server:\n{log.read_text()}")
                assert parent_of(spawned[0]) == gw.pid
                wait_ready(gw, client.admin_url, log)
                status, record = client.admin("GET", f"/v1/keys/{created['id']}", token="viewer")
                assert status == 200 and record["name"] == "survivor"
                assert gw.poll() is None
                assert terminate(gw) == 0
                wait_for(lambda: not any(pid_alive(p) for p in spawned), 5, "redis-server outlived the gateway")
    finally:
        for pid in spawned:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_embedded_redis_dies_with_a_killed_gateway(tmp_path: Path, admin_tokens: AdminTokens) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "gateway.log"
    spawned: list[int] = []
    try:
        config, client = write_config(tmp_path, "http://127.0.0.1:9", admin_tokens, {"data_dir": str(data_dir)})
        with gateway_process(config, log, base_env()) as gw:
            wait_ready(gw, client.admin_url, log)
            spawned = redis_children(data_dir)
            assert len(spawned) == 1
            gw.kill()
            gw.wait(timeout=STOP_TIMEOUT)
        wait_for(lambda: not pid_alive(spawned[0]), 10, "redis-server outlived a SIGKILLed gateway")
    finally:
        for pid in spawned:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("appendonly", "expected"), [("no", "off"), ("yes", "aof")])
def test_an_external_redis_without_persistence_is_warned_about_at_startup_and_in_readyz(
    tmp_path: Path, admin_tokens: AdminTokens, appendonly: str, expected: str
) -> None:
    server = RedisProcess(free_port(), tmp_path / "redis", extra=["--appendonly", appendonly])
    server.start()
    log = tmp_path / "gateway.log"
    try:
        config, client = write_config(tmp_path, "http://127.0.0.1:1", admin_tokens, {"url": server.url})
        with gateway_process(config, log, base_env()) as gw:
            wait_ready(gw, client.admin_url, log)
            status, _, raw = request("GET", client.admin_url + "/readyz")
            body = json.loads(raw)
            assert status == 200
            assert body["persistence"] == expected
            assert ("warning" in body) == (expected == "off")
            assert body["topology"] == {"mode": "single", "role": "master", "replicas": 0, "min_replicas_acked": 0}
            assert terminate(gw) == 0
        text = log.read_text()
        assert ("redis persistence is off" in text) == (expected == "off")
        assert ("an acknowledged change can be lost" in text) == (expected == "off")
    finally:
        server.stop()


def test_gateway_serve_runs_the_verify_listener_reloads_its_routes_and_drains_it_on_sigterm(
    tmp_path: Path, admin_tokens: AdminTokens
) -> None:
    """The process, not a test assembly: `verify:` starts the third listener, SIGHUP swaps its
    routes, a disable reaches it, SIGTERM stops it with the others and the process exits 0."""
    verify_port = free_port()
    with upstream_process() as upstream_url:
        config, client = write_config(tmp_path, upstream_url, admin_tokens, {"data_dir": str(tmp_path / "data")})
        raw = yaml.safe_load(config.read_text())
        raw["verify"] = {"listen": {"host": "127.0.0.1", "port": verify_port}}
        raw["trusted_proxies"] = ["127.0.0.1/32"]
        raw["routes"].append({"name": "v-orders", "path_prefix": "/orders", "mode": "verify"})
        config.write_text(yaml.safe_dump(raw))
        verify_url = f"http://127.0.0.1:{verify_port}/verify"
        log = tmp_path / "gateway.log"

        def ask(uri: str, key: str) -> tuple[int, dict[str, str]]:
            headers = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": uri, "Authorization": f"Bearer {key}"}
            status, got, _ = request("GET", verify_url, headers=headers)
            return status, got

        with gateway_process(config, log, base_env()) as gw:
            wait_ready(gw, client.admin_url, log)
            status, created = client.admin("POST", "/v1/keys", body={"name": "verify", "owner": "acme"})
            assert status == 201, created
            status, headers = ask("/orders/1", created["key"])
            assert (status, headers["X-Gateway-Key-Id"], headers["X-Gateway-Key-Owner"]) == (200, created["id"], "acme")
            assert ask("/invoices/1", created["key"])[0] == 404  # no such verify route yet

            raw["routes"].append({"name": "v-invoices", "path_prefix": "/invoices", "mode": "verify"})
            config.write_text(yaml.safe_dump(raw))
            gw.send_signal(signal.SIGHUP)
            wait_for(lambda: ask("/invoices/1", created["key"])[0] == 200, 5, "the reloaded verify route")

            status, _ = client.admin("POST", f"/v1/keys/{created['id']}/disable", body={"reason": "test"})
            assert status == 200
            assert ask("/orders/1", created["key"])[0] == 403
            assert terminate(gw) == 0, log.read_text()
        with pytest.raises(OSError):
            request("GET", verify_url, timeout=1)
        assert f"verify listener: 127.0.0.1:{verify_port}" in log.read_text()
