"""The proxy benchmark (`make bench`): the gateway next to nginx and a naive aiohttp proxy.

Starts, on loopback: a static upstream (nginx: `return 200` with a ~100-byte JSON, and a 1 MiB
file), nginx as a keep-alive reverse proxy to it (the peer, one worker; a second server block of
the same nginx answers the gateway's 401 itself, with the gateway's body and headers), a plain
aiohttp pass-through proxy (the naive baseline, benchmarks/naive_proxy.py, on the gateway's event
loop) and the gateway (one process, its own redis-server, a valid key, cache warm, access log off).
Each proxy under test runs on CPU 1; wrk, the upstream nginx, redis-server and this driver on
CPU 0. wrk drives one proxy at a time with the same request bytes for every proxy (same path,
`Host: 127.0.0.1`, the scenario's Authorization or none; nginx ignores it).

A round runs every scenario once for every proxy it compares, the proxies' order rotated each
round. A proxy's CPU per request is the growth of the utime+stime (and reaped children's) of its
whole process tree (/proc/<pid>/stat: the gateway and its workers or children; nginx's master and
worker) during a wrk run, divided by the requests wrk completed. A ratio to nginx is taken within
a round (the same scenario, minutes apart at most); the headline is the median over all rounds
with the range (min-max), and again over the undisturbed rounds only. A round is disturbed when,
during any of its runs, processes outside the benchmark used more than --max-foreign CPU cores
(the busy time of /proc/stat minus the CPU time of this driver's process tree, which holds every
process of the benchmark: proxies, upstream, Redis, wrk).

Scenarios (c64 unless noted): proxied 200 (nginx, naive, gateway; and at c1); 401 without a key
and with an unknown key (nginx refusing, gateway); a flood: every second request with a fresh
random unknown key vs. all valid (gateway; valid-traffic rps in both); a 1 MiB response.

Two costs, each one gateway run against another in the same round: per-key usage counting (the
proxied 200 also on a second gateway process with `usage.enabled: false`, same Redis and key table,
same key: "gateway (no usage)"), and a rate limit on the leased path ("200 limit": the same request
with a key created with a limit of 10^9 per 60 s, so every request spends a local slice; the
gateway's rate-limit ops to Redis are read from /metrics around each such run, and a run that sent
more than a few is flagged). Each: CPU us per request added, median [min-max] over rounds, and the
ratio; the usage one also both gateways' ratios to nginx.

Writes benchmarks/results/bench.json, docs/bench.png and the results section of
docs/performance.md (between its markers); --quick writes none of them unless asked.

    .venv/bin/python benchmarks/bench.py [--rounds 5] [--duration 4] [--warmup 1] [--quick]
    .venv/bin/python benchmarks/bench.py --render-docs benchmarks/results/bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
NGINX_DIR: Final = ROOT / "benchmarks" / "nginx"
RESULTS_JSON: Final = ROOT / "benchmarks" / "results" / "bench.json"
CHART_PNG: Final = ROOT / "docs" / "bench.png"
DOC_MD: Final = ROOT / "docs" / "performance.md"
DOC_BEGIN: Final = "<!-- bench:results:begin (written by benchmarks/bench.py from bench.json; do not edit) -->"
DOC_END: Final = "<!-- bench:results:end -->"

LOAD_CPU: Final = 0  # wrk, upstream nginx, redis-server, this driver
PROXY_CPU: Final = 1  # the proxies under test
PROXIES: Final = ("nginx", "naive", "gateway")
# The gateway again, a second process on the same Redis and key table with `usage.enabled: false`:
# what per-key usage counting costs (issue 12), in the proxied 200 scenario only.
NO_USAGE: Final = "gateway (no usage)"
# The limit of the "200 limit" scenario's key: so large every request spends a locally leased slice
# (gateway/ratelimit/limiter.py), no Redis round trip per request (issue 14).
BENCH_LIMIT: Final = {"name": "bench", "limit": 1_000_000_000, "window_seconds": 60}
SMALL_PATH: Final = "/api/hello"
BIG_PATH: Final = "/api/1mib.bin"
BIG_SIZE: Final = 1 << 20
HOST: Final = "127.0.0.1"  # the Host header every proxy gets (not host:port, which differs by proxy)
# ~100 bytes, the upstream's answer to SMALL_PATH.
BODY: Final = '{"id":"ord_7Hq2kP9x","status":"shipped","items":3,"total":{"amount":4250,"currency":"EUR"},"ok":true}'
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
# Headers of the gateway's 401 that nginx does not copy: it writes its own.
OWN_HEADERS: Final = frozenset({"date", "content-length", "content-type", "connection", "server", "transfer-encoding"})

# wrk Lua. PLAIN keeps wrk's fast path (no request()/response() callbacks); COUNT counts
# statuses; MIX builds each request, every EVERY-th with a fresh random unknown key.
LUA_DONE: Final = r"""
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function done(summary, latency, requests)
  local c = {s200 = 0, s401 = 0, other = 0}
  for _, t in ipairs(threads) do
    for k, _ in pairs(c) do c[k] = c[k] + (tonumber(t:get(k)) or 0) end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH-JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"max_us":%.1f,"mean_us":%.1f,' ..
    '"s200":%d,"s401":%d,"other":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    c.s200, c.s401, c.other))
end
"""
LUA_COUNT: Final = r"""
s200, s401, other = 0, 0, 0
function response(status, headers, body)
  if status == 200 then s200 = s200 + 1 elseif status == 401 then s401 = s401 + 1 else other = other + 1 end
end
"""
LUA_MIX: Final = r"""
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local counter, every, valid = 0, 0, nil
function init(args)
  every = tonumber(args[2])
  valid = wrk.format(nil, nil, {["Host"] = "127.0.0.1", ["Authorization"] = "Bearer " .. args[1]})
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
end
local function random_key()
  local t = {}
  for i = 1, 32 do
    local r = math.random(1, #alphabet)
    t[i] = alphabet:sub(r, r)
  end
  return "gw_" .. table.concat(t)
end
function request()
  counter = counter + 1
  if every > 0 and counter % every == 0 then
    return wrk.format(nil, nil, {["Host"] = "127.0.0.1", ["Authorization"] = "Bearer " .. random_key()})
  end
  return valid
end
"""


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Scenario:
    name: str  # the key in bench.json
    title: str
    proxies: tuple[str, ...]
    conns: int
    path: str
    # "valid", "limited" (the key with a limit), "none", "unknown" (one fixed unknown key), "mix" (the Lua builds it)
    auth: str
    script: str = "plain"
    expect: str = "200"
    every: int = 0  # mix: every N-th request a fresh random unknown key (0: none)
    nginx_refuses: bool = False  # nginx's refusal server block, not its proxy
    nginx_of: str = ""  # the scenario whose nginx run the ratio to nginx takes (default: this one's)


REFUSERS: Final = ("nginx", "gateway")
SCENARIOS: Final = (
    Scenario("200", "200, 100 B JSON", (*PROXIES, NO_USAGE), 64, SMALL_PATH, "valid"),
    # The same request with the key that has a limit (same length key); x nginx against "200"'s nginx.
    Scenario("200 limit", "200, key with a limit", ("gateway",), 64, SMALL_PATH, "limited", nginx_of="200"),
    Scenario("200 c1", "200, 100 B JSON, c1", PROXIES, 1, SMALL_PATH, "valid"),
    Scenario("401 no key", "401, no key", REFUSERS, 64, SMALL_PATH, "none", "count", "401", nginx_refuses=True),
    Scenario(
        "401 unknown key", "401, unknown key", REFUSERS, 64, SMALL_PATH, "unknown", "count", "401", nginx_refuses=True
    ),
    Scenario("flood: all valid", "flood: all valid", ("gateway",), 64, SMALL_PATH, "mix", "mix", "mix"),
    Scenario(
        "flood: 1 in 2 unknown", "flood: 1 in 2 random unknown", ("gateway",), 64, SMALL_PATH, "mix", "mix", "mix", 2
    ),
    Scenario("1 MiB", "1 MiB response", PROXIES, 64, BIG_PATH, "valid"),
)
# The comparisons the headline reports: gateway / nginx, same scenario, same round.
HEADLINE: Final = ("200", "200 c1", "401 no key", "401 unknown key", "1 MiB", "200 limit")
# Same-round pairs of runs, (scenario, proxy) with over (scenario, proxy) without: what a feature adds.
USAGE_PAIR: Final = (("200", "gateway"), ("200", NO_USAGE))
LIMIT_PAIR: Final = (("200 limit", "gateway"), ("200", "gateway"))


# /proc -------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Every process's parent and CPU ticks (own + reaped children's), and each CPU's busy ticks."""

    at: float
    parent: dict[int, int]
    ticks: dict[int, int]
    busy: dict[str, int]  # "cpu" (all), "cpu0", "cpu1", ...: user + nice + system
    steal: int

    def tree(self, root: int) -> int:
        """CPU ticks of a process and all its live descendants, including the children they reaped
        (cutime/cstime): each process's time counted once, whether it is alive or was waited for."""
        children: dict[int, list[int]] = {}
        for pid, ppid in self.parent.items():
            children.setdefault(ppid, []).append(pid)
        total, todo = 0, [root]
        while todo:
            pid = todo.pop()
            total += self.ticks.get(pid, 0)
            todo.extend(children.get(pid, ()))
        return total


def snapshot() -> Snapshot:
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            pid = int(entry.name)
            parent[pid] = int(fields[1])
            ticks[pid] = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    busy: dict[str, int] = {}
    steal = 0
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        name, *values = line.split()
        user, nice, system, _idle, _iowait, _irq, _softirq, st = (int(v) for v in values[:8])
        # Not irq/softirq: our own loopback traffic causes them. Steal is kept apart.
        busy[name] = user + nice + system
        if name == "cpu":
            steal = st
    return Snapshot(time.monotonic(), parent, ticks, busy, steal)


def wait_for_children(pid: int, seconds: float = 10) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [p for p, ppid in snapshot().parent.items() if ppid == pid]
        if found:
            return found
        time.sleep(0.05)
    return []


def maps_uvloop(pid: int) -> bool:
    """Whether a process has uvloop's extension module mapped (it runs on uvloop's loop)."""
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# HTTP ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def fetch(port: int, path: str, headers: Sequence[tuple[str, str]]) -> Answer:
    """GET with exactly these headers (what wrk sends: no Accept-Encoding, our Host)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return Answer(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def http(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310 - loopback URLs
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def create_key(admin_url: str, token: str, name: str, **fields: Any) -> str:
    """A new key through the admin API (its plaintext); `fields` go into the body (e.g. ratelimits)."""
    status, body = http(
        "POST",
        admin_url + "/v1/keys",
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        json.dumps({"name": name, **fields}).encode(),
    )
    if status not in (200, 201):
        raise BenchError(f"creating a key: {status} {body[:300]!r}")
    created = json.loads(body)
    ignored = [name for name, value in fields.items() if not kept(value, created.get(name))]
    if ignored:  # an older gateway that takes the field but does not keep it
        raise BenchError(f"creating a key: the gateway did not keep {', '.join(ignored)}")
    key: str = created["key"]
    return key


def kept(sent: object, got: object) -> bool:
    """Whether an answer holds what was sent (a mapping may have more fields: defaults)."""
    if isinstance(sent, dict):
        return isinstance(got, dict) and all(k in got and kept(v, got[k]) for k, v in sent.items())
    if isinstance(sent, list):
        return isinstance(got, list) and len(got) == len(sent) and all(map(kept, sent, got))
    return sent == got


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{url}: the process exited ({proc.returncode}); log {log}:\n{tail(log)}")
        try:
            http("GET", url)
            return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{url}: not answering after {seconds:.0f} s; log {log}:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def command_output(argv: Sequence[str], *, must_succeed: bool = False) -> str:
    """The first line a command prints (wrk -v exits 1 after printing its version)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if must_succeed and out.returncode != 0:
        return "unknown"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


# the nginx refusal ----------------------------------------------------------------

NGINX_UNSAFE: Final = re.compile(r"['\\$]")


def nginx_refusal(answer: Answer, indent: int) -> tuple[str, str, str]:
    """The gateway's 401 as nginx directives: (add_header lines, body, content type), with nginx's
    own request id (`$request_id`, 32 hex digits, after the gateway's prefix) where the gateway has its id."""
    rid = answer.header("X-Request-Id")
    if not rid:
        raise BenchError(f"the gateway's 401 has no X-Request-Id: {answer.headers}")
    prefix = re.sub(r"[0-9a-fA-F]+$", "", rid)
    nginx_id = prefix + "${request_id}"

    def literal(text: str, what: str) -> str:
        if NGINX_UNSAFE.search(text):
            raise BenchError(f"the gateway's 401 {what} has a character the nginx template does not quote: {text!r}")
        return text.replace(rid, nginx_id)

    lines = []
    for name, value in answer.headers:
        if name.lower() in OWN_HEADERS:
            continue
        lines.append(" " * indent + f"add_header {name} '{literal(value, name)}' always;")
    body = literal(answer.body.decode(), "body")
    if nginx_id not in body:
        raise BenchError(f"the gateway's 401 body does not carry its request id {rid}: {answer.body!r}")
    ctype = answer.header("Content-Type") or "application/octet-stream"
    return "\n".join(lines), body, ctype


def compare_refusals(label: str, gw: Answer, ng: Answer) -> dict[str, Any]:
    """The two refusals must be the same bytes but for the request id: fail loudly otherwise."""
    gid, nid = gw.header("X-Request-Id") or "", ng.header("X-Request-Id") or ""
    problems = []
    if gw.status != ng.status:
        problems.append(f"status {gw.status} vs {ng.status}")
    if not gid or not nid:
        problems.append(f"X-Request-Id missing: gateway {gid!r}, nginx {nid!r}")
    norm_gw = gw.body.replace(gid.encode(), b"<id>") if gid else gw.body
    norm_ng = ng.body.replace(nid.encode(), b"<id>") if nid else ng.body
    if norm_gw != norm_ng:
        problems.append(f"bodies differ:\n  gateway {gw.body!r}\n  nginx   {ng.body!r}")
    allowed = gw.body.count(gid.encode()) * abs(len(nid) - len(gid)) if gid else 0
    if abs(len(gw.body) - len(ng.body)) > allowed:
        problems.append(f"body lengths {len(gw.body)} vs {len(ng.body)} differ by more than the request id")
    ng_headers = {k.lower(): v for k, v in ng.headers}
    for name, value in gw.headers:
        if name.lower() in ("date", "content-length"):
            continue
        theirs = ng_headers.get(name.lower())
        if theirs is None or theirs.replace(nid, "<id>") != value.replace(gid, "<id>"):
            problems.append(f"header {name}: gateway {value!r}, nginx {theirs!r}")
    if problems:
        raise BenchError(f"{label}: nginx's refusal is not the gateway's:\n" + "\n".join(problems))
    gw_names = {k.lower() for k, _ in gw.headers}
    return {
        "status": gw.status,
        "body_bytes": {"gateway": len(gw.body), "nginx": len(ng.body)},
        "request_id": {"gateway": gid, "nginx": nid},
        "headers": {"gateway": gw.headers, "nginx": ng.headers},
        "nginx_only_headers": [k for k, _ in ng.headers if k.lower() not in gw_names],
        "body_gateway": gw.body.decode(errors="replace"),
    }


# the benchmark ------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    cpu: int


@dataclass
class Run:
    round: int
    scenario: str
    proxy: str
    conns: int
    result: dict[str, Any]
    cpu_us_per_req: float  # the proxy's whole process tree
    redis_cpu_us_per_req: float | None
    foreign_cores: float  # CPU used by processes outside the benchmark during the run, in cores
    foreign_proxy_cpu_cores: float | None  # the same on the proxies' CPU alone
    steal_cores: float
    flags: list[str] = field(default_factory=list)
    ratelimit_redis_ops: float | None = None  # "200 limit": the gateway's rate-limit ops sent to Redis in the run

    @property
    def rps(self) -> float:
        return float(self.result["requests"]) / (float(self.result["duration_us"]) / 1e6)

    @property
    def valid_rps(self) -> float:
        return float(self.result["s200"]) / (float(self.result["duration_us"]) / 1e6)

    @property
    def bytes_per_response(self) -> float:
        return float(self.result["bytes"]) / max(1, int(self.result["requests"]))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        self.services: dict[str, Service] = {}
        self.started: list[subprocess.Popen[bytes]] = []
        self.pinned = {LOAD_CPU, PROXY_CPU} <= os.sched_getaffinity(0)
        self.ports: dict[str, int] = {}
        self.key = ""
        self.limited_key = ""  # the "200 limit" scenario's key: BENCH_LIMIT on it
        self.admin_urls: dict[str, str] = {}  # per gateway process
        self.unavailable: dict[str, str] = {}  # proxy or scenario -> why it is not measured (an older --gateway-dir)
        self.unknown_key = "gw_" + secrets.token_urlsafe(24)
        self.runs: list[Run] = []
        self.rounds: list[dict[str, Any]] = []
        self.lua: dict[str, Path] = {}
        self.loop = "asyncio"
        self.refusals: dict[str, Any] = {}

    # processes -----------------------------------------------------------

    def pin(self, cpu: int) -> list[str]:
        return ["taskset", "-c", str(cpu)] if self.pinned else []

    def spawn(
        self, name: str, argv: list[str], cpu: int, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> Service:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            # taskset execs the command: the pid is the service's own.
            proc = subprocess.Popen([*self.pin(cpu), *argv], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.started.append(proc)
        service = Service(name, proc, log, cpu)
        self.services[name] = service
        return service

    def stop(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.terminate()
        for proc in reversed(self.started):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def nginx(self, name: str, template: str, cpu: int, **values: str) -> Service:
        text = (NGINX_DIR / template).read_text()
        values = {"USER": "user root;" if os.geteuid() == 0 else "", "PREFIX": str(self.tmp), **values}
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        left = re.findall(r"@[A-Z_]+@", re.sub(r"(?m)^\s*#.*$", "", text))
        if left:
            raise BenchError(f"{template}: placeholders left unfilled: {', '.join(sorted(set(left)))}")
        conf = self.tmp / f"{name}.conf"
        conf.write_text(text)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        service = self.spawn(
            name, [nginx, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / f"{name}-error.log")], cpu
        )
        if not wait_for_children(service.proc.pid):
            raise BenchError(
                f"{name}: nginx did not start:\n{tail(service.log)}\n{tail(self.tmp / f'{name}-error.log')}"
            )
        return service

    def start(self) -> None:
        os.sched_setaffinity(0, {LOAD_CPU} if self.pinned else os.sched_getaffinity(0))
        (self.tmp / "1mib.bin").write_bytes(os.urandom(BIG_SIZE))
        self.ports["upstream"] = free_port()
        up = self.nginx("upstream", "upstream.conf", LOAD_CPU, PORT=str(self.ports["upstream"]), BODY=BODY)
        upstream = f"http://127.0.0.1:{self.ports['upstream']}"
        wait_http(upstream + SMALL_PATH, up.proc, up.log)

        self.start_gateway(upstream)
        self.start_naive(upstream)
        self.start_nginx()
        self.check()
        for name, script in (
            ("plain", LUA_DONE),
            ("count", LUA_COUNT + LUA_DONE),
            ("mix", LUA_COUNT + LUA_MIX + LUA_DONE),
        ):
            path = self.tmp / f"{name}.lua"
            path.write_text(script)
            self.lua[name] = path

    def start_gateway(self, upstream: str) -> None:
        redis_port = free_port()
        redis = shutil.which("redis-server") or "redis-server"
        self.spawn("redis", [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(self.tmp),
                             "--save", "", "--appendonly", "no"], LOAD_CPU)  # fmt: skip
        token, entry = self.admin_token()
        cfg: dict[str, Any] = {
            "admin": {"tokens": [entry]},
            "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "prefix": "bench:"},
            "routes": [{"name": "api", "path_prefix": "/api", "upstream": upstream}],
        }
        self.spawn_gateway("gateway", cfg)
        admin = self.admin_urls["gateway"]
        self.key = create_key(admin, token, "bench")
        try:
            self.limited_key = create_key(admin, token, "bench-limited", ratelimits=[BENCH_LIMIT])
        except BenchError as exc:
            self.unavailable["200 limit"] = f"no key with a limit: {exc}"
        if self.limited_key and len(self.limited_key) != len(self.key):
            raise BenchError(f"the two keys differ in length ({len(self.limited_key)} vs {len(self.key)})")
        # The same Redis and prefix: the same key table, so the same key (the same request bytes).
        try:
            self.spawn_gateway(NO_USAGE, {**cfg, "usage": {"enabled": False}})
        except BenchError as exc:
            if "usage.enabled" not in str(exc):
                raise
            self.unavailable[NO_USAGE] = "its config has no usage.enabled"
            self.services.pop(NO_USAGE, None)

    def spawn_gateway(self, name: str, base: dict[str, Any]) -> None:
        """A gateway process on CPU 1 on `base` (admin tokens, Redis, routes, ...) plus its own listeners."""
        self.ports[name], admin_port = free_port(), free_port()
        cfg = {
            **base,
            "listen": {"host": "127.0.0.1", "port": self.ports[name]},
            "admin": {**base["admin"], "listen": {"host": "127.0.0.1", "port": admin_port}},
        }
        cfg_path = self.tmp / (re.sub(r"[^a-z0-9]+", "-", name).strip("-") + ".yaml")
        cfg_path.write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, GATEWAY_LOG_LEVEL="warning", GATEWAY_LOGGING_LEVEL="warning")
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg_path)]
        serve_help = self._serve_help()
        if "--log-level" in serve_help:  # the per-request access log would dominate
            argv += ["--log-level", "warning"]
        if self.args.gateway_workers > 1:  # the workers are the gateway's process tree: all of them count
            argv += ["--workers", str(self.args.gateway_workers)]
        if "--loop" in serve_help:  # uvloop where installed, the gateway's default, asked for explicitly
            argv += ["--loop", "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"]
        gateway = self.spawn(name, argv, PROXY_CPU, env=env, cwd=self.args.gateway_dir)
        admin = f"http://127.0.0.1:{admin_port}"
        wait_http(admin + "/readyz", gateway.proc, gateway.log)
        self.admin_urls[name] = admin
        loop = "uvloop" if maps_uvloop(gateway.proc.pid) else "asyncio"
        if name == "gateway":
            self.loop = loop
        elif loop != self.loop:
            raise BenchError(f"{name}: on {loop}, the gateway on {self.loop}")

    def admin_token(self) -> tuple[str, dict[str, Any]]:
        """A new admin token and its config entry, from the gateway's own `hash-token --generate`."""
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "hash-token", "--generate", "--name", "bench", "--role", "admin"],
            cwd=self.args.gateway_dir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        token = next(
            (line.removeprefix("token: ") for line in out.stdout.splitlines() if line.startswith("token: ")), ""
        )
        entries = yaml.safe_load("\n".join(line for line in out.stdout.splitlines() if not line.startswith("token: ")))
        if out.returncode != 0 or not token or not isinstance(entries, list) or not entries:
            raise BenchError(f"gateway hash-token --generate failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return token, dict(entries[0])

    def start_naive(self, upstream: str) -> None:
        self.ports["naive"] = free_port()
        argv = [sys.executable, str(ROOT / "benchmarks" / "naive_proxy.py"), "--port", str(self.ports["naive"]),
                "--upstream", upstream, "--loop", self.loop]  # fmt: skip
        naive = self.spawn("naive", argv, PROXY_CPU)
        wait_http(f"http://127.0.0.1:{self.ports['naive']}{SMALL_PATH}", naive.proc, naive.log)
        said = re.search(r"naive: event loop (\S+)", naive.log.read_text(errors="replace"))
        on_uvloop = maps_uvloop(naive.proc.pid)
        if not said or on_uvloop != (self.loop == "uvloop") or ("uvloop" in said.group(1)) != on_uvloop:
            raise BenchError(f"naive proxy: not on the gateway's event loop ({self.loop}): {tail(naive.log)}")

    def start_nginx(self) -> None:
        """nginx: the proxy, and the refusal server block with the gateway's own 401s in it."""
        missing = fetch(self.ports["gateway"], SMALL_PATH, self.request_headers("none"))
        unknown = fetch(self.ports["gateway"], SMALL_PATH, self.request_headers("unknown"))
        for label, answer in (("no key", missing), ("unknown key", unknown)):
            if answer.status != 401:
                raise BenchError(f"gateway, {label}: expected 401, got {answer.status} {answer.body[:200]!r}")
        missing_headers, missing_body, missing_type = nginx_refusal(missing, 16)
        unknown_headers, unknown_body, unknown_type = nginx_refusal(unknown, 12)
        if missing_type != unknown_type:
            raise BenchError(f"the gateway's two 401s differ in Content-Type: {missing_type} vs {unknown_type}")
        self.ports["nginx"], self.ports["nginx-refuse"] = free_port(), free_port()
        peer = self.nginx(
            "nginx",
            "proxy.conf",
            PROXY_CPU,
            PORT=str(self.ports["nginx"]),
            UPSTREAM_PORT=str(self.ports["upstream"]),
            REFUSE_PORT=str(self.ports["nginx-refuse"]),
            MISSING_HEADERS=missing_headers,
            MISSING_BODY=missing_body,
            UNKNOWN_HEADERS=unknown_headers,
            UNKNOWN_BODY=unknown_body,
        )
        # default_type: the Content-Type of nginx's return (the template's is application/json)
        if missing_type.split(";")[0].strip() != "application/json":
            raise BenchError(f"the gateway's 401 is {missing_type}: benchmarks/nginx/proxy.conf says application/json")
        wait_http(f"http://127.0.0.1:{self.ports['nginx']}{SMALL_PATH}", peer.proc, peer.log)

    def _serve_help(self) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--help"],
            cwd=self.args.gateway_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout

    def request_headers(self, auth: str) -> list[tuple[str, str]]:
        """The request headers of a scenario: the same for every proxy."""
        headers = [("Host", HOST)]
        if auth == "valid":
            headers.append(("Authorization", f"Bearer {self.key}"))
        elif auth == "limited":
            headers.append(("Authorization", f"Bearer {self.limited_key}"))
        elif auth == "unknown":
            # The same unknown key all run long: the gateway's negative cache answers it.
            headers.append(("Authorization", f"Bearer {self.unknown_key}"))
        return headers

    def port(self, scenario: Scenario, proxy: str) -> int:
        return self.ports["nginx-refuse" if proxy == "nginx" and scenario.nginx_refuses else proxy]

    def check(self) -> None:
        """Before measuring: every proxy answers the upstream's bytes, and nginx refuses with the gateway's."""
        valid = self.request_headers("valid")
        for proxy in (*PROXIES, *((NO_USAGE,) if NO_USAGE not in self.unavailable else ())):
            for _ in range(3):  # the gateway's first request looks the key up in Redis: warm the cache
                answer = fetch(self.ports[proxy], SMALL_PATH, valid)
            if answer.status != 200 or answer.body.decode() != BODY:
                raise BenchError(f"{proxy}: GET {SMALL_PATH}: {answer.status} {answer.body[:200]!r}")
            answer = fetch(self.ports[proxy], BIG_PATH, valid)
            if answer.status != 200 or len(answer.body) != BIG_SIZE:
                raise BenchError(f"{proxy}: GET {BIG_PATH}: {answer.status}, {len(answer.body)} bytes")
        if "200 limit" not in self.unavailable:
            answer = fetch(self.ports["gateway"], SMALL_PATH, self.request_headers("limited"))
            if answer.status != 200 or answer.body.decode() != BODY:
                raise BenchError(f"gateway, key with a limit: {answer.status} {answer.body[:200]!r}")
        for scenario in SCENARIOS:
            if scenario.nginx_refuses:
                headers = self.request_headers(scenario.auth)
                gw = fetch(self.port(scenario, "gateway"), scenario.path, headers)
                ng = fetch(self.port(scenario, "nginx"), scenario.path, headers)
                self.refusals[scenario.name] = compare_refusals(scenario.name, gw, ng)

    # measuring -------------------------------------------------------------

    def wrk(self, scenario: Scenario, proxy: str, seconds: int) -> dict[str, Any]:
        argv = [*self.pin(LOAD_CPU), "wrk", "-t1", f"-c{scenario.conns}", f"-d{seconds}s", "--timeout", "5s",
                "-s", str(self.lua[scenario.script])]  # fmt: skip
        if scenario.auth != "mix":
            for name, value in self.request_headers(scenario.auth):
                argv += ["-H", f"{name}: {value}"]
        argv += [f"http://127.0.0.1:{self.port(scenario, proxy)}{scenario.path}", "--", self.key, str(scenario.every)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        for line in out.stdout.splitlines():
            if line.startswith("BENCH-JSON "):
                result: dict[str, Any] = json.loads(line.removeprefix("BENCH-JSON "))
                return result
        raise BenchError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")

    def foreign(self, s0: Snapshot, s1: Snapshot) -> tuple[float, float | None, float]:
        """Cores used outside the benchmark between two snapshots: on all CPUs, on the proxies' CPU; steal."""
        seconds = (s1.at - s0.at) * CLK_TCK
        me = os.getpid()  # every process of the benchmark is a descendant of this driver
        ours = s1.tree(me) - s0.tree(me)
        total = max(0.0, (s1.busy["cpu"] - s0.busy["cpu"] - ours) / seconds)
        on_proxy_cpu = None
        cpu = f"cpu{PROXY_CPU}"
        if self.pinned and cpu in s0.busy:
            proxies = [s.proc.pid for s in self.services.values() if s.cpu == PROXY_CPU]
            ours_there = sum(s1.tree(p) - s0.tree(p) for p in proxies)
            on_proxy_cpu = max(0.0, (s1.busy[cpu] - s0.busy[cpu] - ours_there) / seconds)
        return total, on_proxy_cpu, (s1.steal - s0.steal) / seconds

    @staticmethod
    def probe() -> float:
        """CPU milliseconds of a fixed piece of pure Python (best of 3; thread CPU time, so time spent
        preempted does not count): how fast the machine runs Python right now. Other guests sharing the
        host's cores and caches slow it; /proc/stat does not see them."""
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time()
            sum(i * i for i in range(300_000))
            best = min(best, time.thread_time() - t0)
        return best * 1000

    def settle(self) -> dict[str, Any]:
        """Before a round: wait (at most --settle seconds) until other processes use less than --max-foreign."""
        started = time.monotonic()
        while True:
            s0 = snapshot()
            time.sleep(1)
            load, _, _ = self.foreign(s0, snapshot())
            waited = time.monotonic() - started
            if load <= self.args.max_foreign or waited >= self.args.settle:
                return {"waited_seconds": round(waited, 1), "foreign_cores_before": round(load, 3)}

    def measure(self, rnd: int, scenario: Scenario, proxy: str) -> Run:
        for name, other in self.services.items():
            if other.proc.poll() is not None:
                raise BenchError(f"{name} exited ({other.proc.returncode}):\n{tail(other.log)}")
        if self.args.warmup > 0:
            self.wrk(scenario, proxy, self.args.warmup)
        ops0 = self.ratelimit_ops(proxy) if scenario.auth == "limited" else None
        s0 = snapshot()
        result = self.wrk(scenario, proxy, self.args.duration)
        s1 = snapshot()
        ops1 = self.ratelimit_ops(proxy) if scenario.auth == "limited" else None
        n = max(1, int(result["requests"]))
        root, redis = self.services[proxy].proc.pid, self.services["redis"].proc.pid
        foreign, on_proxy_cpu, steal = self.foreign(s0, s1)
        run = Run(
            rnd,
            scenario.name,
            proxy,
            scenario.conns,
            result,
            (s1.tree(root) - s0.tree(root)) / CLK_TCK * 1e6 / n,
            (s1.tree(redis) - s0.tree(redis)) / CLK_TCK * 1e6 / n if proxy.startswith("gateway") else None,
            foreign,
            on_proxy_cpu,
            steal,
            self.check_result(result, scenario),
        )
        if ops0 is not None and ops1 is not None:
            run.ratelimit_redis_ops = ops1 - ops0
            # The leased path: a top-up now and then, never a Redis op per request.
            if run.ratelimit_redis_ops > 2 + 0.001 * n:
                run.flags.append(f"{run.ratelimit_redis_ops:.0f} rate-limit ops to Redis for {n} requests: not leased")
        self.runs.append(run)
        self.report(run, scenario)
        return run

    def ratelimit_ops(self, proxy: str) -> float | None:
        """gateway_ratelimit_redis_ops_total from a gateway's /metrics (None when it has none)."""
        status, body = http("GET", self.admin_urls[proxy] + "/metrics")
        found = re.search(rb"^gateway_ratelimit_redis_ops_total (\S+)$", body, re.M) if status == 200 else None
        return float(found.group(1)) if found else None

    @staticmethod
    def check_result(result: dict[str, Any], scenario: Scenario) -> list[str]:
        flags = []
        socket_errors = {k: result[k] for k in ("connect", "read", "write", "timeout") if result[k]}
        if socket_errors:
            flags.append("socket errors " + ", ".join(f"{k} {v}" for k, v in socket_errors.items()))
        if result["requests"] == 0:
            flags.append("no requests completed")
        expect, every = scenario.expect, scenario.every
        if expect == "200" and result["status"]:
            flags.append(f"{result['status']} non-2xx answers")
        elif expect == "401" and (result["s401"] != result["requests"] or result["other"] or result["s200"]):
            flags.append(f"expected only 401: 200 x{result['s200']}, 401 x{result['s401']}, other x{result['other']}")
        elif expect == "mix":
            if result["other"]:
                flags.append(f"{result['other']} answers neither 200 nor 401")
            if every and abs(result["s401"] - result["requests"] / every) > 2 + result["requests"] * 0.01:
                flags.append(f"401 x{result['s401']} of {result['requests']}: not 1 in {every}")
            if not every and result["s401"]:
                flags.append(f"{result['s401']} 401s with valid keys only")
        if scenario.path == BIG_PATH and result["requests"] and result["bytes"] / result["requests"] < BIG_SIZE:
            flags.append("responses shorter than 1 MiB")
        return flags

    def report(self, run: Run, scenario: Scenario) -> None:
        result = run.result
        shown = f"valid {run.valid_rps:6.0f} rps" if scenario.expect == "mix" else f"{run.rps:12.0f} rps"
        lat = f"p50 {result['p50_us'] / 1000:6.2f} ms p99 {result['p99_us'] / 1000:6.2f} ms"
        warn = ("  !! " + "; ".join(run.flags)) if run.flags else ""
        busy = " (disturbed)" if run.foreign_cores > self.args.max_foreign else ""
        print(
            f"  r{run.round + 1} {scenario.title:<29} {run.proxy:<18} {shown}  {lat}  "
            f"cpu {run.cpu_us_per_req:7.1f} us/req  other load {run.foreign_cores:4.2f} cores{busy}{warn}",
            flush=True,
        )

    def plan(self, rnd: int) -> list[tuple[Scenario, str]]:
        """One round: every scenario once for each of its proxies, the proxies' order rotated by round."""
        runs = []
        for scenario in SCENARIOS:
            if scenario.name in self.unavailable:
                continue
            proxies = [p for p in scenario.proxies if p not in self.unavailable]
            k = rnd % len(proxies)
            runs += [(scenario, p) for p in (*proxies[k:], *proxies[:k])]
        return runs

    def run_round(self, rnd: int) -> None:
        settled = self.settle() if self.args.settle > 0 else {}
        probe = self.probe()
        print(f"round {rnd + 1}/{self.args.rounds} (python probe {probe:.1f} ms)", flush=True)
        first = len(self.runs)
        for scenario, proxy in self.plan(rnd):
            self.measure(rnd, scenario, proxy)
        loads = [r.foreign_cores for r in self.runs[first:]]
        self.rounds.append(
            {
                "round": rnd + 1,
                "disturbed": max(loads) > self.args.max_foreign,
                "foreign_cores_max": round(max(loads), 3),
                "foreign_cores_median": round(median(loads), 3),
                "disturbed_runs": sum(1 for x in loads if x > self.args.max_foreign),
                "runs": len(loads),
                "steal_cores_max": round(max(r.steal_cores for r in self.runs[first:]), 3),
                "python_probe_ms": round(probe, 2),
                **settled,
            }
        )


# summary ----------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, Any] | None:
    """Median, min, max and the values, or None when there are none."""
    if not values:
        return None
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values), "values": list(values)}


def summarize(runs: list[Run], disturbed: set[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for scenario in SCENARIOS:
        for proxy in scenario.proxies:
            mine = sorted((r for r in runs if r.scenario == scenario.name and r.proxy == proxy), key=lambda r: r.round)
            if not mine:
                continue
            nginx_of = scenario.nginx_of or scenario.name
            nginx = {r.round: r for r in runs if r.scenario == nginx_of and r.proxy == "nginx"}
            flood = scenario.expect == "mix"
            ratios = [(r.round, r.cpu_us_per_req / nginx[r.round].cpu_us_per_req)
                      for r in mine if r.round in nginx and nginx[r.round].cpu_us_per_req]  # fmt: skip
            clean = [r for r in mine if r.round not in disturbed]
            rows.append(
                {
                    "scenario": scenario.name,
                    "title": scenario.title,
                    "proxy": proxy,
                    "conns": scenario.conns,
                    "nginx_refuses": scenario.nginx_refuses and proxy == "nginx",
                    "rps": spread([r.valid_rps if flood else r.rps for r in mine]),
                    "rps_is_valid_traffic_only": flood,
                    "cpu_us_per_req": spread([r.cpu_us_per_req for r in mine]),
                    "cpu_us_per_req_undisturbed": spread([r.cpu_us_per_req for r in clean]),
                    "cpu_ratio_to_nginx": spread([x for _, x in ratios]) if proxy != "nginx" else None,
                    "cpu_ratio_to_nginx_undisturbed": spread([x for rnd, x in ratios if rnd not in disturbed])
                    if proxy != "nginx"
                    else None,
                    "p50_ms": median([r.result["p50_us"] / 1000 for r in mine]),
                    "p99_ms": median([r.result["p99_us"] / 1000 for r in mine]),
                    "bytes_per_response": median([r.bytes_per_response for r in mine]),
                    "redis_cpu_us_per_req": median([r.redis_cpu_us_per_req or 0.0 for r in mine])
                    if proxy.startswith("gateway")
                    else None,
                    "flagged_runs": sum(1 for r in mine if r.flags),
                }
            )
            if scenario.nginx_of:
                rows[-1]["nginx_of"] = scenario.nginx_of
            ops = [
                r.ratelimit_redis_ops / max(1, r.result["requests"]) for r in mine if r.ratelimit_redis_ops is not None
            ]
            if ops:
                rows[-1]["ratelimit_redis_ops_per_req"] = median(ops)
    return rows


def paired(
    runs: list[Run], disturbed: set[int], with_: tuple[str, str], without: tuple[str, str]
) -> dict[str, Any] | None:
    """What one (scenario, proxy) costs over another, run by run in the same round: CPU us per request
    added (with - without) and the ratio (with / without), median [min-max] over all and undisturbed rounds."""
    a = {r.round: r for r in runs if (r.scenario, r.proxy) == with_}
    b = {r.round: r for r in runs if (r.scenario, r.proxy) == without}
    both = sorted(set(a) & set(b))
    if not both:
        return None
    added = [(rnd, a[rnd].cpu_us_per_req - b[rnd].cpu_us_per_req) for rnd in both]
    ratio = [(rnd, a[rnd].cpu_us_per_req / b[rnd].cpu_us_per_req) for rnd in both if b[rnd].cpu_us_per_req]
    return {
        "with": {"scenario": with_[0], "proxy": with_[1]},
        "without": {"scenario": without[0], "proxy": without[1]},
        "added_cpu_us_per_req": spread([x for _, x in added]),
        "added_cpu_us_per_req_undisturbed": spread([x for rnd, x in added if rnd not in disturbed]),
        "ratio": spread([x for _, x in ratio]),
        "ratio_undisturbed": spread([x for rnd, x in ratio if rnd not in disturbed]),
    }


def costs(report: dict[str, Any]) -> list[str]:
    """The two costs (usage counting, a rate limit on the leased path) as text lines; none from an older
    bench.json without them."""
    figures, lines = report.get("key_figures", {}), []
    by = {(r["scenario"], r["proxy"]): r for r in report.get("summary", [])}
    usage = figures.get("usage_counting")
    if usage:
        on, off = by.get(USAGE_PAIR[0]), by.get(USAGE_PAIR[1])
        lines.append(
            f"per-key usage counting (200, 100 B JSON; gateway vs the same gateway with usage.enabled false, same "
            f"round): {fmt_spread(usage['added_cpu_us_per_req'], '.1f')} us per request "
            f"(undisturbed {fmt_spread(usage['added_cpu_us_per_req_undisturbed'], '.1f')}); "
            f"x nginx with counting {fmt_spread(on and on['cpu_ratio_to_nginx'], '.2f')}, "
            f"without {fmt_spread(off and off['cpu_ratio_to_nginx'], '.2f')}"
        )
    limit = figures.get("ratelimit_leased")
    if limit:
        row = by.get(LIMIT_PAIR[0])
        ops = row.get("ratelimit_redis_ops_per_req") if row else None
        lines.append(
            f"rate limit, leased path (key with a {BENCH_LIMIT['limit']:,}/{BENCH_LIMIT['window_seconds']}s limit vs "
            f"the key without, same round): {fmt_spread(limit['added_cpu_us_per_req'], '.1f')} us per request "
            f"(undisturbed {fmt_spread(limit['added_cpu_us_per_req_undisturbed'], '.1f')}); "
            f"limit / no limit {fmt_spread(limit['ratio'], '.3f')}"
            + (f"; rate-limit ops sent to Redis: {ops:.5f} per request" if ops is not None else "")
        )
    return lines


def fmt_spread(s: dict[str, Any] | None, spec: str, unit: str = "") -> str:
    if not s:
        return "-"
    return f"{s['median']:{spec}}{unit} [{s['min']:{spec}}-{s['max']:{spec}}]"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'scenario':<29} {'proxy':<18} {'req/s':>7} {'CPU us/req [min-max]':>22} {'x nginx [min-max]':>20} "
        f"{'undisturbed':>20} {'p50 ms':>7} {'p99 ms':>7} {'B/resp':>7}"
    )
    lines = [head, "-" * len(head)]
    last = ""
    for row in rows:
        title = row["title"] if row["title"] != last else ""
        last = row["title"]
        proxy = row["proxy"] + ("*" if row["nginx_refuses"] else "")
        flag = " !" if row["flagged_runs"] else ""
        clean = row["cpu_ratio_to_nginx_undisturbed"]
        lines.append(
            f"{title:<29} {proxy:<18} {row['rps']['median']:7.0f} {fmt_spread(row['cpu_us_per_req'], '.1f'):>22} "
            f"{fmt_spread(row['cpu_ratio_to_nginx'], '.2f'):>20} "
            f"{(fmt_spread(clean, '.2f') + ' (' + str(clean['n']) + ')') if clean else '-':>20} "
            f"{row['p50_ms']:7.2f} {row['p99_ms']:7.2f} {row['bytes_per_response']:7.0f}{flag}"
        )
    return "\n".join(lines)


def headline(report: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]:
    """(title, ratio over all rounds, ratio over undisturbed rounds) for the gateway, per headline scenario."""
    by = {(r["scenario"], r["proxy"]): r for r in report["summary"]}
    out = []
    for name in HEADLINE:
        row = by.get((name, "gateway"))
        if row:
            title = row["title"] + (" (both refuse)" if name.startswith("401") else "")
            out.append((title, row["cpu_ratio_to_nginx"], row["cpu_ratio_to_nginx_undisturbed"]))
    return out


def machine(gateway_dir: Path, loop: str) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiohttp

    loop_version = ""
    if loop == "uvloop":
        from importlib.metadata import version

        loop_version = " " + version("uvloop")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "event_loop": loop + loop_version,
        "nginx": command_output([nginx, "-v"]).removeprefix("nginx version: "),
        "wrk": command_output(["wrk", "-v"]).split(" [")[0],
        "redis": command_output(["redis-server", "--version"]),
        "gateway_dir": str(gateway_dir),
        "gateway_commit": command_output(
            ["git", "-C", str(gateway_dir), "describe", "--always", "--dirty"], must_succeed=True
        ),
    }


def chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (bash scripts/ensure-bench-tools.sh installs it)", file=sys.stderr)
        return False
    rows = [r for r in report["summary"] if r["conns"] == 64]
    colors = {"nginx": "#3a923a", "naive": "#e1812c", "gateway": "#3274a1", NO_USAGE: "#7fa7c9"}
    small = [r for r in rows if r["scenario"] != "1 MiB"]
    big = [r for r in rows if r["scenario"] == "1 MiB"]

    def label(r: dict[str, Any]) -> str:
        name = {"nginx": "nginx", "naive": "naive aiohttp", "gateway": "gateway", NO_USAGE: NO_USAGE}[r["proxy"]]
        if r["nginx_refuses"]:
            name = "nginx refusing"
        return name if r["scenario"] in ("200", "1 MiB") else f"{name}, {r['title']}"

    def panel(ax: Any, data: list[dict[str, Any]], metric: str, xlabel: str, ratio: bool) -> None:
        data = data[::-1]
        names = [label(r) for r in data]
        values = [r[metric]["median"] for r in data]
        lows = [v - r[metric]["min"] for v, r in zip(values, data, strict=True)]
        highs = [r[metric]["max"] - v for v, r in zip(values, data, strict=True)]
        ax.barh(names, values, xerr=[lows, highs], capsize=3, color=[colors[r["proxy"]] for r in data])
        top = max(v + h for v, h in zip(values, highs, strict=True)) or 1.0
        for i, r in enumerate(data):
            text = f"{values[i]:,.0f}" if values[i] >= 100 else f"{values[i]:.1f}"
            if ratio and r.get("cpu_ratio_to_nginx"):
                s = r["cpu_ratio_to_nginx"]
                text += f"  ({s['median']:.2f}x nginx, {s['min']:.2f}-{s['max']:.2f})"
            ax.text(values[i] + highs[i] + top * 0.01, i, text, va="center", fontsize=8)
        ax.set_xlim(0, top * 1.6)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)

    fig, axes = plt.subplots(2, 2, figsize=(14, 9), gridspec_kw={"height_ratios": [len(small), max(2, len(big))]})
    panel(axes[0][0], small, "cpu_us_per_req", "CPU us per request, whole process tree, c64 (lower is better)", True)
    axes[0][0].set_title("~100-byte JSON and 401s: CPU per request")
    panel(axes[0][1], small, "rps", "requests/s at c64 (flood rows: valid requests only)", False)
    axes[0][1].set_title("~100-byte JSON and 401s: throughput")
    axes[0][1].set_yticklabels([])
    if big:
        panel(axes[1][0], big, "cpu_us_per_req", "CPU us per request, whole process tree, c64", True)
        axes[1][0].set_title("1 MiB response: CPU per request")
        panel(axes[1][1], big, "rps", "requests/s at c64", False)
        axes[1][1].set_title("1 MiB response: throughput")
        axes[1][1].set_yticklabels([])
    info, s = report["machine"], report["settings"]
    fig.suptitle(
        f"gateway vs nginx vs naive aiohttp proxy - {report['date']} - {info['cpu_model']}, {info['nproc']} CPUs, "
        f"kernel {info['kernel']}, gateway {info['gateway_commit']}",
        fontsize=10,
    )
    d = report["disturbed"]
    fig.text(
        0.5,
        0.005,
        f"median of {s['rounds']} interleaved rounds, bars min-max, ratios per round ({d['rounds']} of "
        f"{s['rounds']} rounds disturbed by other load); proxies pinned to CPU 1, wrk, upstream and redis on CPU 0; "
        "401 rows: nginx refuses the same request itself",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def markdown(report: dict[str, Any]) -> str:
    """The results section of docs/performance.md, from bench.json alone."""
    info, s, d = report["machine"], report["settings"], report["disturbed"]
    lines = [
        f"Measured {report['date']} on {info['cpu_model']}, {info['nproc']} CPUs, kernel {info['kernel']}; "
        f"Python {info['python']}, aiohttp {info['aiohttp']}, event loop {info['event_loop']} (gateway and naive "
        f"proxy), {info['nginx']}, {info['wrk']}; gateway at `{info['gateway_commit']}`. `make bench`: "
        f"{s['rounds']} rounds of {s['duration_seconds']} s wrk runs (+{s['warmup_seconds']} s warm-up each), "
        f"wall time {report['wall_seconds'] / 60:.0f} min.",
        "",
        f"**Disturbed rounds: {d['rounds']} of {s['rounds']}** (other processes used more than "
        f"{d['threshold_cores']:g} cores during at least one run of the round; the most per round: "
        + ", ".join(f"{x:.2f}" for x in d["foreign_cores_max_per_round"])
        + "). Python probe per round (CPU ms of a fixed piece of Python; lower is faster): "
        + ", ".join(f"{r['python_probe_ms']:.1f}" for r in report["rounds"])
        + "."
        + (
            " Every round was disturbed: these figures come from a loaded machine; run `make bench` again "
            "on a quiet one before drawing conclusions."
            if d["rounds"] == s["rounds"]
            else ""
        ),
        "",
        "Gateway CPU per request / nginx's, whole process trees, per-round ratio: median [min-max] (rounds)",
        "",
        "| comparison | all rounds | undisturbed rounds |",
        "|---|---|---|",
    ]
    for title, every, clean in headline(report):
        lines.append(
            f"| {title} | **{fmt_spread(every, '.2f', 'x')}** ({every['n'] if every else 0}) | "
            f"{fmt_spread(clean, '.2f', 'x')} ({clean['n'] if clean else 0}) |"
        )
    flood = report["key_figures"].get("flood_valid_rps_ratio")
    if flood:
        lines += [
            "",
            f"Unknown-key flood: valid requests/s with one request in two carrying a fresh random unknown key, "
            f"over valid requests/s with all valid (same round): {fmt_spread(flood, '.2f')}.",
        ]
    lines += cost_markdown(report)
    lines += [
        "",
        "All rows, median [min-max] over all rounds (c64 unless noted; `nginx*`: nginx refusing itself):",
        "",
        "| scenario | proxy | req/s | CPU µs/req | × nginx | × nginx, undisturbed | p50 / p99 ms | bytes read/resp |",  # noqa: RUF001
        "|---|---|---|---|---|---|---|---|",
    ]
    last = ""
    for row in report["summary"]:
        title = row["title"] if row["title"] != last else ""
        last = row["title"]
        proxy = row["proxy"] + ("\\*" if row["nginx_refuses"] else "")
        rps = f"{row['rps']['median']:,.0f}" + (" valid" if row["rps_is_valid_traffic_only"] else "")
        lines.append(
            f"| {title} | {proxy} | {rps} | {fmt_spread(row['cpu_us_per_req'], '.1f')} | "
            f"{fmt_spread(row['cpu_ratio_to_nginx'], '.2f')} | "
            f"{fmt_spread(row['cpu_ratio_to_nginx_undisturbed'], '.2f')} | "
            f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f} | {row['bytes_per_response']:,.0f} |"
        )
    redis = [r["redis_cpu_us_per_req"] for r in report["summary"] if r.get("redis_cpu_us_per_req") is not None]
    lines += [
        "",
        f"Redis (not in the gateway's figures): at most {max(redis, default=0):.1f} µs per request in any gateway row.",
    ]
    return "\n".join(lines)


def cost_markdown(report: dict[str, Any]) -> list[str]:
    """What per-key usage counting and a rate limit (leased path) add, as a table; nothing for a bench.json
    written before they were measured."""
    figures = report["key_figures"]
    usage, limit = figures.get("usage_counting"), figures.get("ratelimit_leased")
    if not usage and not limit:
        return []
    by = {(r["scenario"], r["proxy"]): r for r in report["summary"]}
    lines = [
        "",
        "What two features add to the gateway's CPU per proxied request (200, 100 B JSON, c64), run against run "
        "in the same round: median [min-max] (rounds)",
        "",
        "| cost | added CPU µs/req, all rounds | undisturbed rounds | with / without | × nginx with / without |",  # noqa: RUF001
        "|---|---|---|---|---|",
    ]

    def row(title: str, figure: dict[str, Any], on: dict[str, Any] | None, off: dict[str, Any] | None) -> str:
        every, clean = figure["added_cpu_us_per_req"], figure["added_cpu_us_per_req_undisturbed"]
        return (
            f"| {title} | **{fmt_spread(every, '.1f')}** ({every['n'] if every else 0}) | "
            f"{fmt_spread(clean, '.1f')} ({clean['n'] if clean else 0}) | {fmt_spread(figure['ratio'], '.3f')} | "
            f"{fmt_spread(on and on['cpu_ratio_to_nginx'], '.2f')} / "
            f"{fmt_spread(off and off['cpu_ratio_to_nginx'], '.2f')} |"
        )

    if usage:
        title = "per-key usage counting (vs the same gateway with `usage.enabled: false`)"
        lines.append(row(title, usage, by.get(USAGE_PAIR[0]), by.get(USAGE_PAIR[1])))
    if limit:
        bench_limit = report["settings"].get("bench_ratelimit", BENCH_LIMIT)
        title = (
            f"a rate limit, leased path ({bench_limit['limit']:,} per {bench_limit['window_seconds']} s; "
            "vs the same request with a key without)"
        )
        lines.append(row(title, limit, by.get(LIMIT_PAIR[0]), by.get(LIMIT_PAIR[1])))
        ops = (by.get(LIMIT_PAIR[0]) or {}).get("ratelimit_redis_ops_per_req")
        if ops is not None:
            lines += ["", f"With the limit, rate-limit operations sent to Redis: {ops:.5f} per request (leased path)."]
    return lines


def write_docs(report: dict[str, Any], path: Path) -> bool:
    try:
        text = path.read_text()
    except OSError:
        print(f"bench: {path} is missing: its results section was not written", file=sys.stderr)
        return False
    begin, end = text.find(DOC_BEGIN), text.find(DOC_END)
    if begin < 0 or end < begin:
        print(f"bench: {path} has no results markers ({DOC_BEGIN} ... {DOC_END}): not written", file=sys.stderr)
        return False
    path.write_text(text[: begin + len(DOC_BEGIN)] + "\n\n" + markdown(report) + "\n\n" + text[end:])
    return True


def require_tools() -> None:
    missing = [t for t in ("wrk", "redis-server", "taskset") if not shutil.which(t)]
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        missing.insert(0, "nginx")
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)}: run `bash scripts/ensure-bench-tools.sh` (as root)")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    # Ctrl-C stops the run even when started from a shell that ignores SIGINT in background jobs.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def outputs(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    written = []
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        written.append(relative(args.json))
    if args.png and chart(report, args.png):
        written.append(relative(args.png))
    if args.docs and write_docs(report, args.docs):
        written.append(relative(args.docs))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4, help="whole seconds of each measured wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="whole seconds of wrk before each measured run (0: none)")
    parser.add_argument("--quick", action="store_true", help="a smoke check: 1 round of 2 s runs, writes no files")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="a round is disturbed when, in any of its runs, processes outside the benchmark used more CPU "
        "than this, in cores (default 0.15)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10,
        help="seconds to wait at most before each round for other load to fall below --max-foreign (0: do not wait)",
    )
    parser.add_argument(
        "--gateway-dir",
        type=Path,
        default=ROOT,
        help="the directory whose gateway/ package is measured (default: this checkout); e.g. an older checkout",
    )
    parser.add_argument("--gateway-workers", type=int, default=1, help="the gateway's --workers (default 1)")
    parser.add_argument("--json", type=Path, help=f"default {relative(RESULTS_JSON)} (none with --quick)")
    parser.add_argument("--png", type=Path, help=f"default {relative(CHART_PNG)} (none with --quick)")
    parser.add_argument("--docs", type=Path, help=f"default {relative(DOC_MD)} (none with --quick)")
    parser.add_argument(
        "--render-docs", type=Path, metavar="JSON", help="measure nothing: rewrite --docs (and --png) from this JSON"
    )
    args = parser.parse_args()
    if args.render_docs:
        saved: dict[str, Any] = json.loads(args.render_docs.read_text())
        args.json, args.png, args.docs = None, args.png or CHART_PNG, args.docs or DOC_MD
        print("wrote " + " and ".join(outputs(saved, args)))
        return
    if args.quick:
        args.rounds, args.duration = 1, 2
    else:
        args.json, args.png, args.docs = args.json or RESULTS_JSON, args.png or CHART_PNG, args.docs or DOC_MD
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        parser.error("--rounds and --duration must be at least 1, --warmup at least 0 (wrk takes whole seconds)")
    require_tools()
    started = time.monotonic()
    bench = Bench(args)
    if not bench.pinned:
        print("bench: CPUs 0 and 1 are not both usable: running unpinned, numbers are not comparable", file=sys.stderr)
    per_round = len(bench.plan(0))
    print(
        f"bench: {args.rounds} round(s) of {per_round} wrk runs of {args.duration} s (+{args.warmup} s warm-up each), "
        f"about {args.rounds * per_round * (args.duration + args.warmup + 0.5) / 60:.0f} min",
        flush=True,
    )
    try:
        with sigterm_as_interrupt():
            bench.start()
            info = machine(args.gateway_dir, bench.loop)
            print(
                f"bench: {info['cpu_model']}, {info['nproc']} CPUs, kernel {info['kernel']}; nginx {info['nginx']}, "
                f"{info['wrk']}, Python {info['python']}, aiohttp {info['aiohttp']}, {info['event_loop']}, "
                f"gateway {info['gateway_commit']}",
                flush=True,
            )
            for name, check in bench.refusals.items():
                print(
                    f"bench: {name}: nginx refuses with the gateway's body (bytes {check['body_bytes']['gateway']} "
                    f"vs {check['body_bytes']['nginx']}: the request id) and headers; nginx adds "
                    f"{', '.join(check['nginx_only_headers']) or 'nothing'}",
                    flush=True,
                )
            for rnd in range(args.rounds):
                bench.run_round(rnd)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
    except BenchError as exc:
        raise SystemExit(f"bench: {exc}") from None
    finally:
        bench.stop()

    disturbed = {r["round"] - 1 for r in bench.rounds if r["disturbed"]}
    rows = summarize(bench.runs, disturbed)
    flood_ratios = [
        m.valid_rps / a.valid_rps
        for m in bench.runs
        if m.scenario == "flood: 1 in 2 unknown"
        for a in bench.runs
        if a.scenario == "flood: all valid" and a.round == m.round and a.valid_rps
    ]
    wall = time.monotonic() - started
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": round(wall, 1),
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "duration_seconds": args.duration,
            "warmup_seconds": args.warmup,
            "pinning": {"proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU} if bench.pinned else None,
            "wrk": "-t1, one proxy at a time, every scenario once per round, proxies' order rotated each round",
            "request_headers": "Host: 127.0.0.1, and Authorization: Bearer <key> where the scenario has one, "
            "the same for every proxy",
            "cpu": "utime+stime+cutime+cstime of the proxy's whole process tree (/proc), per completed request",
            "gateway_workers": args.gateway_workers,
            "small_body_bytes": len(BODY),
            "no_usage_gateway": f"{NO_USAGE}: a second gateway process, same Redis and key table (same key), "
            "usage.enabled false, in the 200 scenario",
            "bench_ratelimit": BENCH_LIMIT,
            "not_measured": bench.unavailable,
            "big_body_bytes": BIG_SIZE,
        },
        "disturbed": {
            "threshold_cores": args.max_foreign,
            "rounds": len(disturbed),
            "which": sorted(r + 1 for r in disturbed),
            "foreign_cores_max_per_round": [r["foreign_cores_max"] for r in bench.rounds],
            "method": "busy time of /proc/stat (user+nice+system) minus the CPU time of the driver's process tree "
            "(every benchmark process), per second, during each measured run; a round is disturbed when any of "
            "its runs is above the threshold",
        },
        "key_figures": {
            "gateway_cpu_ratio_to_nginx": {
                row["scenario"]: {
                    "all_rounds": row["cpu_ratio_to_nginx"],
                    "undisturbed_rounds": row["cpu_ratio_to_nginx_undisturbed"],
                }
                for row in rows
                if row["proxy"] == "gateway" and row["scenario"] in HEADLINE
            },
            "flood_valid_rps_ratio": spread(flood_ratios),
            # gateway vs the same gateway with usage.enabled false (issue 12)
            "usage_counting": paired(bench.runs, disturbed, *USAGE_PAIR),
            # the key with a limit (leased path) vs the key without, on the gateway (issue 14)
            "ratelimit_leased": paired(bench.runs, disturbed, *LIMIT_PAIR),
        },
        "refusal_check": bench.refusals,
        "rounds": bench.rounds,
        "summary": rows,
        "runs": [
            {
                "round": r.round + 1,
                "scenario": r.scenario,
                "proxy": r.proxy,
                "conns": r.conns,
                "rps": r.rps,
                "valid_rps": r.valid_rps,
                "cpu_us_per_req": r.cpu_us_per_req,
                "redis_cpu_us_per_req": r.redis_cpu_us_per_req,
                "foreign_cores": r.foreign_cores,
                "foreign_cores_on_proxy_cpu": r.foreign_proxy_cpu_cores,
                "steal_cores": r.steal_cores,
                "flags": r.flags,
                "ratelimit_redis_ops": r.ratelimit_redis_ops,
                "wrk": r.result,
            }
            for r in bench.runs
        ],
    }
    print()
    print(table(rows))
    print()
    print(f"gateway CPU per request / nginx's in the same round, median [min-max] over {args.rounds} round(s):")
    for title, every, clean in headline(report):
        print(
            f"  {title:<38} {fmt_spread(every, '.2f', 'x'):<24} undisturbed: {fmt_spread(clean, '.2f', 'x')}"
            f" ({clean['n'] if clean else 0} rounds)"
        )
    if flood_ratios:
        print(
            f"flood: valid rps with 1 in 2 random unknown keys / all valid = {fmt_spread(spread(flood_ratios), '.2f')}"
        )
    for line in costs(report):
        print(line)
    for what, why in bench.unavailable.items():
        print(f"not measured: {what}: {why}")
    print(
        f"disturbed rounds: {len(disturbed)} of {args.rounds} (other processes above {args.max_foreign:g} cores in "
        f"a run; most per round: {', '.join(format(r['foreign_cores_max'], '.2f') for r in bench.rounds)})"
    )
    flagged = [r for r in bench.runs if r.flags]
    for r in flagged:
        print(f"flagged: round {r.round + 1} {r.scenario} {r.proxy}: {'; '.join(r.flags)}")
    print(
        "columns: CPU us/req = utime+stime of the proxy's whole process tree per completed request; x nginx = "
        "ratio to nginx in the same scenario and round, median [min-max] over rounds (nginx*: nginx refusing the "
        "request itself, with the gateway's body; 200, key with a limit: against nginx's 200 run); undisturbed = "
        "the same over rounds without other load (count)"
    )
    written = outputs(report, args)
    print(("\nwrote " + " and ".join(written) + "; " if written else "\n") + f"wall time {wall:.0f} s")
    sys.exit(1 if flagged else 0)


if __name__ == "__main__":
    main()
