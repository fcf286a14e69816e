"""A hostile review of the production-Redis work (spec 8 and 13): what an attacker or a careless
operator does to `redis.sentinel`, `redis+sentinel://` URLs, the `*_FILE` secrets and
`redis.min_replicas_acked`, against real redis-server / redis-sentinel processes where a process
is what breaks (tests/sentinel_topology.py).

Each test here was written to fail first, against a defect, or pins a behaviour that was tried
and held, so that it stays held.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from gateway import config as config_mod
from tests.conftest import AdminTokens, RedisProcess, free_port
from tests.kernel_stamps import stamped_call
from tests.sentinel_topology import MASTER_NAME, SentinelProcess, Topology, topology
from tests.test_config import SECRET, only_problem, problems_of, valid_raw, write
from tests.test_lease import recording_upstream
from tests.test_replicas import (
    Node,
    base_env,
    gateway_config,
    request,
    start_gateway,
    stop_gateway,
    wait_ready,
    wait_until,
)

# secrets from files and URLs: never echoed, never a hang ------------------------------------


def test_an_admin_token_file_that_is_not_valid_yaml_is_a_problem_that_shows_none_of_its_text(tmp_path: Path) -> None:
    """The tokens file holds the argon2id hashes (secret in the schema); a careless edit that breaks
    its YAML must not print them, from the file or from GATEWAY_ADMIN_TOKENS itself."""
    hashes = '[{"name": ops, hash: "$argon2id$v=19$m=65536,t=3,p=4$' + SECRET + '"'
    tokens = tmp_path / "tokens"
    tokens.write_text(hashes + "\n")
    for environ in ({"GATEWAY_ADMIN_TOKENS_FILE": str(tokens)}, {"GATEWAY_ADMIN_TOKENS": hashes}):
        problems, text = problems_of(write(tmp_path, valid_raw()), environ)
        var = next(iter(environ))
        assert "not a valid value" in only_problem(problems, var).rule
        assert SECRET not in text, text


def test_a_secret_file_that_is_a_fifo_is_refused_at_once_instead_of_hanging_the_start(tmp_path: Path) -> None:
    """GATEWAY_X_FILE naming a FIFO (or a device) would block the open until a writer comes."""
    fifo = tmp_path / "password"
    os.mkfifo(fifo)
    problems, _ = problems_of(write(tmp_path, valid_raw()), {"GATEWAY_REDIS_PASSWORD_FILE": str(fifo)})
    assert "regular file" in only_problem(problems, "GATEWAY_REDIS_PASSWORD_FILE").rule


@pytest.mark.parametrize(
    ("what", "make", "rule"),
    [
        ("missing", lambda p: None, "cannot be read"),
        ("a directory", lambda p: p.mkdir(), "directory"),
        ("empty", lambda p: p.write_text(""), "must not be empty"),
        ("only a newline", lambda p: p.write_text("\n"), "must not be empty"),
    ],
)
def test_a_secret_file_that_is_missing_a_directory_or_empty_names_its_variable(
    tmp_path: Path, what: str, make: Callable[[Path], object], rule: str
) -> None:
    path = tmp_path / "password"
    make(path)
    raw = valid_raw()
    raw["redis"] = {"url": "redis://redis.internal:6379/0"}
    problems, _ = problems_of(write(tmp_path, raw), {"GATEWAY_REDIS_PASSWORD_FILE": str(path)})
    assert len(problems) == 1, problems
    assert "GATEWAY_REDIS_PASSWORD_FILE" in problems[0].path, (what, problems)
    assert rule in problems[0].rule, (what, problems)


def test_a_trailing_crlf_in_a_secret_file_is_dropped_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_bytes(b" " + SECRET.encode() + b" \r\n")
    raw = valid_raw()
    raw["redis"] = {"url": "redis://redis.internal:6379/0"}
    config = config_mod.load(write(tmp_path, raw), {"GATEWAY_REDIS_PASSWORD_FILE": str(path)})
    assert config.redis.password == f" {SECRET} "


@pytest.mark.parametrize("credentials", [f"alice:{SECRET}@", f"{SECRET}@"], ids=["user-and-password", "user-only"])
def test_a_sentinel_url_naming_a_user_is_refused_not_silently_stripped_of_it(tmp_path: Path, credentials: str) -> None:
    """The URL form takes `:password@` only (there is no redis.username). `alice:pw@` used to lose
    alice silently (AUTH as the default user), and `pw@` lost the whole credential: the gateway
    then connected without AUTH."""
    raw = valid_raw()
    raw["redis"] = {"url": f"redis+sentinel://{credentials}10.0.0.1:26379,10.0.0.2/gw-main"}
    problems, text = problems_of(write(tmp_path, raw))
    assert "user" in only_problem(problems, "redis.url").rule
    assert SECRET not in text


def test_a_sentinel_url_with_only_a_password_still_works(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["redis"] = {"url": f"redis+sentinel://:{SECRET}@10.0.0.1:26379/gw-main"}
    config = config_mod.load(write(tmp_path, raw), {})
    assert config.redis.password == SECRET
    assert config.redis.sentinel is not None and config.redis.sentinel.master_name == "gw-main"


@pytest.mark.parametrize(
    ("acked", "timeout"), [(1, 0), (1, -1), (-1, 0.5), (17, 0.5), (1, 2.0)], ids=["t0", "t-neg", "n-neg", "n17", "t2"]
)
def test_a_wait_timeout_of_zero_or_below_or_past_the_command_timeout_is_refused(
    tmp_path: Path, acked: int, timeout: float
) -> None:
    """WAIT 0 blocks forever in Redis; a timeout past the command timeout makes WAIT a connection error."""
    raw = valid_raw()
    raw["redis"] = {"url": "redis://redis.internal:6379/0", "min_replicas_acked": acked,
                    "min_replicas_timeout_seconds": timeout}  # fmt: skip
    problems, _ = problems_of(write(tmp_path, raw))
    assert [p.path for p in problems] in (["redis.min_replicas_acked"], ["redis.min_replicas_timeout_seconds"])


def test_a_plaintext_admin_token_put_where_the_hashes_go_is_not_echoed(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"gwadm_ops1_{SECRET}\n")
    problems, text = problems_of(write(tmp_path, valid_raw()), {"GATEWAY_ADMIN_TOKENS_FILE": str(tokens)})
    assert problems
    assert SECRET not in text


# real processes: sentinels that do not answer, or answer wrong ---------------------------------

STARTED_WITHIN = 10.0  # seconds from `gateway serve` to listening, whatever the sentinels do
ANSWERED_WITHIN = 3.0  # seconds a probe, a request or an admin call waits for its 503


def sentinel_node(
    workdir: Path,
    name: str,
    upstream_url: str,
    tokens: AdminTokens,
    master_name: str,
    addresses: list[str],
    **redis: Any,
) -> Node:
    raw = gateway_config(upstream_url, tokens, "redis://unused", f"{name}:", health_check_seconds=0.5)
    section = raw["redis"]
    del section["url"]
    section.update(lease_seconds=0.5, sentinel={"master_name": master_name, "sentinels": addresses}, **redis)
    return start_gateway(workdir, name, raw, tokens)


def wait_listening(node: Node, seconds: float) -> float:
    """Seconds until the admin listener answers /readyz (any status)."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(OSError):
            node.readyz()
            return time.monotonic() - started
        assert node.proc.poll() is None, f"{node.name} exited:\n{node.output()}"
        assert time.monotonic() - started < seconds, f"{node.name} not listening after {seconds} s:\n{node.output()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    with topology(tmp_path_factory.mktemp("hostile-redis")) as started:
        yield started


@pytest.mark.slow
@pytest.mark.parametrize(
    "where", ["wrong-master-name", "no-sentinel-answers", "every-sentinel-hangs", "master-refuses"]
)
def test_no_master_to_be_found_fails_closed_in_bounded_time_and_the_log_says_why(
    tmp_path: Path, admin_tokens: AdminTokens, topo: Topology, where: str
) -> None:
    """A typo in the master name, or sentinels that are all down: the gateway must listen soon
    (a probe can see it), answer 503 (readiness and every key) without forwarding anything, and
    say in its log what is wrong, without the Redis password."""
    if where == "wrong-master-name":
        master, addresses = "gwmastr", topo.addresses
    elif where == "no-sentinel-answers":
        master, addresses = MASTER_NAME, [f"127.0.0.1:{free_port()}" for _ in range(3)]
    elif where == "every-sentinel-hangs":
        master, addresses = MASTER_NAME, topo.addresses
    else:  # a sentinel that names a master at an address where nothing listens
        lone = SentinelProcess(free_port(), tmp_path / "sentinel", free_port())
        lone.start()
        wait_until(lambda: answers(lone), 10, "the sentinel did not start")
        master, addresses = MASTER_NAME, [f"127.0.0.1:{lone.port}"]
    with contextlib.ExitStack() as stack:
        if where == "master-refuses":
            stack.callback(lone.kill)
        if where == "every-sentinel-hangs":
            stack.enter_context(frozen(sentinel_procs(topo)))
        upstream_url, arrivals = stack.enter_context(recording_upstream())
        node = sentinel_node(tmp_path, "gw", upstream_url, admin_tokens, master, addresses, password=SECRET)
        try:
            took = wait_listening(node, STARTED_WITHIN)
            for answer in (
                lambda: node.readyz() == 503,
                lambda: node.proxy("gw_" + "a" * 40) == (503, "auth_unavailable"),
                lambda: node.admin("POST", "/v1/keys", {"name": "x", "owner": "hostile"})[0] == 503,
            ):
                asked = time.monotonic()
                assert answer()
                assert time.monotonic() - asked < ANSWERED_WITHIN, time.monotonic() - asked
            assert arrivals.by_key == {}, arrivals.by_key
            log = node.log.read_text()
            assert SECRET not in log
            problems = [line for line in log.splitlines() if '"level":"error"' in line or '"level":"warning"' in line]
            assert any(master in line and "redis.sentinel" in line for line in problems), (took, log)
            assert "writes no AOF" not in log, log  # it could not be checked: no claim either way
        finally:
            stop_gateway(node)


@contextlib.contextmanager
def frozen(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """SIGSTOP these processes (hung, not dead: their sockets accept and never answer); SIGCONT after."""
    for proc in procs:
        proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)


def answers(sentinel: SentinelProcess) -> bool:
    with contextlib.suppress(redis.RedisError, OSError), sentinel.client() as client:
        return bool(client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME))
    return False


def sentinel_procs(topo: Topology) -> list[subprocess.Popen[bytes]]:
    procs = [s.proc for s in topo.sentinels]
    assert all(p is not None for p in procs)
    return [p for p in procs if p is not None]


@pytest.mark.slow
def test_hung_sentinels_at_startup_and_at_runtime_never_let_a_disabled_key_through(
    tmp_path: Path, admin_tokens: AdminTokens, topo: Topology
) -> None:
    """The first sentinel listed hangs from the start: the gateway asks the next and becomes ready.
    Then every sentinel hangs and the subscription breaks (CLIENT KILL on the master): the gateway
    cannot ask where the master is, so it must not trust its cache; a disable made meanwhile is in
    force at once, and nothing with that key reaches the upstream after the answer. Once the
    sentinels answer again the gateway is ready again, without a restart."""
    hung_first = sentinel_procs(topo)[:1]
    with recording_upstream() as (upstream_url, arrivals), frozen(hung_first):
        node = sentinel_node(tmp_path, "hung", upstream_url, admin_tokens, MASTER_NAME, topo.addresses)
        try:
            wait_ready(node, 15)
            status, key = node.admin("POST", "/v1/keys", {"name": "hung", "owner": "hostile"})
            assert status == 201, key
            assert node.proxy(key["key"]) == (200, None)
            with frozen(sentinel_procs(topo)[1:]):
                assert node.proxy(key["key"]) == (200, None)  # a healthy master needs no sentinel
                with redis.Redis(port=topo.master.port, socket_timeout=2) as master:
                    assert int(master.client_kill_filter(_type="pubsub")) >= 1
                wait_until(lambda: node.readyz() == 503, 5, "readiness never went 503 without a subscription")
                answer = stamped_call(
                    "POST",
                    f"{node.admin_url}/v1/keys/{key['id']}/disable",
                    {"Authorization": f"Bearer {admin_tokens.developer}", "Content-Type": "application/json"},
                    json.dumps({"reason": "hostile"}).encode(),
                )
                status = answer.status
                assert status in (200, 503), answer
                if status == 200:  # written: in force at once, though no sentinel answers
                    for _ in range(20):
                        assert node.proxy(key["key"])[0] in (403, 503), answer
                # A 503 (no sentinel said where the master is for a new connection) wrote nothing:
                # the key is still enabled, and a lookup that reaches Redis may rightly serve it.
            wait_ready(node, 15)
            if status != 200:
                assert node.admin("GET", f"/v1/keys/{key['id']}")[1]["enabled"] is True  # nothing written
                answer = stamped_call(
                    "POST",
                    f"{node.admin_url}/v1/keys/{key['id']}/disable",
                    {"Authorization": f"Bearer {admin_tokens.developer}", "Content-Type": "application/json"},
                    json.dumps({"reason": "hostile"}).encode(),
                )
                assert answer.status == 200, answer
            assert node.proxy(key["key"]) == (403, "key_disabled")
            # Both moments stamped by the kernel as the bytes arrived (tests/kernel_stamps.py).
            assert [at for at in arrivals.of(key["id"]) if at > answer.stamp] == []
        finally:
            stop_gateway(node)


# secrets in what the gateway shows ------------------------------------------------------------


def shown_everywhere(node: Node) -> str:
    """Everything an operator or a scraper can read from a running gateway, and its log."""
    texts = [node.log.read_text()]
    for path in ("/readyz", "/healthz", "/metrics"):
        with contextlib.suppress(OSError):
            texts.append(request("GET", node.admin_url + path)[1].decode())
    with contextlib.suppress(OSError, ValueError):
        texts.append(json.dumps(node.admin("GET", "/v1/status", role="viewer")[1]))
    return "\n".join(texts)


@pytest.mark.slow
def test_the_redis_password_is_never_shown_right_or_wrong(tmp_path: Path, admin_tokens: AdminTokens) -> None:
    """A password-protected Redis: the right password in the URL, from a *_FILE; then a wrong one,
    and a Sentinel topology that wants none. No log line, page, metric or status shows either; the
    wrong one is a clear 503 and a log line saying authentication failed."""
    right, wrong = "Right" + SECRET, "Wrong" + SECRET
    server = RedisProcess(free_port(), tmp_path / "redis")
    server.start()
    try:
        with redis.Redis(port=server.port, socket_timeout=2) as client:
            client.config_set("requirepass", right)
        with recording_upstream() as (upstream_url, _):
            password_file = tmp_path / "password"
            for name, password in (("right", right), ("wrong", wrong)):
                password_file.write_text(password + "\n")
                raw = gateway_config(upstream_url, admin_tokens, server.url, f"{name}:", health_check_seconds=0.5)
                node = start_gateway(tmp_path, name, raw, admin_tokens,
                                     env={"GATEWAY_REDIS_PASSWORD_FILE": str(password_file)})  # fmt: skip
                try:
                    if password == right:
                        wait_ready(node, 15)
                        status, key = node.admin("POST", "/v1/keys", {"name": "pw", "owner": "hostile"})
                        assert status == 201, key
                        assert node.proxy(key["key"]) == (200, None)
                    else:
                        wait_listening(node, STARTED_WITHIN)
                        assert node.readyz() == 503
                        assert node.proxy("gw_" + "b" * 40) == (503, "auth_unavailable")
                        assert "AuthenticationError" in node.log.read_text(), node.output()
                    seen = shown_everywhere(node)
                    assert right not in seen and wrong not in seen
                finally:
                    stop_gateway(node)
            # The URL form, with the password in it, through check-config with another problem.
            raw = gateway_config(upstream_url, admin_tokens, f"redis://:{right}@127.0.0.1:{server.port}/0", "x:")
            raw["redis"]["health_check_seconds"] = 0
            config = tmp_path / "bad.yaml"
            config.write_text(yaml.safe_dump(raw))
            checked = subprocess.run(
                [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
                capture_output=True, text=True, env=base_env(), timeout=30,
            )  # fmt: skip
            assert checked.returncode == 2, checked
            assert "health_check_seconds" in checked.stderr
            assert right not in checked.stdout + checked.stderr
    finally:
        server.kill()


@pytest.mark.slow
def test_a_password_the_sentinels_servers_do_not_want_is_harmless_and_never_shown(
    tmp_path: Path, admin_tokens: AdminTokens, topo: Topology
) -> None:
    """Redis answers AUTH that no password is configured. redis-py 8 goes on (the gateway works);
    redis-py 5 (constraints/lowest.txt) raises AuthenticationError: then the gateway must fail
    closed and say so. Either way the password is in nothing it shows."""
    with recording_upstream() as (upstream_url, arrivals):
        node = sentinel_node(tmp_path, "nopw", upstream_url, admin_tokens, MASTER_NAME, topo.addresses,
                             password=SECRET)  # fmt: skip
        try:
            refused = "redis does not answer at startup (AuthenticationError)"
            wait_listening(node, STARTED_WITHIN)
            wait_until(lambda: node.ready() or refused in node.log.read_text(), 15, "neither ready nor refused")
            if node.ready():
                status, key = node.admin("POST", "/v1/keys", {"name": "nopw", "owner": "hostile"})
                assert status == 201, key
                assert node.proxy(key["key"]) == (200, None)
            else:
                assert node.proxy("gw_" + "c" * 40) == (503, "auth_unavailable")
                assert arrivals.by_key == {}
            assert SECRET not in shown_everywhere(node)
        finally:
            stop_gateway(node)


# min_replicas_acked against the replicas there are ---------------------------------------------


@pytest.mark.slow
def test_more_replicas_wanted_than_exist_is_warned_and_every_change_is_a_bounded_503(
    tmp_path: Path, admin_tokens: AdminTokens, topo: Topology
) -> None:
    with recording_upstream() as (upstream_url, _):
        node = sentinel_node(tmp_path, "more", upstream_url, admin_tokens, MASTER_NAME, topo.addresses,
                             min_replicas_acked=3, min_replicas_timeout_seconds=0.3)  # fmt: skip
        try:
            wait_ready(node, 15)
            ready = json.loads(request("GET", node.admin_url + "/readyz")[1])
            assert ready["topology"]["replicas"] == 2
            assert "fewer than redis.min_replicas_acked (3)" in ready["warning"], ready
            asked = time.monotonic()
            answer = stamped_call(
                "POST", f"{node.admin_url}/v1/keys",
                {"Authorization": f"Bearer {admin_tokens.developer}", "Content-Type": "application/json"},
                json.dumps({"name": "more", "owner": "hostile"}).encode(),
            )  # fmt: skip
            assert time.monotonic() - asked < 2.0
            assert answer.status == 503, answer
            assert json.loads(answer.body)["error"]["code"] == "store_unavailable"
            assert answer.headers.get("Retry-After") == "1"
        finally:
            stop_gateway(node)


@pytest.mark.slow
def test_the_reported_topology_follows_a_lost_replica_instead_of_the_one_seen_at_startup(
    tmp_path: Path, admin_tokens: AdminTokens
) -> None:
    """min_replicas_acked: 2 with two replicas: fine at startup. One replica dies: every change now
    answers 503, and /v1/status and /readyz must say so (replicas 1, and the warning), not keep
    reporting the two replicas seen at startup."""
    with recording_upstream() as (upstream_url, _), topology(tmp_path / "redis") as own:
        node = sentinel_node(tmp_path, "lost", upstream_url, admin_tokens, MASTER_NAME, own.addresses,
                             min_replicas_acked=2)  # fmt: skip
        try:
            wait_ready(node, 15)
            status, report = node.admin("GET", "/v1/status", role="viewer")
            assert status == 200 and report["redis"]["replicas"] == 2 and "warning" not in report, report
            own.replicas[0].kill()
            with redis.Redis(port=own.master.port, socket_timeout=2) as master:
                wait_until(lambda: master.info("replication")["connected_slaves"] == 1, 10, "replica still connected")

            def reported() -> bool:
                report = node.admin("GET", "/v1/status", role="viewer")[1]
                ready = json.loads(request("GET", node.admin_url + "/readyz")[1])
                return (
                    report["redis"]["replicas"] == 1
                    and "fewer than redis.min_replicas_acked (2)" in report.get("warning", "")
                    and ready["topology"]["replicas"] == 1
                    and "fewer than redis.min_replicas_acked (2)" in ready.get("warning", "")
                )

            wait_until(reported, 15, "the status still reports the topology seen at startup")
        finally:
            stop_gateway(node)


# a hung master that comes back after the failover ------------------------------------------------


@pytest.mark.slow
def test_a_hung_master_that_resumes_after_the_failover_serves_no_stale_key_table(
    tmp_path: Path, admin_tokens: AdminTokens
) -> None:
    """The master hangs (SIGSTOP) while the gateway is idle; the sentinels promote a replica; the
    gateway resubscribes to the new master and a key is disabled there (acknowledged, WAIT 1). Then
    the old master wakes up (a VM stall or a long fork ends): until the sentinels demote it, it
    still holds the old table, with the key enabled. No lookup may read it there: the key must
    never be forwarded after the disable's answer."""
    with recording_upstream() as (upstream_url, arrivals), topology(tmp_path / "redis") as own:
        node = sentinel_node(tmp_path, "resume", upstream_url, admin_tokens, MASTER_NAME, own.addresses,
                             min_replicas_acked=1)  # fmt: skip
        try:
            wait_ready(node, 15)
            status, key = node.admin("POST", "/v1/keys", {"name": "resume", "owner": "hostile"})
            assert status == 201, key
            for _ in range(5):  # connections to the master in the command client's pool, then idle
                assert node.proxy(key["key"]) == (200, None)
            old = own.master.port
            own.freeze_master()
            wait_until(lambda: own.master_port() not in (None, old), 20, "no failover")
            wait_until(node.ready, 20, "the gateway did not resubscribe to the new master")
            answer = stamped_call(
                "POST", f"{node.admin_url}/v1/keys/{key['id']}/disable",
                {"Authorization": f"Bearer {admin_tokens.developer}", "Content-Type": "application/json"},
                json.dumps({"reason": "hostile"}).encode(), timeout=10,
            )  # fmt: skip
            for _ in range(20):
                if answer.status == 200:
                    break
                time.sleep(0.2)
                answer = stamped_call(
                    "POST", f"{node.admin_url}/v1/keys/{key['id']}/disable",
                    {"Authorization": f"Bearer {admin_tokens.developer}", "Content-Type": "application/json"},
                    json.dumps({"reason": "hostile"}).encode(), timeout=10,
                )  # fmt: skip
            assert answer.status == 200, answer
            own.thaw()  # the old master is back, still a master with the old table until demoted
            seen = [node.proxy(key["key"]) for _ in range(150)]
            assert (200, None) not in seen, seen
            assert [at for at in arrivals.of(key["id"]) if at > answer.stamp] == []
        finally:
            own.thaw()
            stop_gateway(node)


def test_a_sentinel_section_made_only_by_the_environment_names_the_variable_in_its_problems(tmp_path: Path) -> None:
    """GATEWAY_REDIS_SENTINEL_PASSWORD alone (a leftover in a Deployment) makes a redis.sentinel
    section the file never had: its problems must say which variable made it, and a problem of
    another variable's value must still name that variable."""
    problems, text = problems_of(write(tmp_path, valid_raw()), {"GATEWAY_REDIS_SENTINEL_PASSWORD": SECRET})
    assert {p.path for p in problems} == {
        "redis.sentinel.master_name (from GATEWAY_REDIS_SENTINEL_PASSWORD)",
        "redis.sentinel.sentinels (from GATEWAY_REDIS_SENTINEL_PASSWORD)",
    }, problems
    assert SECRET not in text
    problems, _ = problems_of(
        write(tmp_path, valid_raw()),
        {"GATEWAY_REDIS_SENTINEL_MASTER_NAME": "gw", "GATEWAY_REDIS_SENTINEL_SENTINELS": "a:1,,b"},
    )
    assert [p.path for p in problems] == ["redis.sentinel.sentinels (from GATEWAY_REDIS_SENTINEL_SENTINELS)"]


@pytest.mark.slow
def test_sentinel_without_min_replicas_acked_is_warned_about_even_with_aof(
    tmp_path: Path, admin_tokens: AdminTokens, topo: Topology
) -> None:
    """Every server of the topology writes an AOF, but AOF does not survive a failover: the
    promoted replica never had what the master did not pass on. A Sentinel setup that forgot
    redis.min_replicas_acked must be warned about, at startup and in /readyz."""
    with recording_upstream() as (upstream_url, _):
        node = sentinel_node(tmp_path, "noack", upstream_url, admin_tokens, MASTER_NAME, topo.addresses)
        try:
            wait_ready(node, 15)
            ready = json.loads(request("GET", node.admin_url + "/readyz")[1])
            assert ready["persistence"] == "aof", ready
            assert "min_replicas_acked" in ready.get("warning", ""), ready
            assert "failover" in ready["warning"]
            assert "min_replicas_acked" in node.log.read_text()
        finally:
            stop_gateway(node)
