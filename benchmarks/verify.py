"""The verify-mode benchmark: the gateway as nginx's auth_request verifier, next to the mechanism's floor.

Starts, on loopback: a static upstream (nginx, bench.py's `return 200` with a ~100-byte JSON;
benchmarks/nginx/verify-upstream.conf), the gateway (one process, its own redis-server, a verify
listener with `trusted_proxies: [127.0.0.1/32]` and one `mode: verify` route for /api, a valid key
created through the admin API, cache warm, `--log-level warning`: no access log), a static nginx
verifier (verify-static.conf: 200 with the gateway's four identity headers), and a front nginx (one
worker, verify-front.conf) with three server blocks that differ only in what answers auth_request:

- gateway: the configuration docs/verify-proxies.md ships, rendered by tests/verify_proxies.py's
  `site_nginx` (the same text), its verifier the gateway's verify listener;
- floor: the same server block with the verify location replaced by `return 200`: auth_request's
  own cost, with a verifier that costs nothing and is not reached over HTTP;
- floor over HTTP: the same server block, its verifier the static nginx: the mechanism as shipped
  (subrequest, HTTP hop, identity headers copied upstream) with a verifier that does no work.

Pinning (2 CPUs): the gateway, and the static verifier (its stand-in in one row), alone on CPU 1;
the front nginx, the upstream, redis-server, wrk and this driver on CPU 0. The figure asked for is
the verifier's CPU per verification, so the verifier gets a core nobody else uses; the front nginx
runs in every row (floor included) and shares CPU 0 with the rest of the load, the same way in
every row. CPU 0 is usually the bottleneck of the rows through nginx, so their req/s is not the
gateway's limit; the "direct" row (wrk to the verify listener, no nginx) is.

Scenarios, every one once per round, their order rotated each round (c16 unless --conns: the
shipped config keeps 16 idle keep-alive connections to the verifier and to the API, and more
requests in flight than that open and close a connection per request):

- gateway: a valid key through the front nginx and the gateway (200 from the upstream);
- floor, floor over HTTP: the same request through the two floor blocks;
- refusal: a fixed unknown key through the gateway block (the gateway's negative cache answers;
  nginx answers 401 with the gateway's body from X-Gateway-Error-Body);
- direct: wrk to the verify listener itself, `GET /verify` with the headers the front nginx sends
  it (X-Forwarded-Method/-Uri/-Host/-Proto/-For, X-Original-Method/-URI, Host, Authorization);
- direct-refusal: the same with the unknown key. auth_request's subrequest is header-only, and nginx
  keeps a verifier connection for another request only when the answer has no body (seen with a
  stand-in verifier: a 200 or a 401 with a body, a new connection per request; without, none). The
  shipped nginx configuration therefore asks for a refusal's body in X-Gateway-Error-Body only
  (`X-Gateway-Refusal-Body: header`); before it did, every refusal through nginx cost the gateway
  a TCP accept and close (171 us against 42 us). "new conns/req" is the TCP connections accepted on
  the host per completed request during a run (/proc/net/snmp PassiveOpens; other processes add
  noise);
- paced: the gateway row held at --rate (default 5,000) verifications/s. wrk has no constant-rate
  mode: its Lua `delay()` (called before each request is written) hands every request the next
  slot of one schedule, 1/rate apart, read from CLOCK_MONOTONIC through LuaJIT's FFI; a request
  more than 5 ms late makes the schedule start again from now (the missed slots are lost: the
  achieved rate is reported, and a run below 97% of the target is flagged). wrk's timers have
  1 ms resolution, so requests leave in small bursts within each millisecond. wrk measures latency
  from the moment a request is written (after its delay) to its response: the service time at
  that rate, not counting a client's queueing.

CPU per request is bench.py's: the growth of utime+stime (and reaped children's) of a process's
whole tree (/proc/<pid>/stat) during a wrk run, divided by the requests wrk completed; for the
gateway, the gateway's tree (Redis is apart, reported alone). "Per core" is 1e6 / (gateway CPU us
per verification): verifications per second of one fully used core. The total of a row is the front
nginx plus its verifier (the gateway or the static nginx; none for the floor); the upstream is the
same in every row and left out (it is in verify.json). Ratios are taken within a round; every figure
is the median over rounds with the range (min-max). Disturbed rounds are bench.py's: other processes
used more than --max-foreign cores during any run of the round.

Writes benchmarks/results/verify.json (not with --quick unless --json is given) and prints a
markdown table for docs/performance.md.

    .venv/bin/python benchmarks/verify.py [--rounds 5] [--duration 4] [--warmup 1] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.verify_proxies: the nginx configuration the docs ship

import bench  # noqa: E402 - benchmarks/, this script's directory
from bench import (  # noqa: E402
    BODY,
    CLK_TCK,
    HOST,
    LOAD_CPU,
    LUA_COUNT,
    LUA_DONE,
    PROXY_CPU,
    SMALL_PATH,
    Answer,
    BenchError,
    create_key,
    fetch,
    fmt_spread,
    free_port,
    maps_uvloop,
    relative,
    snapshot,
    spread,
    tail,
    wait_http,
)

from tests.verify_proxies import VERIFY_PATH, site_nginx  # noqa: E402

RESULTS_JSON: Final = ROOT / "benchmarks" / "results" / "verify.json"
WHOAMI_PATH: Final = "/api/whoami"
VERIFIER_CPU: Final = PROXY_CPU  # the gateway; the static nginx verifier in its row
PACE_SLACK_MS: Final = 5.0  # a request later than this behind its slot restarts the schedule
PACE_SHORTFALL: Final = 0.97  # a paced run below this share of the target rate is flagged
IDENTITY: Final = ("X-Gateway-Key-Id", "X-Gateway-Key-Owner", "X-Gateway-Key-Scopes", "X-Request-Id")

# wrk Lua: one schedule per wrk thread (we run one), a slot every 1/rate s; see the docstring.
LUA_PACED: Final = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } verify_bench_timespec;
int clock_gettime(int clk_id, verify_bench_timespec *tp);
]]
local ts = ffi.new("verify_bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval, slack, slot = 1, 5, nil
function init(args)
  interval = 1000 / tonumber(args[1])
  slack = tonumber(args[2])
end
function delay()
  local now = now_ms()
  if slot == nil then slot = now else slot = slot + interval end
  if slot < now - slack then slot = now end
  local wait = slot - now
  if wait < 0 then return 0 end
  return math.floor(wait + 0.5) -- whole milliseconds: wrk's timers
end
"""


@dataclass(frozen=True)
class Case:
    name: str  # the key in verify.json
    title: str
    port: str  # which listener wrk drives (a key of VerifyBench.ports)
    auth: str  # "valid" or "unknown"
    script: str = "plain"  # "plain" (wrk's fast path), "count" (statuses counted), "paced"
    expect: str = "200"
    verifier: str | None = "gateway"  # the service answering the verify question, None: nginx itself
    through_nginx: bool = True


CASES: Final = (
    Case("gateway", "front nginx -> gateway verify, valid key", "front", "valid"),
    Case("floor", "floor: auth_request to `return 200`", "floor", "valid", verifier=None),
    Case("floor-http", "floor over HTTP: static nginx verifier", "floor_http", "valid", verifier="static"),
    Case("refusal", "front nginx -> gateway verify, unknown key (401)", "front", "unknown", "count", "401"),
    Case("direct", "wrk -> gateway verify listener (no nginx)", "verify", "valid", through_nginx=False),
    Case(
        "direct-refusal",
        "wrk -> gateway verify listener, unknown key",
        "verify",
        "unknown",
        "count",
        "401",
        through_nginx=False,
    ),
    Case("paced", "front nginx -> gateway verify, paced", "front", "valid", "paced"),
)
SERVICES: Final = ("gateway", "front", "static", "upstream", "redis")


@dataclass
class Run:
    round: int
    case: str
    conns: int
    result: dict[str, Any]
    cpu_us: dict[str, float]  # per completed request, per service's process tree
    cores: dict[str, float]  # CPU used during the run, in cores, per service
    foreign_cores: float
    foreign_verifier_cpu_cores: float | None
    steal_cores: float
    tcp_opens_per_req: float  # TCP connections accepted on this host per completed request (all listeners)
    flags: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return float(self.result["requests"]) / (float(self.result["duration_us"]) / 1e6)

    def total_us(self, case: Case) -> float:
        """CPU per request of the front nginx and its verifier (the gateway's alone in the direct row)."""
        front = self.cpu_us["front"] if case.through_nginx else 0.0
        return front + (self.cpu_us[case.verifier] if case.verifier else 0.0)


class VerifyBench(bench.Bench):
    """bench.Bench's processes, pinning, /proc accounting and disturbed-round detection, for verify mode."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.vruns: list[Run] = []
        self.identity: dict[str, str] = {}
        self.checks: dict[str, Any] = {}

    # processes -------------------------------------------------------------

    def start(self) -> None:
        os.sched_setaffinity(0, {LOAD_CPU} if self.pinned else os.sched_getaffinity(0))
        self.ports["upstream"] = free_port()
        up = self.nginx("upstream", "verify-upstream.conf", LOAD_CPU, PORT=str(self.ports["upstream"]), BODY=BODY)
        wait_http(f"http://127.0.0.1:{self.ports['upstream']}{SMALL_PATH}", up.proc, up.log)
        self.start_verify_gateway()
        self.start_static_verifier()
        self.start_front()
        self.check()
        for name, script in (("plain", LUA_DONE), ("count", LUA_COUNT + LUA_DONE), ("paced", LUA_PACED + LUA_DONE)):
            path = self.tmp / f"{name}.lua"
            path.write_text(script)
            self.lua[name] = path

    def start_verify_gateway(self) -> None:
        """The gateway with a verify listener and one verify route; bench.py's admin token and key creation."""
        redis_port = free_port()
        self.spawn("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(self.tmp),
                             "--save", "", "--appendonly", "no"], LOAD_CPU)  # fmt: skip
        token, entry = self.admin_token()
        self.ports["gateway"], self.ports["verify"], admin_port = free_port(), free_port(), free_port()
        cfg = {
            "listen": {"host": "127.0.0.1", "port": self.ports["gateway"]},
            "admin": {"listen": {"host": "127.0.0.1", "port": admin_port}, "tokens": [entry]},
            "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "prefix": "bench:"},
            "verify": {"listen": {"host": "127.0.0.1", "port": self.ports["verify"]}},
            "trusted_proxies": ["127.0.0.1/32"],
            "routes": [{"name": "api", "path_prefix": "/api", "mode": "verify"}],
        }
        cfg_path = self.tmp / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg_path), "--log-level", "warning"]
        if "--loop" in self._serve_help():  # uvloop where installed, the gateway's default, asked for explicitly
            argv += ["--loop", "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"]
        env = dict(os.environ, GATEWAY_LOG_LEVEL="warning")
        gateway = self.spawn("gateway", argv, VERIFIER_CPU, env=env, cwd=self.args.gateway_dir)
        admin = f"http://127.0.0.1:{admin_port}"
        wait_http(admin + "/readyz", gateway.proc, gateway.log)
        self.loop = "uvloop" if maps_uvloop(gateway.proc.pid) else "asyncio"
        self.key = create_key(admin, token, "bench-verify")
        for _ in range(3):  # the first question looks the key up in Redis: warm the cache
            answer = fetch(self.ports["verify"], VERIFY_PATH, self.request_headers("valid", through_nginx=False))
        if answer.status != 200:
            raise BenchError(f"the verify listener refused a valid key: {answer.status} {answer.body[:300]!r}")
        missing = [name for name in IDENTITY if answer.header(name) is None]
        if missing:
            raise BenchError(f"the verify listener's 200 lacks {', '.join(missing)}: {answer.headers}")
        self.identity = {name: answer.header(name) or "" for name in IDENTITY}

    def start_static_verifier(self) -> None:
        values = {
            "KEY_ID": "X-Gateway-Key-Id",
            "KEY_OWNER": "X-Gateway-Key-Owner",
            "KEY_SCOPES": "X-Gateway-Key-Scopes",
        }
        for placeholder, name in values.items():
            if not re.fullmatch(r"[A-Za-z0-9_.:@ -]*", self.identity[name]):
                raise BenchError(f"{name} {self.identity[name]!r}: not quoted by verify-static.conf")
            values[placeholder] = self.identity[name]
        self.ports["static"] = free_port()
        self.nginx("static", "verify-static.conf", VERIFIER_CPU, PORT=str(self.ports["static"]), **values)

    def start_front(self) -> None:
        """The shipped site (gateway block) and the two floors derived from its server block."""
        self.ports["front"], self.ports["floor"], self.ports["floor_http"] = free_port(), free_port(), free_port()
        site = site_nginx(
            f"127.0.0.1:{self.ports['verify']}",
            f"127.0.0.1:{self.ports['upstream']}",
            f"127.0.0.1:{self.ports['front']}",
        )
        sites = [site, *floor_sites(site, self.ports["front"], self.ports["floor"], self.ports["floor_http"],
                                    self.ports["static"])]  # fmt: skip
        text = "\n".join("".join(f"    {line}\n" if line else "\n" for line in s.splitlines()) for s in sites)
        front = self.nginx("front", "verify-front.conf", LOAD_CPU, SITES=text.rstrip("\n"))
        wait_http(f"http://127.0.0.1:{self.ports['floor']}{SMALL_PATH}", front.proc, front.log)

    def request_headers(self, auth: str, *, through_nginx: bool = True) -> list[tuple[str, str]]:
        """wrk's request headers: the client's (Host, Authorization), or for the verify listener the
        headers the front nginx sends it (the shipped /_gateway_verify location's proxy_set_header)."""
        key = self.key if auth == "valid" else self.unknown_key
        headers = [("Host", HOST)]
        if not through_nginx:
            headers += [
                ("X-Forwarded-Method", "GET"),
                ("X-Forwarded-Uri", SMALL_PATH),
                ("X-Forwarded-Host", HOST),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-For", "127.0.0.1"),
                ("X-Original-Method", "GET"),
                ("X-Original-URI", SMALL_PATH),
            ]
        return [*headers, ("Authorization", f"Bearer {key}")]

    def check(self) -> None:
        """Before measuring: each block answers the upstream's body, the identity reaches the upstream,
        and a refusal reaches the client with the gateway's status and body."""
        valid = self.request_headers("valid")
        for port in ("front", "floor", "floor_http"):
            answer = fetch(self.ports[port], SMALL_PATH, valid)
            if answer.status != 200 or answer.body.decode() != BODY:
                raise BenchError(f"{port}: GET {SMALL_PATH}: {answer.status} {answer.body[:200]!r}")
        for port, expected in (("front", self.identity["X-Gateway-Key-Id"]), ("floor_http", self.identity[
                "X-Gateway-Key-Id"]), ("floor", "")):  # fmt: skip
            answer = fetch(self.ports[port], WHOAMI_PATH, valid)
            if answer.status != 200 or answer.body.decode() != f"key-id={expected}":
                raise BenchError(f"{port}: the upstream saw {answer.body[:200]!r}, expected key-id={expected}")
        unknown = self.request_headers("unknown")
        through = fetch(self.ports["front"], SMALL_PATH, unknown)
        direct = fetch(self.ports["verify"], VERIFY_PATH, self.request_headers("unknown", through_nginx=False))
        self.checks["refusal"] = compare_refusal(direct, through)

    # measuring -------------------------------------------------------------

    def vwrk(self, case: Case, seconds: int) -> dict[str, Any]:
        conns = self.args.paced_conns if case.script == "paced" else self.args.conns
        argv = [*self.pin(LOAD_CPU), "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "--latency",
                "-s", str(self.lua[case.script])]  # fmt: skip
        for name, value in self.request_headers(case.auth, through_nginx=case.through_nginx):
            argv += ["-H", f"{name}: {value}"]
        path = SMALL_PATH if case.through_nginx else VERIFY_PATH
        argv += [f"http://127.0.0.1:{self.ports[case.port]}{path}", "--", str(self.args.rate), str(PACE_SLACK_MS)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        for line in out.stdout.splitlines():
            if line.startswith("BENCH-JSON "):
                result: dict[str, Any] = json.loads(line.removeprefix("BENCH-JSON "))
                return result
        raise BenchError(f"wrk gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")

    def vmeasure(self, rnd: int, case: Case) -> Run:
        for name, service in self.services.items():
            if service.proc.poll() is not None:
                raise BenchError(f"{name} exited ({service.proc.returncode}):\n{tail(service.log)}")
        if self.args.warmup > 0:
            self.vwrk(case, self.args.warmup)
        opens0, s0 = tcp_passive_opens(), snapshot()
        result = self.vwrk(case, self.args.duration)
        s1, opens1 = snapshot(), tcp_passive_opens()
        n = max(1, int(result["requests"]))
        seconds = (s1.at - s0.at) * CLK_TCK
        ticks = {name: s1.tree(self.services[name].proc.pid) - s0.tree(self.services[name].proc.pid)
                 for name in SERVICES}  # fmt: skip
        foreign, on_verifier_cpu, steal = self.foreign(s0, s1)
        run = Run(
            rnd,
            case.name,
            self.args.paced_conns if case.script == "paced" else self.args.conns,
            result,
            {name: t / CLK_TCK * 1e6 / n for name, t in ticks.items()},
            {name: t / seconds for name, t in ticks.items()},
            foreign,
            on_verifier_cpu,
            steal,
            (opens1 - opens0) / n,
            self.check_run(result, case),
        )
        self.vruns.append(run)
        self.say(run, case)
        return run

    def check_run(self, result: dict[str, Any], case: Case) -> list[str]:
        flags = []
        socket_errors = {k: result[k] for k in ("connect", "read", "write", "timeout") if result[k]}
        if socket_errors:
            flags.append("socket errors " + ", ".join(f"{k} {v}" for k, v in socket_errors.items()))
        if result["requests"] == 0:
            flags.append("no requests completed")
        if case.expect == "200" and result["status"]:
            flags.append(f"{result['status']} non-2xx answers")
        if case.expect == "401" and (result["s401"] != result["requests"] or result["s200"] or result["other"]):
            flags.append(f"expected only 401: 200 x{result['s200']}, 401 x{result['s401']}, other x{result['other']}")
        if case.script == "paced":
            rps = float(result["requests"]) / (float(result["duration_us"]) / 1e6)
            if rps < PACE_SHORTFALL * self.args.rate:
                flags.append(f"paced at {rps:.0f}/s: below {PACE_SHORTFALL:.0%} of {self.args.rate}/s")
        return flags

    def say(self, run: Run, case: Case) -> None:
        r = run.result
        gw = f"{case.verifier:<7} {run.cpu_us[case.verifier]:6.1f} us" if case.verifier else " " * 17
        busy = " (disturbed)" if run.foreign_cores > self.args.max_foreign else ""
        warn = ("  !! " + "; ".join(run.flags)) if run.flags else ""
        print(
            f"  r{run.round + 1} {case.name:<14} {run.rps:6.0f} rps  {gw}  front nginx {run.cpu_us['front']:5.1f} us  "
            f"total {run.total_us(case):6.1f} us  p50 {r['p50_us'] / 1000:5.2f} p99 {r['p99_us'] / 1000:6.2f} ms  "
            f"new conns/req {run.tcp_opens_per_req:4.2f}  other load {run.foreign_cores:4.2f}{busy}{warn}",
            flush=True,
        )

    def vround(self, rnd: int) -> None:
        settled = self.settle() if self.args.settle > 0 else {}
        probe = self.probe()
        print(f"round {rnd + 1}/{self.args.rounds} (python probe {probe:.1f} ms)", flush=True)
        first = len(self.vruns)
        k = rnd % len(CASES)
        for case in (*CASES[k:], *CASES[:k]):
            self.vmeasure(rnd, case)
        loads = [r.foreign_cores for r in self.vruns[first:]]
        self.rounds.append(
            {
                "round": rnd + 1,
                "disturbed": max(loads) > self.args.max_foreign,
                "foreign_cores_max": round(max(loads), 3),
                "disturbed_runs": sum(1 for x in loads if x > self.args.max_foreign),
                "steal_cores_max": round(max(r.steal_cores for r in self.vruns[first:]), 3),
                "python_probe_ms": round(probe, 2),
                "order": [c.name for c in (*CASES[k:], *CASES[:k])],
                **settled,
            }
        )


def tcp_passive_opens() -> int:
    """TCP connections accepted so far in this network namespace (/proc/net/snmp Tcp: PassiveOpens).
    Every listener of the benchmark is on this host: per request, it shows a connection opened per
    request (a keep-alive connection not reused) as about 1; other processes' connections add noise."""
    rows = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("PassiveOpens")])


def floor_sites(site: str, front: int, floor: int, floor_http: int, static: int) -> list[str]:
    """The two floor server blocks, from the shipped site's server block: its verify location
    answering `return 200` itself, and its verifier the static nginx (a copy of the shipped verifier
    upstream block, renamed). Fails if the shipped text no longer has the parts this edits."""
    server = site[site.index("\nserver {") + 1 :]
    listen = f"listen 127.0.0.1:{front};"
    location = re.compile(r"(?ms)^    location = /_gateway_verify \{\n.*?^    \}\n")
    upstream = re.search(r"(?ms)^upstream gateway_verify \{\n.*?^\}\n", site)
    if server.count(listen) != 1 or len(location.findall(server)) != 1 or upstream is None:
        raise BenchError("tests/verify_proxies.py's nginx site changed shape: update floor_sites()")
    local = location.sub(
        "    location = /_gateway_verify {\n        internal;\n        return 200;\n    }\n", server
    ).replace(listen, f"listen 127.0.0.1:{floor};")
    pass_line = "proxy_pass http://gateway_verify"  # noqa: S105 - not a password
    if server.count(pass_line) != 1:
        raise BenchError("tests/verify_proxies.py's nginx site changed shape: update floor_sites()")
    static_upstream = re.sub(r"server [^;]+;", f"server 127.0.0.1:{static};", upstream.group(0), count=1)
    over_http = (
        static_upstream.replace("upstream gateway_verify", "upstream static_verify")
        + "\n"
        + server.replace(pass_line, "proxy_pass http://static_verify").replace(
            listen, f"listen 127.0.0.1:{floor_http};"
        )
    )
    return ["# floor: auth_request to `return 200` in nginx itself\n" + local,
            "# floor over HTTP: the static nginx verifier\n" + over_http]  # fmt: skip


def compare_refusal(direct: Answer, through: Answer) -> dict[str, Any]:
    """The gateway's 401 (asked directly) and what the client got through nginx: the same status and
    body but for the request id, WWW-Authenticate copied."""
    problems = []
    if direct.status != 401 or through.status != 401:
        problems.append(f"status: gateway {direct.status}, through nginx {through.status} (expected 401)")
    did, tid = direct.header("X-Request-Id") or "", through.header("X-Request-Id") or ""
    if not did or not tid:
        problems.append(f"X-Request-Id missing: gateway {did!r}, through nginx {tid!r}")
    elif direct.body.replace(did.encode(), b"<id>") != through.body.replace(tid.encode(), b"<id>"):
        problems.append(f"bodies differ:\n  gateway {direct.body!r}\n  nginx   {through.body!r}")
    if direct.header("WWW-Authenticate") != through.header("WWW-Authenticate"):
        problems.append(
            f"WWW-Authenticate: {direct.header('WWW-Authenticate')!r} vs {through.header('WWW-Authenticate')!r}"
        )
    if problems:
        raise BenchError("the refusal through nginx is not the gateway's:\n" + "\n".join(problems))
    return {"status": through.status, "body_bytes": len(through.body), "body": through.body.decode(errors="replace")}


# summary ----------------------------------------------------------------------


def per_round(runs: list[Run], name: str) -> dict[int, Run]:
    return {r.round: r for r in runs if r.case == name}


def summarize(runs: list[Run], disturbed: set[int], rate: int) -> dict[str, Any]:
    cases = {c.name: c for c in CASES}
    rows: list[dict[str, Any]] = []
    floor, floor_http = per_round(runs, "floor"), per_round(runs, "floor-http")
    for case in CASES:
        mine = sorted(per_round(runs, case.name).values(), key=lambda r: r.round)
        if not mine:
            continue
        verifier = [r.cpu_us[case.verifier] for r in mine] if case.verifier else []

        def ratio(base: dict[int, Run], *, clean: bool = False, mine: list[Run] = mine, case: Case = case) -> Any:
            return spread([r.total_us(case) / base[r.round].total_us(cases[base[r.round].case])
                           for r in mine if r.round in base and (not clean or r.round not in disturbed)])  # fmt: skip

        rows.append(
            {
                "scenario": case.name,
                "title": case.title,
                "conns": mine[0].conns,
                "rps": spread([r.rps for r in mine]),
                "verifier": case.verifier,
                "verifier_cpu_us": spread(verifier),
                "verifier_cpu_us_undisturbed": spread(
                    [r.cpu_us[case.verifier] for r in mine if r.round not in disturbed] if case.verifier else []
                ),
                "verifications_per_core_second": spread([1e6 / v for v in verifier if v]),
                "verifier_cores": spread([r.cores[case.verifier] for r in mine]) if case.verifier else None,
                "front_nginx_cpu_us": spread([r.cpu_us["front"] for r in mine]) if case.through_nginx else None,
                "total_cpu_us": spread([r.total_us(case) for r in mine]),
                "total_ratio_to_floor": ratio(floor) if case.through_nginx and case.name != "floor" else None,
                "total_ratio_to_floor_undisturbed": ratio(floor, clean=True)
                if case.through_nginx and case.name != "floor"
                else None,
                "total_ratio_to_floor_http": ratio(floor_http) if case.through_nginx else None,
                "upstream_cpu_us": spread([r.cpu_us["upstream"] for r in mine]),
                "redis_cpu_us": spread([r.cpu_us["redis"] for r in mine]),
                "tcp_opens_per_req": spread([r.tcp_opens_per_req for r in mine]),
                "p50_ms": spread([r.result["p50_us"] / 1000 for r in mine]),
                "p90_ms": spread([r.result["p90_us"] / 1000 for r in mine]),
                "p99_ms": spread([r.result["p99_us"] / 1000 for r in mine]),
                "p99_ms_undisturbed": spread([r.result["p99_us"] / 1000 for r in mine if r.round not in disturbed]),
                "max_ms": spread([r.result["max_us"] / 1000 for r in mine]),
                "flagged_runs": sum(1 for r in mine if r.flags),
            }
        )
    gw = per_round(runs, "gateway")
    key = {
        "gateway_over_static_verifier": spread([gw[k].cpu_us["gateway"] / floor_http[k].cpu_us["static"]
                                                for k in gw if k in floor_http and floor_http[k].cpu_us["static"]]),
        "front_nginx_gateway_over_floor": spread([gw[k].cpu_us["front"] / floor[k].cpu_us["front"]
                                                  for k in gw if k in floor and floor[k].cpu_us["front"]]),
        "paced_target_rps": rate,
    }  # fmt: skip
    return {"rows": rows, "key_figures": key}


def row_of(summary: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in summary["rows"] if r["scenario"] == name), None)


def table(summary: dict[str, Any], rate: int) -> str:
    """The results as a markdown table (and the same text for the terminal)."""
    lines = [
        "| scenario | req/s | verifier CPU µs/req | verifications per verifier CPU-s | front nginx µs/req "
        "| total µs/req | total × floor | total × floor over HTTP | p50 / p90 / p99 ms | new conns/req |",  # noqa: RUF001
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        title = row["title"] + (f" at {rate:,}/s" if row["scenario"] == "paced" else "")
        verifier = f"{row['verifier']}: {fmt_spread(row['verifier_cpu_us'], '.1f')}" if row["verifier"] else "-"
        lines.append(
            f"| {title}{' ⚑' if row['flagged_runs'] else ''} (c{row['conns']}) | {row['rps']['median']:,.0f} | "
            f"{verifier} | {fmt_spread(row['verifications_per_core_second'], ',.0f')} | "
            f"{fmt_spread(row['front_nginx_cpu_us'], '.1f')} | {fmt_spread(row['total_cpu_us'], '.1f')} | "
            f"{fmt_spread(row['total_ratio_to_floor'], '.2f', 'x')} | "
            f"{fmt_spread(row['total_ratio_to_floor_http'], '.2f', 'x')} | "
            f"{row['p50_ms']['median']:.2f} / {row['p90_ms']['median']:.2f} / {row['p99_ms']['median']:.2f} | "
            f"{row['tcp_opens_per_req']['median']:.2f} |"
        )
    return "\n".join(lines)


def headline(summary: dict[str, Any], rate: int, paced_conns: int) -> list[str]:
    out = []
    gw, direct, paced = row_of(summary, "gateway"), row_of(summary, "direct"), row_of(summary, "paced")
    refusal = row_of(summary, "refusal")
    labels = (("through nginx", gw), ("direct (no nginx)", direct), ("refusal 401, through nginx", refusal),
              ("refusal 401, direct", row_of(summary, "direct-refusal")))  # fmt: skip
    for label, row in labels:
        if row:
            out.append(
                f"gateway CPU per verification, {label}: {fmt_spread(row['verifier_cpu_us'], '.1f', ' us')} = "
                f"{fmt_spread(row['verifications_per_core_second'], ',.0f')} verifications per gateway CPU-second "
                f"(undisturbed rounds: {fmt_spread(row['verifier_cpu_us_undisturbed'], '.1f', ' us')})"
            )
    floor, floor_http = row_of(summary, "floor"), row_of(summary, "floor-http")
    if gw and floor and floor_http:
        out.append(
            f"front nginx CPU per request: floor {fmt_spread(floor['front_nginx_cpu_us'], '.1f', ' us')}, floor over "
            f"HTTP {fmt_spread(floor_http['front_nginx_cpu_us'], '.1f', ' us')}, gateway path "
            f"{fmt_spread(gw['front_nginx_cpu_us'], '.1f', ' us')}"
        )
        out.append(
            f"total CPU per request (front nginx + verifier), gateway path / floor: "
            f"{fmt_spread(gw['total_ratio_to_floor'], '.2f', 'x')} (undisturbed rounds: "
            f"{fmt_spread(gw['total_ratio_to_floor_undisturbed'], '.2f', 'x')}); / floor over HTTP: "
            f"{fmt_spread(gw['total_ratio_to_floor_http'], '.2f', 'x')}"
        )
        out.append(
            "gateway CPU per verification / static nginx verifier's: "
            f"{fmt_spread(summary['key_figures']['gateway_over_static_verifier'], '.2f', 'x')}"
        )
    if paced:
        out.append(
            f"at {rate:,} verifications/s offered through nginx (c{paced_conns}): achieved "
            f"{fmt_spread(paced['rps'], ',.0f', '/s')}, p50 {fmt_spread(paced['p50_ms'], '.2f')} ms, p90 "
            f"{fmt_spread(paced['p90_ms'], '.2f')} ms, p99 {fmt_spread(paced['p99_ms'], '.2f')} ms (undisturbed "
            f"rounds: {fmt_spread(paced['p99_ms_undisturbed'], '.2f')} ms); gateway "
            f"{fmt_spread(paced['verifier_cores'], '.2f')} cores busy, "
            f"{fmt_spread(paced['verifier_cpu_us'], '.1f', ' us')} per verification"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4, help="whole seconds of each measured wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="whole seconds of wrk before each measured run (0: none)")
    parser.add_argument("--quick", action="store_true", help="a smoke check: 1 round of 2 s runs, writes no file")
    parser.add_argument("--conns", type=int, default=16, help="wrk connections (default 16: the shipped keep-alive)")
    parser.add_argument("--rate", type=int, default=5000, help="the paced row's verifications/s (default 5000)")
    parser.add_argument("--paced-conns", type=int, default=16, help="wrk connections of the paced row (default 16)")
    parser.add_argument("--max-foreign", type=float, default=0.15, help="bench.py's: other load that disturbs a round")
    parser.add_argument(
        "--settle", type=float, default=3, help="seconds to wait at most before each round for the machine to be quiet"
    )
    parser.add_argument("--gateway-dir", type=Path, default=ROOT, help="the checkout whose gateway/ is measured")
    parser.add_argument("--json", type=Path, help=f"default {relative(RESULTS_JSON)} (none with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2
    elif args.json is None:
        args.json = RESULTS_JSON
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0 or args.conns < 1 or args.rate < 1:
        parser.error("--rounds, --duration, --conns and --rate must be at least 1, --warmup at least 0")
    bench.require_tools()
    started = time.monotonic()
    vb = VerifyBench(args)
    if not vb.pinned:
        print("verify: CPUs 0 and 1 are not both usable: running unpinned, numbers are not comparable", file=sys.stderr)
    print(
        f"verify: {args.rounds} round(s) of {len(CASES)} wrk runs of {args.duration} s (+{args.warmup} s warm-up "
        f"each), about {args.rounds * len(CASES) * (args.duration + args.warmup + 0.3) + args.rounds + 5:.0f} s",
        flush=True,
    )
    try:
        with bench.sigterm_as_interrupt():
            vb.start()
            info = bench.machine(args.gateway_dir, vb.loop)
            pinning = (
                f"gateway, static verifier on CPU {VERIFIER_CPU}; front nginx, upstream, redis, wrk on CPU {LOAD_CPU}"
                if vb.pinned
                else "unpinned"
            )
            print(
                f"verify: {info['cpu_model']}, {info['nproc']} CPUs, kernel {info['kernel']}; nginx {info['nginx']}, "
                f"{info['wrk']}, Python {info['python']}, {info['event_loop']}, gateway {info['gateway_commit']}; "
                f"{pinning}",
                flush=True,
            )
            print(f"verify: refusal through nginx = the gateway's ({vb.checks['refusal']['body_bytes']} B body)")
            for rnd in range(args.rounds):
                vb.vround(rnd)
    except KeyboardInterrupt:
        print("verify: interrupted", file=sys.stderr)
        sys.exit(130)
    except BenchError as exc:
        raise SystemExit(f"verify: {exc}") from None
    finally:
        vb.stop()

    disturbed = {r["round"] - 1 for r in vb.rounds if r["disturbed"]}
    summary = summarize(vb.vruns, disturbed, args.rate)
    wall = time.monotonic() - started
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": round(wall, 1),
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "duration_seconds": args.duration,
            "warmup_seconds": args.warmup,
            "conns": args.conns,
            "paced_conns": args.paced_conns,
            "paced_rate": args.rate,
            "pacing": f"wrk Lua delay(): one schedule per wrk thread (-t1), a slot every 1/rate s (CLOCK_MONOTONIC "
            f"via LuaJIT FFI), whole-ms timers; a request more than {PACE_SLACK_MS:g} ms behind its slot restarts the "
            "schedule from now; latency from write to response",
            "pinning": {"verifier_cpu": VERIFIER_CPU, "load_cpu": LOAD_CPU} if vb.pinned else None,
            "cpu": "utime+stime+cutime+cstime of a process's whole tree (/proc), per completed request",
            "total": "front nginx + the verifier (gateway or static nginx; none for the floor); "
            "upstream and Redis apart",
            "nginx_site": "tests/verify_proxies.py site_nginx (docs/verify-proxies.md); floors derived from it",
        },
        "disturbed": {
            "threshold_cores": args.max_foreign,
            "rounds": len(disturbed),
            "which": sorted(r + 1 for r in disturbed),
            "foreign_cores_max_per_round": [r["foreign_cores_max"] for r in vb.rounds],
        },
        "checks": vb.checks,
        "summary": summary,
        "rounds": vb.rounds,
        "runs": [
            {
                "round": r.round + 1,
                "scenario": r.case,
                "conns": r.conns,
                "rps": r.rps,
                "cpu_us_per_req": r.cpu_us,
                "cores": r.cores,
                "foreign_cores": r.foreign_cores,
                "foreign_cores_on_verifier_cpu": r.foreign_verifier_cpu_cores,
                "steal_cores": r.steal_cores,
                "tcp_opens_per_req": r.tcp_opens_per_req,
                "flags": r.flags,
                "wrk": r.result,
            }
            for r in vb.vruns
        ],
    }
    print()
    print(
        f"Measured {report['date']}, {info['cpu_model']}, {info['nproc']} CPUs; {info['nginx']}, {info['wrk']}, "
        f"Python {info['python']}, {info['event_loop']}; gateway `{info['gateway_commit']}`; {args.rounds} rounds of "
        f"{args.duration} s; median [min-max] over rounds; disturbed rounds {len(disturbed)} of {args.rounds}."
    )
    print()
    print(table(summary, args.rate))
    print()
    for line in headline(summary, args.rate, args.paced_conns):
        print(line)
    print(
        f"pacing: {report['settings']['pacing']}.\n"
        f"disturbed rounds: {len(disturbed)} of {args.rounds} (other processes above {args.max_foreign:g} cores in a "
        f"run; most per round: {', '.join(format(r['foreign_cores_max'], '.2f') for r in vb.rounds)}); python probe "
        f"per round: {', '.join(format(r['python_probe_ms'], '.1f') for r in vb.rounds)} ms"
    )
    flagged = [r for r in vb.vruns if r.flags]
    for r in flagged:
        print(f"flagged: round {r.round + 1} {r.case}: {'; '.join(r.flags)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {relative(args.json)}")
    print(f"wall time {wall:.0f} s")
    sys.exit(1 if flagged else 0)


if __name__ == "__main__":
    main()
