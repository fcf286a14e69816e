"""Operating the gateway (issue 4): metrics, logs, SIGTERM drain and SIGHUP reload, on real processes.

- Metrics: an in-process replica (the `gateway_factory` fixture) in front of the real echo upstream and
  the session's redis-server; /metrics is scraped before and after a known burst and parsed with
  prometheus_client's own parser.
- Logs, signals: the real `python -m gateway serve` as a child process (its own session, so a failed
  test can kill it and its workers), stderr captured to a file, an upstream served in this test's
  event loop (so every wait here is async: nothing may block the loop the upstream runs on).
- Requests whose header bytes an HTTP client library would refuse to send go through raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway import errors
from tests.conftest import AdminTokens, Gateway, RedisProcess, free_port

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
IO_TIMEOUT = 15.0

ACCESS_FIELDS = {
    "ts", "level", "logger", "msg",
    "request_id", "method", "path", "route", "code", "status", "key_id", "upstream_ms", "duration_ms", "remote",
    "user_agent",
}  # fmt: skip


# metrics -----------------------------------------------------------------------------

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> tuple[Snapshot, dict[str, str]]:
    """Every sample by (sample name, sorted labels), and every family's type, via prometheus_client's parser."""
    snapshot: Snapshot = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            snapshot[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return snapshot, types


def value(snapshot: Snapshot, name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Snapshot, after: Snapshot, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of `name` that changed between two scrapes, by labels, with their deltas."""
    out = {}
    for (sample, labels), v in after.items():
        if sample == name and v != before.get((sample, labels), 0.0):
            out[labels] = v - before.get((sample, labels), 0.0)
    return out


async def scrape(session: aiohttp.ClientSession, admin_url: str) -> tuple[str, Snapshot, dict[str, str]]:
    async with session.get(admin_url + "/metrics", timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT)) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return (text, *parse_metrics(text))


# raw HTTP ------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            name, _, v = line.partition(":")
            headers[name.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            body += chunk[:-2]
            if size == 0:
                break
    else:
        body = await reader.read()
    return RawResponse(int(status_line.split()[1]), headers, body)


def request_head(target: bytes, headers: Sequence[tuple[bytes, bytes]], *, close: bool) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + v for name, v in headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def raw_get(port: int, target: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> RawResponse:
    """One request on a new connection, bytes exactly as given (no client library in the way)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT)
    try:
        writer.write(request_head(target, headers, close=True))
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), IO_TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class KeepAlive:
    """One TCP connection, several requests on it: proof that the server did not close it in between."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.local = writer.get_extra_info("sockname")

    @classmethod
    async def open(cls, port: int) -> KeepAlive:
        return cls(*await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT))

    async def get(self, target: str) -> RawResponse:
        assert not self.reader.at_eof(), "the gateway closed the keep-alive connection"
        self.writer.write(request_head(target.encode(), [], close=False))
        await self.writer.drain()
        response = await asyncio.wait_for(read_response(self.reader), IO_TIMEOUT)
        assert response.headers.get("connection", "").lower() != "close", response
        assert self.writer.get_extra_info("sockname") == self.local
        return response

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# an upstream that holds requests until the test lets them go -----------------------------

STARTED = web.AppKey("started", asyncio.Event)
GATE = web.AppKey("gate", asyncio.Event)
HELD_BODY = bytes(range(256)) * 1024  # 256 KiB, so "the full body" means something


async def _hold(request: web.Request) -> web.Response:
    """/hold/...?max=S: answers once the test opens the gate, or after S seconds."""
    request.app[STARTED].set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(request.app[GATE].wait(), float(request.query.get("max", "60")))
    return web.Response(body=HELD_BODY, content_type="application/octet-stream")


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"method": request.method, "path": request.raw_path})


@dataclass
class Upstream:
    url: str
    started: asyncio.Event
    gate: asyncio.Event


@pytest.fixture
async def held_upstream() -> AsyncIterator[Upstream]:
    app = web.Application()
    app[STARTED], app[GATE] = asyncio.Event(), asyncio.Event()
    app.router.add_route("*", "/hold/{tail:.*}", _hold)
    app.router.add_route("*", "/{tail:.*}", _echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Upstream(str(server.make_url("")).rstrip("/"), app[STARTED], app[GATE])
    finally:
        app[GATE].set()  # a held handler returns at once, so closing the server does not wait for it
        await server.close()


# the gateway as a child process --------------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def config_dict(
    redis_server: RedisProcess, tokens: AdminTokens, routes: list[dict[str, Any]], **sections: Any
) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"listen": {"host": "127.0.0.1", "port": free_port()}, "tokens": tokens.entries},
        "redis": {"url": redis_server.url, "prefix": f"ops{secrets.token_hex(4)}:"},
        "routes": routes,
    }
    raw.update(sections)
    return raw


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    config: Path
    err: Path
    proxy_port: int
    admin_port: int

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stderr(self) -> bytes:
        return self.err.read_bytes()

    def records(self) -> list[dict[str, Any]]:
        """stderr as JSON lines: every line must be one JSON object."""
        return json_lines(self.stderr())

    async def wait_exit(self, seconds: float) -> int | None:
        """The exit status, or None if still running after `seconds` (waited in a thread: the loop runs on)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            return await asyncio.to_thread(self.proc.wait, seconds)
        return None


def json_lines(raw: bytes) -> list[dict[str, Any]]:
    assert raw == b"" or raw.endswith(b"\n"), raw[-200:]
    records = []
    for number, line in enumerate(raw.split(b"\n")[:-1], 1):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError as exc:
            raise AssertionError(f"stderr line {number} is not one JSON object ({exc}): {line[:300]!r}") from None
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "msg"} <= record.keys(), record
        records.append(record)
    return records


async def poll(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def spawn(config: Path, err: Path, args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    with err.open("wb") as err_file:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
            cwd=config.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,  # its own process group: the teardown can stop its workers too
        )


@contextlib.asynccontextmanager
async def served(
    tmp_path: Path,
    raw: dict[str, Any],
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    workers: int = 1,
) -> AsyncIterator[Served]:
    """`python -m gateway serve --config FILE [args]`, ready (/readyz 200 and every worker listening)."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(raw))
    err = tmp_path / "stderr.log"
    proc = spawn(config, err, args, base_env(**(env or {})))
    gateway = Served(proc, config, err, raw["listen"]["port"], raw["admin"]["listen"]["port"])
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"the gateway exited with {proc.returncode}:\n{gateway.stderr().decode()}")
                ready = False
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(gateway.admin_url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        ready = r.status == 200
                if ready and gateway.stderr().count(b"gateway listening") >= workers:
                    break
                assert time.monotonic() < deadline, f"not ready:\n{gateway.stderr().decode()}"
                await asyncio.sleep(0.05)
        yield gateway
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if await gateway.wait_exit(STOP_TIMEOUT) is None:
            proc.kill()
            proc.wait()


async def create_key(session: aiohttp.ClientSession, admin_url: str, token: str, **body: Any) -> dict[str, Any]:
    async with session.post(
        admin_url + "/v1/keys",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT),
    ) as r:
        assert r.status == 201, await r.text()
        created: dict[str, Any] = await r.json()
        return created


# 1. metrics ------------------------------------------------------------------------------


async def test_metrics_count_a_known_burst_exactly_with_fixed_labels_and_never_a_key_token_or_path(
    gateway_factory: Callable[..., Any], admin_tokens: AdminTokens
) -> None:
    gw: Gateway = await gateway_factory(**{"cache.negative_ttl_seconds": 300})
    key_a = (await gw.create_key(name="a", owner="acme"))["key"]
    created_b = await gw.create_key(name="b", owner="acme")
    key_b = created_b["key"]
    unknown = "gw_" + secrets.token_urlsafe(24)
    marker = "mk" + secrets.token_hex(8)  # in every unusual path: must never reach a label
    port = gw.proxy.port
    bearer_a = [(b"Authorization", f"Bearer {key_a}".encode())]

    _, before, _ = await scrape(gw.session, gw.admin_url)

    async def call(path: str, key: str | None = None) -> int:
        async with await gw.call("GET", path, key=key) as r:
            await r.read()
            return r.status

    assert await call("/api/one", key_a) == 200  # cache: miss
    assert await call("/api/two", key_a) == 200  # hit
    unusual = f"/api/{marker}-a%20b/%E2%80%A8/%22%7D%7B?token={key_a}&admin={admin_tokens.admin}&m={marker}"
    assert (await raw_get(port, unusual.encode(), bearer_a)).status == 200  # hit
    assert await call("/api/x") == 401  # missing_key
    assert await call("/api/x") == 401  # missing_key
    assert await call("/api/x", unknown) == 401  # key_not_found: miss
    assert await call("/api/x", unknown) == 401  # key_not_found: negative_hit
    assert await call("/api/b", key_b) == 200  # miss
    async with await gw.admin_call(
        "POST", f"/v1/keys/{created_b['id']}/disable", token="developer", json={"reason": "metrics"}
    ) as r:
        assert r.status == 200, await r.text()  # evicts b: invalidated
    assert await call("/api/b", key_b) == 403  # key_disabled: miss
    assert await call("/nowhere") == 404  # route_not_found: no lookup
    assert (await raw_get(port, f"/{marker}/%F0%9F%92%A5/x".encode())).status == 404
    assert (await raw_get(port, f"http://{marker}.example/{marker}?k={key_a}".encode())).status == 404
    assert (await raw_get(port, f"/api/%2f{marker}".encode(), bearer_a)).status == 400  # invalid_request
    assert await call("/dead/x", key_a) == 502  # upstream_unavailable: hit
    assert await call("/billing/x", key_a) == 403  # insufficient_permissions: hit

    text, after, types = await scrape(gw.session, gw.admin_url)

    assert moved(before, after, "gateway_requests_total") == {
        (("code", "forwarded"), ("route", "api")): 4,
        (("code", "missing_key"), ("route", "api")): 2,
        (("code", "key_not_found"), ("route", "api")): 2,
        (("code", "key_disabled"), ("route", "api")): 1,
        (("code", "route_not_found"), ("route", "-")): 3,
        (("code", "invalid_request"), ("route", "-")): 1,
        (("code", "upstream_unavailable"), ("route", "dead")): 1,
        (("code", "insufficient_permissions"), ("route", "billing")): 1,
    }
    # Every request that reached an upstream exchange, and only those, is one observation.
    assert moved(before, after, "gateway_upstream_duration_seconds_count") == {
        (("route", "api"),): 4,
        (("route", "dead"),): 1,
    }
    for route, count in (("api", 4), ("dead", 1)):
        assert value(after, "gateway_upstream_duration_seconds_bucket", route=route, le="+Inf") == count
        assert value(after, "gateway_upstream_duration_seconds_sum", route=route) > 0
    # The unknown key misses the cache both times and is refused by the key filter, without Redis
    # (so it is not cached either).
    assert moved(before, after, "gateway_cache_lookups_total") == {
        (("result", "hit"),): 4,
        (("result", "miss"),): 5,
    }
    assert value(after, "gateway_key_filter_refusals_total") - value(before, "gateway_key_filter_refusals_total") == 2
    assert value(after, "gateway_key_filter_ready") == 1
    assert moved(before, after, "gateway_cache_evictions_total") == {(("reason", "invalidated"),): 1}
    assert value(after, "gateway_cache_entries") == 2  # a and b (now disabled)
    assert (
        value(after, "gateway_invalidations_total", outcome="applied")
        - value(before, "gateway_invalidations_total", outcome="applied")
        == 1
    )
    assert not moved(before, after, "gateway_redis_errors_total")
    assert value(after, "gateway_cache_coherent") == 1
    assert value(after, "gateway_live_replicas") >= 1
    assert value(after, "gateway_inflight_requests") == 0

    expected_types = {
        "gateway_requests": "counter",
        "gateway_upstream_duration_seconds": "histogram",
        "gateway_cache_lookups": "counter",
        "gateway_cache_evictions": "counter",
        "gateway_cache_entries": "gauge",
        "gateway_redis_errors": "counter",
        "gateway_invalidations": "counter",
        "gateway_cache_coherent": "gauge",
        "gateway_live_replicas": "gauge",
        "gateway_config_reloads": "counter",
        "gateway_inflight_requests": "gauge",
    }
    assert {name: types.get(name) for name in expected_types} == expected_types

    # Labels are route names, decision codes and fixed words; nothing the client sent.
    routes = {r.name for r in gw.replica.config.routes} | {"-"}
    allowed: dict[str, Callable[[str], bool]] = {
        "route": routes.__contains__,
        "code": lambda v: v in errors.KINDS or v == "forwarded",
        "result": {"hit", "negative_hit", "miss"}.__contains__,
        "reason": {"size", "expired", "invalidated", "cleared"}.__contains__,
        "operation": {"lookup", "subscription", "admin"}.__contains__,
        "outcome": lambda v: v in ("applied", "rejected") or v.startswith("ignored_"),
        "action": lambda v: v.isascii() and v.replace("_", "").isalpha(),
        "le": lambda v: float(v) > 0,
    }
    for (sample, labels), _ in after.items():
        for name, label in labels:
            assert name in allowed and allowed[name](label), (sample, name, label)
    secrets_and_paths = [key_a, key_b, unknown, marker, admin_tokens.admin, admin_tokens.developer, "\u2028", '"}{']
    for secret in secrets_and_paths:
        assert secret not in text, f"{secret[:8]!r}... appears in /metrics"


# 2. logs ---------------------------------------------------------------------------------


@dataclass
class Expected:
    """What one request of the burst must produce in the access log (None: no access record)."""

    what: str
    status: int
    request_id: str | None
    code: str | None = None
    key_id: str | None = None
    path: str | None = None
    route: str = "api"
    user_agent: str | None = None


async def hostile_burst(port: int, key: str, key_id: str, tokens: AdminTokens) -> list[Expected]:
    """Requests with hostile header values and paths, sent byte for byte; what each must log."""
    auth = (b"Authorization", f"Bearer {key}".encode())
    unknown = (b"Authorization", b"Bearer gw_" + secrets.token_urlsafe(24).encode())
    long_ua = "long-" + "A" * 7000
    # (what, target, headers, status, code, key_id, logged path, logged user agent)
    plan: list[tuple[str, str, list[tuple[bytes, bytes]], int, str | None, str | None, str | None, str | None]] = [
        ("plain", "/api/plain", [auth, (b"User-Agent", b"plain/1.0")], 200, "forwarded", key_id, "/api/plain",
         "plain/1.0"),
        ("non-UTF-8 user agent", "/api/bin", [auth, (b"User-Agent", b"bin-\xff\xfe-end")], 200, "forwarded", key_id,
         "/api/bin", "bin-\udcff\udcfe-end"),
        ("U+2028/U+2029 user agent", "/api/ls", [auth, (b"User-Agent", "ls-\u2028-ps-\u2029-end".encode())], 200,
         "forwarded", key_id, "/api/ls", "ls-\u2028-ps-\u2029-end"),
        ("C1 controls (NEL, CSI) in user agent", "/api/c1",
         [auth, (b"User-Agent", "c1-\u0085-\u009b31m-end".encode())], 200, "forwarded", key_id, "/api/c1",
         "c1-\u0085-\u009b31m-end"),
        ("JSON-looking user agent", "/api/json", [(b"User-Agent", b'json-"}{"level":"error","msg":"forged"}')], 401,
         "missing_key", None, "/api/json", 'json-"}{"level":"error","msg":"forged"}'),
        ("tab in user agent", "/api/tab", [unknown, (b"User-Agent", b"tab-\t-end")], 401, "key_not_found", None,
         "/api/tab", "tab-\t-end"),
        ("7000-byte user agent", "/api/long", [auth, (b"User-Agent", long_ua.encode())], 200, "forwarded", key_id,
         "/api/long", long_ua[:256]),
        ("key and admin token in the query", f"/api/q?api_key={key}&token={tokens.admin}", [auth], 200, "forwarded",
         key_id, "/api/q", None),
        ("U+2028 and JSON in the path", "/api/%E2%80%A8%22%7D%7B%22level%22:%22error%22", [auth], 200, "forwarded",
         key_id, '/api/\u2028"}{"level":"error"', None),
        ("ESC in the path", "/api/%1B%5B2J", [auth], 400, "invalid_request", None, None, None),
        ("JSON in the bearer token", "/api/bearer", [(b"Authorization", b'Bearer "}{"level":"error"')], 401,
         "malformed_key", None, "/api/bearer", None),
    ]  # fmt: skip
    expected = []
    for what, target, headers, status, code, kid, path, ua in plan:
        r = await raw_get(port, target.encode(), headers)
        assert r.status == status, (what, r)
        expected.append(
            Expected(what, status, r.headers.get("x-request-id"), code, kid, path, "-" if path is None else "api", ua)
        )
    client_id = "client-" + secrets.token_hex(6)
    r = await raw_get(port, b"/api/rid", [auth, (b"X-Request-Id", client_id.encode())])
    assert r.status == 200 and r.headers["x-request-id"] == client_id
    expected.append(Expected("client request id", 200, client_id, "forwarded", key_id, "/api/rid"))
    r = await raw_get(port, b"/api/rid2", [auth, (b"X-Request-Id", b'"}{"level":"error"')])
    assert r.status == 200 and r.headers["x-request-id"].startswith("req_")
    expected.append(Expected("hostile request id", 200, r.headers["x-request-id"], "forwarded", key_id, "/api/rid2"))
    # Bytes the HTTP parser refuses outright: 400 invalid_request before any gateway code runs,
    # recorded without method, path or anything else of the refused request.
    for what, ua in (("ESC", b"esc-\x1b[31m-end"), ("DEL", b"del-\x7f-end"), ("NUL", b"nul-\x00-end")):
        r = await raw_get(port, b"/api/refused", [auth, (b"User-Agent", ua)])
        assert r.status == 400, (what, r)
        assert json.loads(r.body)["error"]["code"] == "invalid_request", (what, r)
        assert ua not in r.body and b"Bearer" not in r.body, (what, r)
        expected.append(Expected(f"{what} in user agent (refused by the parser)", 400, r.headers["x-request-id"],
                                 "invalid_request", None, None, "-", None))  # fmt: skip
    for e in expected:
        assert e.request_id, e
    return expected


def check_access_record(record: dict[str, Any], e: Expected) -> None:
    assert set(record) == ACCESS_FIELDS, (e.what, record)
    assert record["level"] == "info" and record["msg"] == "request", (e.what, record)
    refused = e.what.endswith("(refused by the parser)")
    assert record["method"] == (None if refused else "GET") and record["remote"] == "127.0.0.1", (e.what, record)
    got = {k: record[k] for k in ("code", "status", "key_id", "path", "route", "user_agent")}
    want = {"code": e.code, "status": e.status, "key_id": e.key_id, "path": e.path, "route": e.route}
    want["user_agent"] = e.user_agent
    assert got == want, e.what
    assert isinstance(record["duration_ms"], float | int) and record["duration_ms"] >= 0, (e.what, record)
    if e.code == "forwarded":
        assert isinstance(record["upstream_ms"], float | int) and record["upstream_ms"] >= 0, (e.what, record)
    else:
        assert record["upstream_ms"] is None, (e.what, record)


async def test_json_logs_one_parseable_line_per_record_one_access_record_per_request_and_no_secrets(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, held_upstream: Upstream
) -> None:
    routes = [{"name": "api", "path_prefix": "/api", "upstream": held_upstream.url}]
    # The file says text at warning, the environment says json at info: the environment wins.
    raw = config_dict(redis_server, admin_tokens, routes, logging={"format": "text", "level": "warning"})
    env = {"GATEWAY_LOGGING_FORMAT": "json", "GATEWAY_LOGGING_LEVEL": "info"}
    async with (
        served(tmp_path, raw, env=env) as gw,
        aiohttp.ClientSession() as session,
    ):
        created = await create_key(session, gw.admin_url, admin_tokens.developer, name="logs", owner="acme")
        expected = await hostile_burst(gw.proxy_port, created["key"], created["id"], admin_tokens)
        answered = [e for e in expected if e.request_id is not None]

        def access() -> list[dict[str, Any]]:
            return [r for r in gw.records() if r["logger"] == "gateway.access"]

        await poll(lambda: len(access()) >= len(answered), 10, "the access records did not all appear")
        await asyncio.sleep(0.2)  # any extra record would have time to show up too
        records = gw.records()
        stderr = gw.stderr()

    by_id = Counter(r["request_id"] for r in records if r["logger"] == "gateway.access")
    assert len([r for r in records if r["logger"] == "gateway.access"]) == len(answered), by_id
    for e in answered:
        assert by_id[e.request_id] == 1, (e.what, by_id)
        check_access_record(next(r for r in records if r.get("request_id") == e.request_id), e)

    messages = [r["msg"] for r in records]
    listening = [r for r in records if r["msg"].startswith("gateway listening")]
    assert len(listening) == 1 and listening[0]["redis_mode"] == "external", messages
    assert f"127.0.0.1:{raw['listen']['port']}" in listening[0]["msg"]
    assert any(m.startswith("route api: /api -> " + held_upstream.url) for m in messages), messages
    assert any(m.startswith("redis persistence:") for m in messages), messages

    for secret in (created["key"], admin_tokens.admin, admin_tokens.developer, admin_tokens.viewer):
        assert secret.encode() not in stderr, f"a secret ({secret[:8]}...) appears in stderr"
    assert b"Bearer" not in stderr


async def test_text_logs_one_line_per_request_and_no_raw_control_characters(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, held_upstream: Upstream
) -> None:
    routes = [{"name": "api", "path_prefix": "/api", "upstream": held_upstream.url}]
    raw = config_dict(redis_server, admin_tokens, routes)
    # The environment says json at warning, the flags say text at info: the flags win.
    args = ["--log-format", "text", "--log-level", "info"]
    env = {"GATEWAY_LOGGING_FORMAT": "json", "GATEWAY_LOGGING_LEVEL": "warning"}
    async with (
        served(tmp_path, raw, args=args, env=env) as gw,
        aiohttp.ClientSession() as session,
    ):
        created = await create_key(session, gw.admin_url, admin_tokens.developer, name="logs", owner="acme")
        expected = await hostile_burst(gw.proxy_port, created["key"], created["id"], admin_tokens)
        answered = [e for e in expected if e.request_id is not None]

        def access_lines() -> list[str]:
            return [line for line in gw.stderr().decode().split("\n") if " gateway.access " in line]

        await poll(lambda: len(access_lines()) >= len(answered), 10, "the access lines did not all appear")
        await asyncio.sleep(0.2)
        stderr = gw.stderr()

    text = stderr.decode("utf-8")  # strict: undecodable client bytes were escaped, not copied
    lines = text.split("\n")
    assert not any(line.startswith("{") for line in lines), "--log-format must win over the environment"
    access = [line for line in lines if " gateway.access " in line]
    assert len(access) == len(answered), "\n".join(access)
    for e in answered:
        mine = [line for line in access if f"request_id={e.request_id} " in line]
        assert len(mine) == 1, (e.what, mine)
        assert f"code={e.code} " in mine[0] and f"status={e.status} " in mine[0], (e.what, mine[0])
        assert f"key_id={e.key_id} " in mine[0], (e.what, mine[0])
    for secret in (created["key"], admin_tokens.admin, admin_tokens.developer):
        assert secret not in text, f"a secret ({secret[:8]}...) appears in stderr"
    # No raw control character (C0, DEL or C1 such as NEL U+0085 and CSI U+009B) and no Unicode line or
    # paragraph separator: each is either a terminal escape or a line break to some log reader.
    raw_controls = sorted(
        {f"U+{ord(c):04X}" for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Zl", "Zp")}
    )
    assert raw_controls == [], f"raw control characters in the text log: {raw_controls}"
    for line in access:
        assert line.splitlines() == [line], f"an access line breaks into several: {line!r}"


async def test_logging_level_from_the_environment_drops_the_records_below_it(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, held_upstream: Upstream
) -> None:
    routes = [{"name": "api", "path_prefix": "/api", "upstream": held_upstream.url, "auth": "none"}]
    raw = config_dict(redis_server, admin_tokens, routes)
    # workers=0: the startup lines are info, so readiness is /readyz alone.
    async with served(tmp_path, raw, env={"GATEWAY_LOGGING_LEVEL": "warning"}, workers=0) as gw:
        assert (await raw_get(gw.proxy_port, b"/api/x")).status == 200
        assert (await raw_get(gw.proxy_port, b"/api/x", [(b"User-Agent", b"nul-\x00")])).status == 400
        # A request the parser refuses is logged at info (any client can cause one at will):
        # below this level, so it must not appear either.
        await asyncio.sleep(0.5)
        records = gw.records()
    assert {r["level"] for r in records} <= {"warning", "error", "critical"}, records
    assert not any("Error handling request" in r["msg"] for r in records), records
    assert not any(r["logger"] == "gateway.access" for r in records)


async def test_a_request_the_http_parser_refuses_never_puts_its_key_in_the_log(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, held_upstream: Upstream
) -> None:
    routes = [{"name": "api", "path_prefix": "/api", "upstream": held_upstream.url}]
    raw = config_dict(redis_server, admin_tokens, routes)
    async with served(tmp_path, raw) as gw, aiohttp.ClientSession() as session:
        created = await create_key(session, gw.admin_url, admin_tokens.developer, name="leak", owner="acme")
        key = created["key"].encode()
        for tail in (b"\x7f", b"\x00", b" " + b"A" * 9000):
            r = await raw_get(gw.proxy_port, b"/api/x", [(b"Authorization", b"Bearer " + key + tail)])
            assert r.status in (400, 431), r
        await poll(lambda: gw.stderr().count(b"request refused by the HTTP parser") >= 3, 5, "no refusal logged")
        await asyncio.sleep(0.2)
        stderr = gw.stderr()
    gw_records = json_lines(stderr)  # still JSON lines
    assert gw_records
    assert key not in stderr, "the plaintext key of a request the HTTP parser refused is in the log"


# 3. SIGTERM -----------------------------------------------------------------------------


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


async def get_status(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def fetch(url: str) -> tuple[int, bytes] | aiohttp.ClientError:
    """The status and body, or the client error (a cut connection) as a value."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=60)) as r,
        ):
            return r.status, await r.read()
    except aiohttp.ClientError as exc:
        return exc


def hold_route(upstream: Upstream) -> list[dict[str, Any]]:
    return [{"name": "hold", "path_prefix": "/hold", "upstream": upstream.url, "auth": "none", "timeout_seconds": 60}]


async def test_sigterm_lets_an_inflight_request_finish_while_refusing_new_connections_and_exits_0(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, held_upstream: Upstream
) -> None:
    raw = config_dict(redis_server, admin_tokens, hold_route(held_upstream), lifecycle={"drain_seconds": 20})
    async with served(tmp_path, raw) as gw, aiohttp.ClientSession() as session:
        async with asyncio.TaskGroup() as tg:
            slow = tg.create_task(fetch(gw.proxy_url + "/hold/a?max=30"))
            await asyncio.wait_for(held_upstream.started.wait(), IO_TIMEOUT)
            signalled = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)

            # While the request is held upstream: not ready, no new connections, still running.
            deadline = time.monotonic() + 10
            while await get_status(session, gw.admin_url + "/readyz") != 503:
                assert time.monotonic() < deadline, "/readyz did not turn 503 during the drain"
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 10
            while not await connection_refused(gw.proxy_port):
                assert time.monotonic() < deadline, "the proxy port still accepts connections during the drain"
                await asyncio.sleep(0.05)
            _, metrics, _ = await scrape(session, gw.admin_url)
            assert value(metrics, "gateway_inflight_requests") == 1
            # The upstream takes 1.5 s in all: the drain must wait that long, not cut at once.
            await asyncio.sleep(max(0.0, 1.5 - (time.monotonic() - signalled)))
            assert gw.proc.poll() is None, "the gateway exited with a request in flight"
            assert not slow.done()
            released = time.monotonic()
            held_upstream.gate.set()

        outcome = slow.result()
        assert not isinstance(outcome, BaseException), outcome
        assert outcome[0] == 200
        assert outcome[1] == HELD_BODY
        code = await gw.wait_exit(STOP_TIMEOUT)
        assert code == 0, gw.stderr().decode()
        # Nothing left in flight: it did not sit out the 20 s drain allowance.
        assert time.monotonic() - released < 10
        messages = [r["msg"] for r in gw.records()]
    assert any("draining 1 in-flight request" in m for m in messages), messages


async def test_sigterm_cuts_a_request_slower_than_drain_seconds_and_exits_soon_after(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, held_upstream: Upstream
) -> None:
    raw = config_dict(redis_server, admin_tokens, hold_route(held_upstream), lifecycle={"drain_seconds": 20})
    # drain_seconds from the environment (1 s) beats the file's 20 s.
    async with served(tmp_path, raw, env={"GATEWAY_LIFECYCLE_DRAIN_SECONDS": "1"}) as gw:
        async with asyncio.TaskGroup() as tg:
            slow = tg.create_task(fetch(gw.proxy_url + "/hold/b?max=60"))  # the upstream would take 60 s
            await asyncio.wait_for(held_upstream.started.wait(), IO_TIMEOUT)
            signalled = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            code = await gw.wait_exit(STOP_TIMEOUT)
            took = time.monotonic() - signalled
            assert code == 0, gw.stderr().decode()
            assert took < 1 + 8, f"exit took {took:.1f}s with drain_seconds 1"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(slow), 10)
            assert slow.done()
            assert not held_upstream.gate.is_set()  # the upstream never answered: the gateway cut it
        assert isinstance(slow.result(), aiohttp.ClientError), slow.result()
        messages = [r["msg"] for r in gw.records()]
    assert any("draining 1 in-flight request(s) for up to 1s" in m for m in messages), messages


async def test_a_request_cut_by_the_drain_deadline_still_gets_its_access_record(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, held_upstream: Upstream
) -> None:
    """'One access record per proxy request' includes the requests a shutdown cuts: an operator
    reading the logs after a deploy must be able to see which requests were dropped."""
    raw = config_dict(redis_server, admin_tokens, hold_route(held_upstream), lifecycle={"drain_seconds": 0.5})
    async with served(tmp_path, raw) as gw:
        async with asyncio.TaskGroup() as tg:
            slow = tg.create_task(fetch(gw.proxy_url + "/hold/c?max=60"))
            await asyncio.wait_for(held_upstream.started.wait(), IO_TIMEOUT)
            gw.proc.send_signal(signal.SIGTERM)
            assert await gw.wait_exit(STOP_TIMEOUT) == 0, gw.stderr().decode()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(slow), 10)
        assert isinstance(slow.result(), aiohttp.ClientError), slow.result()
        access = [r for r in gw.records() if r["logger"] == "gateway.access"]
    assert [(r["path"], r["route"]) for r in access] == [("/hold/c", "hold")], access


# 4. SIGHUP ------------------------------------------------------------------------------


def reloads(snapshot: Snapshot) -> tuple[float, float]:
    return (
        value(snapshot, "gateway_config_reloads_total", outcome="applied"),
        value(snapshot, "gateway_config_reloads_total", outcome="rejected"),
    )


async def test_sighup_swaps_routes_on_a_live_keepalive_connection_and_a_broken_file_changes_nothing(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, held_upstream: Upstream
) -> None:
    old = [{"name": "api", "path_prefix": "/api", "upstream": held_upstream.url, "auth": "none"}]
    new = [{"name": "v2", "path_prefix": "/v2", "upstream": held_upstream.url, "auth": "none"}]
    raw = config_dict(redis_server, admin_tokens, old)
    async with served(tmp_path, raw) as gw, aiohttp.ClientSession() as session:
        conn = await KeepAlive.open(gw.proxy_port)
        try:
            r = await conn.get("/api/one")
            assert r.status == 200 and json.loads(r.body)["path"] == "/api/one"
            assert (await conn.get("/v2/one")).status == 404

            gw.config.write_text(yaml.safe_dump({**raw, "routes": new}))
            gw.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while (r := await conn.get("/v2/two")).status != 200:  # the same connection, polled
                assert r.status == 404, r
                assert time.monotonic() < deadline, "the new route never took effect"
                await asyncio.sleep(0.05)
            assert json.loads(r.body)["path"] == "/v2/two"
            r = await conn.get("/api/one")
            assert r.status == 404 and json.loads(r.body)["error"]["code"] == "route_not_found"
            _, metrics, _ = await scrape(session, gw.admin_url)
            assert reloads(metrics) == (1, 0)

            broken: list[tuple[str, str | None, list[str]]] = [
                ("invalid YAML", "routes: [\n  - {name: x", ["not valid YAML"]),
                (
                    "a bad value and an unknown key",
                    yaml.safe_dump(
                        {
                            **raw,
                            "routes": [{**old[0], "upstream": "ftp://nope", "timeout_seconds": -5}],
                            "colour": "blue",
                        }
                    ),
                    ["routes[0].upstream", "routes[0].timeout_seconds", "colour"],
                ),
                ("a missing file", None, ["cannot be read"]),
            ]
            for rejected, (what, content, problems) in enumerate(broken, 1):
                if content is None:
                    gw.config.unlink()
                else:
                    gw.config.write_text(content)
                gw.proc.send_signal(signal.SIGHUP)

                async def counted(n: int = rejected) -> bool:
                    _, m, _ = await scrape(session, gw.admin_url)
                    return reloads(m) == (1, n)

                deadline = time.monotonic() + 10
                while not await counted():
                    assert time.monotonic() < deadline, f"{what}: reloads{{rejected}} did not move"
                    await asyncio.sleep(0.05)
                # The running routes stay, on the same connection.
                assert (await conn.get("/v2/three")).status == 200, what
                assert (await conn.get("/api/one")).status == 404, what
                errors_logged = [r["msg"] for r in gw.records() if r["level"] == "error"]
                assert sum("config reload rejected" in m for m in errors_logged) == rejected, errors_logged
                for problem in problems:
                    assert any(problem in m for m in errors_logged), (what, problem, errors_logged)
            assert gw.proc.poll() is None
        finally:
            await conn.close()


# 5. --workers ----------------------------------------------------------------------------


async def test_sighup_to_the_parent_of_workers_reloads_every_worker(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, held_upstream: Upstream
) -> None:
    old = [{"name": "api", "path_prefix": "/api", "upstream": held_upstream.url, "auth": "none"}]
    new = [{"name": "v2", "path_prefix": "/v2", "upstream": held_upstream.url, "auth": "none"}]
    raw = config_dict(redis_server, admin_tokens, old)
    async with served(tmp_path, raw, args=["--workers", "2"], workers=2) as gw:
        assert (await raw_get(gw.proxy_port, b"/api/x")).status == 200
        gw.config.write_text(yaml.safe_dump({**raw, "routes": new}))
        gw.proc.send_signal(signal.SIGHUP)
        await poll(lambda: gw.stderr().count(b'"config reloaded') >= 2, 15, "not every worker reloaded")
        # New connections are spread over both workers (SO_REUSEPORT): every one sees the new routes.
        for i in range(30):
            assert (await raw_get(gw.proxy_port, f"/v2/{i}".encode())).status == 200, i
            assert (await raw_get(gw.proxy_port, f"/api/{i}".encode())).status == 404, i
        assert gw.stderr().count(b'"config reloaded') == 2
        assert gw.proc.poll() is None
        gw.proc.send_signal(signal.SIGTERM)
        assert await gw.wait_exit(STOP_TIMEOUT) == 0, gw.stderr().decode()
        messages = [r["msg"] for r in gw.records()]
    assert "all workers stopped" in messages
    assert not any("exited with status" in m for m in messages), messages  # no worker died on the SIGHUP
