"""A hostile review of the production-Redis work (spec 8 and 13): what an attacker or a careless
operator does to `redis.sentinel`, `redis+sentinel://` URLs, the `*_FILE` secrets and
`redis.min_replicas_acked`, against real redis-server / redis-sentinel processes where a process
is what breaks (tests/sentinel_topology.py).

Each test here was written to fail first, against a defect, or pins a behaviour that was tried
and held, so that it stays held.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_mod
from tests.conftest import AdminTokens, free_port
from tests.sentinel_topology import MASTER_NAME, Topology, topology
from tests.test_config import SECRET, only_problem, problems_of, valid_raw, write
from tests.test_lease import recording_upstream
from tests.test_replicas import Node, gateway_config, start_gateway, stop_gateway

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
@pytest.mark.parametrize("where", ["wrong-master-name", "no-sentinel-answers"])
def test_no_master_to_be_found_fails_closed_in_bounded_time_and_the_log_says_why(
    tmp_path: Path, admin_tokens: AdminTokens, topo: Topology, where: str
) -> None:
    """A typo in the master name, or sentinels that are all down: the gateway must listen soon
    (a probe can see it), answer 503 (readiness and every key) without forwarding anything, and
    say in its log what is wrong, without the Redis password."""
    if where == "wrong-master-name":
        master, addresses = "gwmastr", topo.addresses
    else:
        master, addresses = MASTER_NAME, [f"127.0.0.1:{free_port()}" for _ in range(3)]
    with recording_upstream() as (upstream_url, arrivals):
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
