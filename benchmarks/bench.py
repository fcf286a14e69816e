"""The proxy benchmark (`make bench`): the gateway next to nginx and a naive aiohttp proxy.

Starts, on loopback: a static upstream (nginx: `return 200` with a ~100-byte JSON, and a
1 MiB file), nginx as a keep-alive reverse proxy to it (the peer, one worker), a plain
aiohttp pass-through proxy (the naive baseline, benchmarks/naive_proxy.py) and the gateway
(one process, its own redis-server, a valid key, cache warm). Each proxy under test runs on
CPU 1; wrk, the upstream nginx, redis-server and this driver on CPU 0. wrk drives one proxy at
a time; every scenario is run once per round, the proxies' order rotated each round, and the
table shows the median over rounds and the ratio to nginx measured in the same round.

A proxy's CPU per request is the growth of its own utime+stime (/proc/<pid>/stat; for nginx the
worker, not the master) during the run, divided by the requests wrk completed.

Scenarios: proxied 200 at c64 and c1 (nginx, naive, gateway); the gateway's 401 path (no key,
an unknown key) at c64; a flood: every second request with a fresh random unknown key vs. all
valid (valid-traffic rps in both); a 1 MiB response through each proxy at c64.

Writes benchmarks/results/bench.json and docs/bench.png.

    .venv/bin/python benchmarks/bench.py [--rounds 3] [--duration 5] [--warmup 1] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
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
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.admin.auth import hash_token  # noqa: E402

NGINX_DIR: Final = ROOT / "benchmarks" / "nginx"
RESULTS_JSON: Final = ROOT / "benchmarks" / "results" / "bench.json"
CHART_PNG: Final = ROOT / "docs" / "bench.png"

LOAD_CPU: Final = 0  # wrk, upstream nginx, redis-server, this driver
PROXY_CPU: Final = 1  # the proxy under test
PROXIES: Final = ("nginx", "naive", "gateway")
SMALL_PATH: Final = "/api/hello"
BIG_PATH: Final = "/api/1mib.bin"
BIG_SIZE: Final = 1 << 20
# ~100 bytes, the upstream's answer to SMALL_PATH.
BODY: Final = '{"id":"ord_7Hq2kP9x","status":"shipped","items":3,"total":{"amount":4250,"currency":"EUR"},"ok":true}'
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

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
  valid = wrk.format(nil, nil, {["Authorization"] = "Bearer " .. args[1]})
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
    return wrk.format(nil, nil, {["Authorization"] = "Bearer " .. random_key()})
  end
  return valid
end
"""


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def machine_busy() -> int:
    """Busy clock ticks of all CPUs (user, nice, system, steal; not irq/softirq, which our own traffic causes)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(f) for f in fields[:8])
    return user + nice + system + steal


def children_cpu() -> float:
    """CPU seconds of this process's finished children (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def http(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310 - loopback URLs
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


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


def command_output(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    measure_pid: int = 0  # whose CPU counts: the process itself, or nginx's worker

    def __post_init__(self) -> None:
        if not self.measure_pid:
            self.measure_pid = self.proc.pid


@dataclass
class Run:
    round: int
    group: str
    proxy: str
    label: str
    conns: int
    result: dict[str, Any]
    cpu_us_per_req: float
    redis_cpu_us_per_req: float | None
    flags: list[str] = field(default_factory=list)
    foreign_cores: float = 0.0  # CPU used by processes not the benchmark's during the run, in cores
    attempts: int = 1

    @property
    def rps(self) -> float:
        return float(self.result["requests"]) / (self.result["duration_us"] / 1e6)

    @property
    def valid_rps(self) -> float:
        return float(self.result["s200"]) / (self.result["duration_us"] / 1e6)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
        self.services: dict[str, Service] = {}
        self.started: list[subprocess.Popen[bytes]] = []
        affinity = os.sched_getaffinity(0)
        self.pinned = {LOAD_CPU, PROXY_CPU} <= affinity
        self.urls: dict[str, str] = {}
        self.key = ""
        self.runs: list[Run] = []
        self.lua: dict[str, Path] = {}
        self.deadline = time.monotonic() + args.budget  # repeats of disturbed runs stop in time for this
        self.planned = 0
        self.unknown_key = "gw_" + secrets.token_urlsafe(24)

    # processes -----------------------------------------------------------

    def pin(self, cpu: int) -> list[str]:
        return ["taskset", "-c", str(cpu)] if self.pinned else []

    def spawn(
        self, name: str, argv: list[str], cpu: int, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> Service:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([*self.pin(cpu), *argv], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.started.append(proc)
        service = Service(name, proc, log)
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

    def nginx(self, name: str, template: str, port: int, cpu: int, **values: str) -> Service:
        text = (NGINX_DIR / template).read_text()
        values = {
            "USER": "user root;" if os.geteuid() == 0 else "",
            "PREFIX": str(self.tmp),
            "PORT": str(port),
            **values,
        }
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        if "@" in re.sub(r"#.*", "", text):
            raise BenchError(f"{template}: a placeholder was left unfilled")
        conf = self.tmp / f"{name}.conf"
        conf.write_text(text)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        service = self.spawn(
            name, [nginx, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / f"{name}-error.log")], cpu
        )
        deadline = time.monotonic() + 10
        while not (workers := children_of(service.proc.pid)):
            if service.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"{name}: nginx did not start:\n{tail(service.log)}\n{tail(self.tmp / f'{name}-error.log')}"
                )
            time.sleep(0.05)
        service.measure_pid = workers[0]
        return service

    def start(self) -> None:
        os.sched_setaffinity(0, {LOAD_CPU} if self.pinned else os.sched_getaffinity(0))
        (self.tmp / "1mib.bin").write_bytes(os.urandom(BIG_SIZE))
        upstream_port = free_port()
        up = self.nginx("upstream", "upstream.conf", upstream_port, LOAD_CPU, BODY=BODY)
        upstream = f"http://127.0.0.1:{upstream_port}"
        wait_http(upstream + SMALL_PATH, up.proc, up.log)

        port = free_port()
        peer = self.nginx("nginx", "proxy.conf", port, PROXY_CPU, UPSTREAM_PORT=str(upstream_port))
        self.urls["nginx"] = f"http://127.0.0.1:{port}"

        port = free_port()
        naive = self.spawn(
            "naive",
            [sys.executable, str(ROOT / "benchmarks" / "naive_proxy.py"), "--port", str(port), "--upstream", upstream],
            PROXY_CPU,
        )
        self.urls["naive"] = f"http://127.0.0.1:{port}"

        redis_port = free_port()
        redis = shutil.which("redis-server") or "redis-server"
        self.spawn(
            "redis",
            [
                redis,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.tmp),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            LOAD_CPU,
        )
        token = "gwadm_bench_" + secrets.token_urlsafe(16)
        proxy_port, admin_port = free_port(), free_port()
        cfg = {
            "listen": {"host": "127.0.0.1", "port": proxy_port},
            "admin": {
                "listen": {"host": "127.0.0.1", "port": admin_port},
                "tokens": [{"name": "bench", "role": "admin", "hash": hash_token(token)}],
            },
            "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "prefix": "bench:"},
            "routes": [{"name": "api", "path_prefix": "/api", "upstream": upstream}],
        }
        cfg_path = self.tmp / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, GATEWAY_LOG_LEVEL="warning", GATEWAY_LOGGING_LEVEL="warning")
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg_path)]
        if "--log-level" in self._serve_help():  # the per-request access log would dominate
            argv += ["--log-level", "warning"]
        gateway = self.spawn("gateway", argv, PROXY_CPU, env=env, cwd=self.args.gateway_dir)
        self.urls["gateway"] = f"http://127.0.0.1:{proxy_port}"
        admin = f"http://127.0.0.1:{admin_port}"

        wait_http(self.urls["nginx"] + SMALL_PATH, peer.proc, peer.log)
        wait_http(self.urls["naive"] + SMALL_PATH, naive.proc, naive.log)
        wait_http(admin + "/readyz", gateway.proc, gateway.log)
        status, body = http(
            "POST",
            admin + "/v1/keys",
            {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            json.dumps({"name": "bench"}).encode(),
        )
        if status not in (200, 201):
            raise BenchError(f"creating a key: {status} {body[:300]!r}")
        self.key = json.loads(body)["key"]
        self.check()
        for name, script in (
            ("plain", LUA_DONE),
            ("count", LUA_COUNT + LUA_DONE),
            ("mix", LUA_COUNT + LUA_MIX + LUA_DONE),
        ):
            path = self.tmp / f"{name}.lua"
            path.write_text(script)
            self.lua[name] = path

    def _serve_help(self) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--help"],
            cwd=self.args.gateway_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout

    def check(self) -> None:
        """One request each way before measuring: every proxy answers what the upstream answers."""
        auth = {"Authorization": f"Bearer {self.key}"}
        for proxy in PROXIES:
            headers = auth if proxy == "gateway" else {}
            for _ in range(3):  # the gateway's first request looks the key up in Redis: warm the cache
                status, body = http("GET", self.urls[proxy] + SMALL_PATH, headers)
            if status != 200 or body.decode() != BODY:
                raise BenchError(f"{proxy}: GET {SMALL_PATH}: {status} {body[:200]!r}")
            status, body = http("GET", self.urls[proxy] + BIG_PATH, headers)
            if status != 200 or len(body) != BIG_SIZE:
                raise BenchError(f"{proxy}: GET {BIG_PATH}: {status}, {len(body)} bytes")
        for headers in ({}, {"Authorization": "Bearer gw_" + secrets.token_urlsafe(24)}):
            status, body = http("GET", self.urls["gateway"] + SMALL_PATH, headers)
            if status != 401:
                raise BenchError(f"gateway: expected 401, got {status} {body[:200]!r}")

    # measuring -------------------------------------------------------------

    def wrk(
        self, url: str, conns: int, seconds: int, script: str, headers: Sequence[str], args: Sequence[str]
    ) -> dict[str, Any]:
        argv = [
            *self.pin(LOAD_CPU),
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(self.lua[script]),
        ]
        for h in headers:
            argv += ["-H", h]
        argv += [url, "--", *args]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        for line in out.stdout.splitlines():
            if line.startswith("BENCH-JSON "):
                result: dict[str, Any] = json.loads(line.removeprefix("BENCH-JSON "))
                return result
        raise BenchError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")

    def measure(
        self,
        rnd: int,
        group: str,
        proxy: str,
        label: str,
        conns: int,
        path: str,
        *,
        script: str = "plain",
        key: str | None = None,
        every: int = 0,
        expect: str = "200",
    ) -> Run:
        for name, other in self.services.items():
            if other.proc.poll() is not None:
                raise BenchError(f"{name} exited ({other.proc.returncode}):\n{tail(other.log)}")
        service = self.services[proxy]
        headers = [f"Authorization: Bearer {key}"] if key and script != "mix" else []
        args = [key or "-", str(every)]
        url = self.urls[proxy] + path
        ours = {
            "proxy": service.measure_pid,
            "upstream": self.services["upstream"].measure_pid,
            "redis": self.services["redis"].proc.pid,
            "self": os.getpid(),
        }

        def snapshot() -> dict[str, int]:
            return {k: cpu_ticks(v) for k, v in ours.items()}

        best: Run | None = None
        for attempt in range(1 + self.args.retries):
            if attempt and not self.can_repeat():
                break
            if self.args.warmup > 0:
                self.wrk(url, conns, self.args.warmup, script, headers, args)
            busy0, ticks0, wrk0, t0 = machine_busy(), snapshot(), children_cpu(), time.monotonic()
            result = self.wrk(url, conns, self.args.duration, script, headers, args)
            busy1, ticks1, wrk1, t1 = machine_busy(), snapshot(), children_cpu(), time.monotonic()
            used = {k: (ticks1[k] - ticks0[k]) / CLK_TCK for k in ours}
            # CPU time on this machine that none of the benchmark's processes used, per second of the run.
            foreign = max(0.0, (busy1 - busy0) / CLK_TCK - sum(used.values()) - (wrk1 - wrk0)) / (t1 - t0)
            n = max(1, int(result["requests"]))
            run = Run(
                rnd,
                group,
                proxy,
                label,
                conns,
                result,
                used["proxy"] * 1e6 / n,
                used["redis"] * 1e6 / n if proxy == "gateway" else None,
                self.check_result(result, path, expect, every),
                foreign_cores=foreign,
                attempts=attempt + 1,
            )
            if best is None or run.foreign_cores < best.foreign_cores:
                best = run
            self.report(run, expect, retry=attempt > 0)
            if foreign <= self.args.max_foreign:
                break
        assert best is not None
        self.runs.append(best)
        return best

    @staticmethod
    def check_result(result: dict[str, Any], path: str, expect: str, every: int) -> list[str]:
        flags = []
        socket_errors = {k: result[k] for k in ("connect", "read", "write", "timeout") if result[k]}
        if socket_errors:
            flags.append("socket errors " + ", ".join(f"{k} {v}" for k, v in socket_errors.items()))
        if result["requests"] == 0:
            flags.append("no requests completed")
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
        if path == BIG_PATH and result["requests"] and result["bytes"] / result["requests"] < BIG_SIZE:
            flags.append("responses shorter than 1 MiB")
        return flags

    @staticmethod
    def report(run: Run, expect: str, *, retry: bool) -> None:
        result = run.result
        shown = f"valid {run.valid_rps:6.0f} rps" if expect == "mix" else f"{run.rps:12.0f} rps"
        lat = f"p50 {result['p50_us'] / 1000:6.2f} ms p99 {result['p99_us'] / 1000:6.2f} ms"
        warn = ("  !! " + "; ".join(run.flags)) if run.flags else ""
        print(
            f"  r{run.round + 1}{'*' if retry else ' '} {run.label:<22} {run.proxy:<8} c{run.conns:<3} {shown}  {lat}  "
            f"cpu {run.cpu_us_per_req:7.1f} us/req  other load {run.foreign_cores:4.2f} cores{warn}",
            flush=True,
        )

    def plan(self, rnd: int) -> list[dict[str, Any]]:
        """One round's runs, as arguments of `measure`; each group's order rotates with the round."""

        def rotated(items: Sequence[str]) -> list[str]:
            k = rnd % len(items)
            return [*items[k:], *items[:k]]

        key = self.key
        runs: list[dict[str, Any]] = []
        for conns in (64, 1):
            for proxy in rotated(PROXIES):
                runs.append({"group": "200", "proxy": proxy, "label": "200, 100 B JSON", "conns": conns,
                             "path": SMALL_PATH, "key": key})  # fmt: skip
        for which in rotated(("401 no key", "401 unknown key")):
            # The unknown key is the same all run long: the negative cache answers it.
            unknown = None if which == "401 no key" else self.unknown_key
            runs.append({"group": which, "proxy": "gateway", "label": which, "conns": 64, "path": SMALL_PATH,
                         "script": "count", "key": unknown, "expect": "401"})  # fmt: skip
        for every in rotated(("0", "2")):
            label = "flood: all valid" if every == "0" else "flood: 1 in 2 unknown"
            runs.append({"group": label, "proxy": "gateway", "label": label, "conns": 64, "path": SMALL_PATH,
                         "script": "mix", "key": key, "every": int(every), "expect": "mix"})  # fmt: skip
        for proxy in rotated(PROXIES):
            runs.append({"group": "1 MiB", "proxy": proxy, "label": "1 MiB response", "conns": 64,
                         "path": BIG_PATH, "key": key})  # fmt: skip
        return runs

    def can_repeat(self) -> bool:
        """A repeat fits if every run still to come fits too, before the time budget ends."""
        left = self.planned - len(self.runs)  # this run's repeat included
        per_run = self.args.warmup + self.args.duration + 0.5
        return time.monotonic() + left * per_run < self.deadline


# summary ----------------------------------------------------------------------


def select(runs: list[Run], group: str, proxy: str, conns: int) -> list[Run]:
    return [r for r in runs if r.group == group and r.proxy == proxy and r.conns == conns]


def per_round_ratio(runs: list[Run], a: list[Run], ref_group: str, metric: str) -> list[float]:
    out = []
    for run in a:
        ref = select([r for r in runs if r.round == run.round], ref_group, "nginx", 64)
        if ref:
            mine, theirs = getattr(run, metric), getattr(ref[0], metric)
            if theirs:
                out.append(mine / theirs)
    return out


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    layout = [
        *[("200", p, "200, 100 B JSON", "200") for p in PROXIES],
        ("401 no key", "gateway", "401, no key", "200"),
        ("401 unknown key", "gateway", "401, unknown key (cached)", "200"),
        ("flood: all valid", "gateway", "flood: all valid", "200"),
        ("flood: 1 in 2 unknown", "gateway", "flood: 1 in 2 random unknown", "200"),
        *[("1 MiB", p, "1 MiB response", "1 MiB") for p in PROXIES],
    ]
    for group, proxy, title, ref in layout:
        c64 = select(runs, group, proxy, 64)
        if not c64:
            continue
        c1 = select(runs, group, proxy, 1)
        flood = group.startswith("flood")
        rps = [r.valid_rps if flood else r.rps for r in c64]
        cpu = [r.cpu_us_per_req for r in c64]
        cpu_ratio = per_round_ratio(runs, c64, ref, "cpu_us_per_req")
        rps_ratio = per_round_ratio(runs, c64, group if not flood else ref, "rps") if not flood else []
        rows.append(
            {
                "scenario": title,
                "group": group,
                "proxy": proxy,
                "rps_c64": median(rps),
                "rps_c64_rounds": rps,
                "rps_is_valid_traffic_only": flood,
                "p50_c1_ms": median([r.result["p50_us"] / 1000 for r in c1]) if c1 else None,
                "p99_c1_ms": median([r.result["p99_us"] / 1000 for r in c1]) if c1 else None,
                "p50_c64_ms": median([r.result["p50_us"] / 1000 for r in c64]),
                "p99_c64_ms": median([r.result["p99_us"] / 1000 for r in c64]),
                "cpu_us_per_req": median(cpu),
                "cpu_us_per_req_rounds": cpu,
                "cpu_spread_pct": (max(cpu) - min(cpu)) / median(cpu) * 100 if len(cpu) > 1 and median(cpu) else 0.0,
                "cpu_ratio_to_nginx": median(cpu_ratio) if cpu_ratio else None,
                "cpu_ratio_to_nginx_rounds": cpu_ratio,
                "cpu_ratio_reference": f"nginx, {ref}, same round",
                "rps_ratio_to_nginx": median(rps_ratio) if rps_ratio else None,
                "redis_cpu_us_per_req": median([r.redis_cpu_us_per_req or 0.0 for r in c64])
                if proxy == "gateway"
                else None,
                "flagged_runs": sum(1 for r in [*c64, *c1] if r.flags),
                "other_load_cores": median([r.foreign_cores for r in c64]),
                "repeated_runs": sum(1 for r in [*c64, *c1] if r.attempts > 1),
            }
        )
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'scenario':<29} {'proxy':<8} {'rps c64':>8} {'p50 c1':>7} {'p99 c1':>7} {'p50 c64':>8} "
        f"{'p99 c64':>8} {'CPU us/req':>10} {'x nginx':>8} {'rps/nginx':>9} {'spread':>7} {'other':>5}"
    )
    lines = [head, "-" * len(head)]
    last = ""
    for row in rows:
        scenario = row["scenario"] if row["scenario"] != last else ""
        last = row["scenario"]
        flag = " !" if row["flagged_runs"] else ""
        lines.append(
            f"{scenario:<29} {row['proxy']:<8} {row['rps_c64']:8.0f} {fmt(row['p50_c1_ms'], '7.2f'):>7} "
            f"{fmt(row['p99_c1_ms'], '7.2f'):>7} {row['p50_c64_ms']:8.2f} {row['p99_c64_ms']:8.2f} "
            f"{row['cpu_us_per_req']:10.1f} {fmt(row['cpu_ratio_to_nginx'], '7.2f') + 'x':>8} "
            f"{fmt(row['rps_ratio_to_nginx'], '8.2f') + 'x' if row['rps_ratio_to_nginx'] else '-':>9} "
            f"{row['cpu_spread_pct']:6.0f}% {row['other_load_cores']:5.2f}{flag}"
        )
    return "\n".join(lines)


def machine(gateway_dir: Path) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiohttp

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "nginx": command_output([nginx, "-v"]).removeprefix("nginx version: "),
        "wrk": command_output(["wrk", "-v"]).split(" [")[0],
        "redis": command_output(["redis-server", "--version"]),
        "gateway_dir": str(gateway_dir),
        "gateway_commit": command_output(["git", "-C", str(gateway_dir), "describe", "--always", "--dirty"]),
    }


def chart(rows: list[dict[str, Any]], title: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (bash scripts/ensure-bench-tools.sh installs it)", file=sys.stderr)
        return False
    colors = {"nginx": "#3a923a", "naive": "#e1812c", "gateway": "#3274a1"}
    small = [r for r in rows if r["group"] != "1 MiB"]
    big = [r for r in rows if r["group"] == "1 MiB"]

    def label(r: dict[str, Any]) -> str:
        if r["group"] == "200" or r["group"] == "1 MiB":
            return {"nginx": "nginx (peer)", "naive": "naive aiohttp", "gateway": "gateway"}[r["proxy"]]
        return "gateway, " + r["scenario"]

    def panel(ax: Any, data: list[dict[str, Any]], metric: str, rounds: str, xlabel: str, ratio: str | None) -> None:
        names = [label(r) for r in data][::-1]
        values = [r[metric] for r in data][::-1]
        lows = [v - min(r[rounds]) for v, r in zip(values, data[::-1], strict=True)]
        highs = [max(r[rounds]) - v for v, r in zip(values, data[::-1], strict=True)]
        ax.barh(names, values, xerr=[lows, highs], capsize=3, color=[colors[r["proxy"]] for r in data[::-1]])
        top = max(v + h for v, h in zip(values, highs, strict=True)) or 1.0
        for i, r in enumerate(data[::-1]):
            text = f"{values[i]:,.0f}" if values[i] >= 100 else f"{values[i]:.1f}"
            if ratio and r.get(ratio) and r["proxy"] != "nginx":
                text += f"  ({r[ratio]:.1f}x nginx)"
            ax.text(values[i] + highs[i] + top * 0.01, i, text, va="center", fontsize=8)
        ax.set_xlim(0, top * 1.45)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), gridspec_kw={"height_ratios": [len(small), max(2, len(big))]})
    panel(
        axes[0][0],
        small,
        "cpu_us_per_req",
        "cpu_us_per_req_rounds",
        "proxy CPU us per request, c64 (lower is better)",
        "cpu_ratio_to_nginx",
    )
    axes[0][0].set_title("~100-byte JSON: CPU per request")
    panel(axes[0][1], small, "rps_c64", "rps_c64_rounds", "requests/s at c64 (flood rows: valid requests only)", None)
    axes[0][1].set_title("~100-byte JSON: throughput")
    axes[0][1].set_yticklabels([])
    if big:
        panel(
            axes[1][0],
            big,
            "cpu_us_per_req",
            "cpu_us_per_req_rounds",
            "proxy CPU us per request, c64",
            "cpu_ratio_to_nginx",
        )
        axes[1][0].set_title("1 MiB response: CPU per request")
        panel(axes[1][1], big, "rps_c64", "rps_c64_rounds", "requests/s at c64", None)
        axes[1][1].set_title("1 MiB response: throughput")
        axes[1][1].set_yticklabels([])
    fig.suptitle(title, fontsize=10)
    fig.text(
        0.5,
        0.005,
        "proxy pinned to CPU 1; wrk, upstream nginx and redis on CPU 0; median of rounds, "
        "bars show min-max; nginx rps is bounded by CPU 0 (wrk + upstream)",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="whole seconds of each measured wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="whole seconds of wrk before each measured run (0: none)")
    parser.add_argument("--quick", action="store_true", help="a smoke check: 1 round of 2 s runs")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.15,
        help="a run during which other processes used more CPU than this (in cores) is repeated",
    )
    parser.add_argument("--retries", type=int, default=2, help="repeats of a run disturbed by other processes")
    parser.add_argument(
        "--budget",
        type=float,
        default=360,
        help="seconds the whole measurement may take: disturbed runs are repeated only while every run fits",
    )
    parser.add_argument(
        "--gateway-dir",
        type=Path,
        default=ROOT,
        help="the directory whose gateway/ package is measured (default: this checkout); e.g. an older checkout",
    )
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    parser.add_argument("--png", type=Path, default=CHART_PNG)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        parser.error("--rounds and --duration must be at least 1, --warmup at least 0 (wrk takes whole seconds)")
    require_tools()
    started = time.monotonic()
    bench = Bench(args)
    if not bench.pinned:
        print("bench: CPUs 0 and 1 are not both usable: running unpinned, numbers are not comparable", file=sys.stderr)
    info = machine(args.gateway_dir)
    print(
        f"bench: {info['cpu_model']}, {info['nproc']} CPUs, kernel {info['kernel']}; nginx {info['nginx']}, "
        f"{info['wrk']}, Python {info['python']}, aiohttp {info['aiohttp']}, gateway {info['gateway_commit']}"
    )
    print(f"bench: {args.rounds} round(s) of {args.duration:g} s runs (+{args.warmup:g} s warm-up each)", flush=True)
    try:
        with sigterm_as_interrupt():
            bench.start()
            plans = [bench.plan(rnd) for rnd in range(args.rounds)]
            bench.planned = sum(len(p) for p in plans)
            for rnd, plan in enumerate(plans):
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
                for run in plan:
                    bench.measure(rnd, **run)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
    except BenchError as exc:
        raise SystemExit(f"bench: {exc}") from None
    finally:
        bench.stop()

    rows = summarize(bench.runs)
    print()
    print(table(rows))
    by = {(r["group"], r["proxy"]): r for r in rows}
    gw, ng = by.get(("200", "gateway")), by.get(("200", "nginx"))
    key_ratio = gw["cpu_ratio_to_nginx"] if gw else None
    flood_ratios = [
        m.valid_rps / a.valid_rps
        for m in bench.runs
        if m.group == "flood: 1 in 2 unknown"
        for a in bench.runs
        if a.group == "flood: all valid" and a.round == m.round and a.valid_rps
    ]
    flood_ratio = median(flood_ratios) if flood_ratios else None
    print()
    if gw and ng and key_ratio is not None:
        rounds = ", ".join(f"{x:.2f}" for x in gw["cpu_ratio_to_nginx_rounds"])
        print(
            f"key figure: gateway CPU/request / nginx CPU/request (200, c64) = {key_ratio:.2f}x  "
            f"({gw['cpu_us_per_req']:.1f} / {ng['cpu_us_per_req']:.1f} us; per round {rounds}; "
            f"floor <= 4x, aim <= 2x)"
        )
    if flood_ratio is not None:
        print(
            f"flood: valid-traffic rps with 1 in 2 random unknown keys / all valid = {flood_ratio:.2f} "
            f"(per round {', '.join(f'{x:.2f}' for x in flood_ratios)}; target >= 0.8)"
        )
    flagged = [r for r in bench.runs if r.flags]
    for r in flagged:
        print(f"flagged: round {r.round + 1} {r.label} {r.proxy} c{r.conns}: {'; '.join(r.flags)}")
    print(
        "columns: latency in ms (wrk); CPU us/req = the proxy process's own utime+stime per completed request "
        "at c64; x nginx = per-round ratio to nginx in the same round (401/flood rows: to nginx's 200), "
        "median over rounds; spread = (max-min)/median of CPU us/req over rounds; other = CPU cores used by "
        "processes outside the benchmark during the c64 runs (median); a run with more than --max-foreign is repeated"
    )

    wall = time.monotonic() - started
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = {
        "date": date,
        "wall_seconds": round(wall, 1),
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "duration_seconds": args.duration,
            "warmup_seconds": args.warmup,
            "pinning": {"proxy_cpu": PROXY_CPU, "load_cpu": LOAD_CPU} if bench.pinned else None,
            "wrk": "-t1, c1 and c64, one proxy at a time, proxies' order rotated each round",
            "small_body_bytes": len(BODY),
            "big_body_bytes": BIG_SIZE,
        },
        "key_figures": {
            "gateway_cpu_per_request_over_nginx": key_ratio,
            "gateway_cpu_per_request_over_nginx_rounds": gw["cpu_ratio_to_nginx_rounds"] if gw else [],
            "flood_valid_rps_ratio": flood_ratio,
            "flood_valid_rps_ratio_rounds": flood_ratios,
        },
        "summary": rows,
        "runs": [
            {
                "round": r.round + 1,
                "group": r.group,
                "proxy": r.proxy,
                "conns": r.conns,
                "rps": r.rps,
                "valid_rps": r.valid_rps,
                "cpu_us_per_req": r.cpu_us_per_req,
                "redis_cpu_us_per_req": r.redis_cpu_us_per_req,
                "flags": r.flags,
                "wrk": r.result,
            }
            for r in bench.runs
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    title = (
        f"gateway vs nginx vs naive aiohttp proxy - {date} - {info['cpu_model']}, {info['nproc']} CPUs, "
        f"kernel {info['kernel']}, gateway {info['gateway_commit']}"
    )
    drawn = chart(rows, title, args.png)
    print(
        f"\nwrote {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}"
        + (f" and {args.png.relative_to(ROOT) if args.png.is_relative_to(ROOT) else args.png}" if drawn else "")
        + f"; wall time {wall:.0f} s"
    )
    sys.exit(1 if flagged else 0)


if __name__ == "__main__":
    main()
