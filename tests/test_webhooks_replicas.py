"""Webhooks across gateway processes (spec 10): a restart, a kill, and two replicas sharing the work.

Every gateway is a real `python -m gateway serve` process on a real redis-server; the receiver is a
real HTTP server (tests/webhook_receiver.py) counting what arrives by webhook-id and attempt, and the
reference library (`standardwebhooks`) verifies every signature.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AdminTokens, RedisProcess
from tests.test_replicas import Node, gateway_config, metric, start_gateway, stop_gateway, wait_ready
from tests.webhook_receiver import HANG, Receiver

pytestmark = pytest.mark.slow


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def echo() -> Iterator[str]:
    from tests.test_replicas import EchoHandler, serving

    with serving(EchoHandler) as url:
        yield url


def webhook_config(
    echo: str, tokens: AdminTokens, redis_url: str, prefix: str, secret_file: Path, url: str, **section: Any
) -> dict[str, Any]:
    raw = gateway_config(echo, tokens, redis_url, prefix)
    raw["logging"] = {"level": "debug"}  # every line the webhooks code can write
    raw["lifecycle"] = {"drain_seconds": 1}
    raw["webhooks"] = {"endpoints": [{"name": "sink", "url": url, "secret_file": str(secret_file)}], **section}
    return raw


@contextlib.contextmanager
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        yield started
    finally:
        for node in started:
            stop_gateway(node)


def terminate(node: Node) -> None:
    """SIGTERM, as an orchestrator stops a pod, and wait for the process to end."""
    node.proc.send_signal(signal.SIGTERM)
    node.proc.wait(timeout=30)


def setup(tmp_path: Path) -> tuple[str, Path, str]:
    secret = new_secret()
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(secret + "\n")  # as a Kubernetes Secret is mounted
    return secret, secret_file, f"wh{secrets.token_hex(4)}:"


def arrivals(rx: Receiver) -> collections.Counter[tuple[str, int]]:
    """How many requests arrived for each (webhook-id, attempt)."""
    return collections.Counter((g.msg_id, g.attempt) for g in rx.snapshot())


def test_a_gateway_restarted_between_attempts_still_delivers(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, echo: str
) -> None:
    secret, secret_file, prefix = setup(tmp_path)
    with Receiver(lambda got: 500 if got.attempt == 1 else 200).serving() as rx, nodes() as started:
        raw = webhook_config(echo, admin_tokens, redis_server.url, prefix, secret_file, rx.url,
                             retry_initial_seconds=8)  # fmt: skip  # the retry is due 4-8 s after attempt 1
        first = start_gateway(tmp_path, "first", raw, admin_tokens)
        started.append(first)
        wait_ready(first)
        status, key = first.admin("POST", "/v1/keys", {"name": "restart", "owner": "acme"})
        assert status == 201
        rx.wait(lambda: len(rx.snapshot()) == 1, 15, "attempt 1")
        terminate(first)
        stopped = time.time()
        assert first.proc.returncode == 0, first.output()
        second = start_gateway(tmp_path, "second", raw, admin_tokens)  # a new process, the same Redis
        started.append(second)
        rx.wait(lambda: len(rx.delivered()) == 1, 30, "attempt 2, from the restarted gateway")
        got = rx.snapshot()
        assert [g.attempt for g in got] == [1, 2] and got[0].msg_id == got[1].msg_id
        assert got[1].at > stopped  # sent by the new process
        assert got[1].verified(secret)["data"]["key"]["id"] == key["id"]
        assert metric(second.metrics(), 'gateway_webhooks_delivered_total{endpoint="sink"}') == 1


def test_an_attempt_in_flight_on_a_killed_gateway_is_taken_over_after_the_visibility_timeout(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, echo: str
) -> None:
    """SIGKILL while an attempt hangs at the receiver: the claim lapses after timeout_seconds + 5 s
    and another gateway makes attempt 2; never earlier, and nothing is lost."""
    secret, secret_file, prefix = setup(tmp_path)
    with Receiver(lambda got: HANG if got.attempt == 1 else 200).serving() as rx, nodes() as started:
        raw = webhook_config(echo, admin_tokens, redis_server.url, prefix, secret_file, rx.url, timeout_seconds=1)
        doomed = start_gateway(tmp_path, "doomed", raw, admin_tokens)
        started.append(doomed)
        wait_ready(doomed)
        status, key = doomed.admin("POST", "/v1/keys", {"name": "kill"})
        assert status == 201
        rx.wait(lambda: len(rx.snapshot()) == 1, 15, "attempt 1 (held by the receiver)")
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        doomed.proc.wait(timeout=10)
        survivor = start_gateway(tmp_path, "survivor", raw, admin_tokens)  # the ports the killed one freed
        started.append(survivor)
        rx.wait(lambda: len(rx.delivered()) == 1, 30, "attempt 2, by the survivor")
        got = rx.snapshot()
        assert [g.attempt for g in got] == [1, 2] and got[0].msg_id == got[1].msg_id
        assert got[1].at - got[0].at >= 5.5  # not before the claim's visibility timeout (1 s + 5 s) lapsed
        assert got[1].verified(secret)["data"]["key"]["id"] == key["id"]


def test_two_replicas_deliver_each_attempt_once_and_log_no_secret(
    tmp_path: Path, redis_server: RedisProcess, admin_tokens: AdminTokens, echo: str
) -> None:
    """Two gateways on one Redis, every event failing its first attempt: each (webhook-id, attempt)
    arrives exactly once, every event is delivered, and neither log holds the secret or the URL's
    password (the receiver sees it as basic auth, so it was used)."""
    secret, secret_file, prefix = setup(tmp_path)
    password = "hook-pass-" + secrets.token_hex(8)
    with Receiver(lambda got: 500 if got.attempt == 1 else 200).serving(userinfo=f"hookuser:{password}") as rx, \
            nodes() as started:  # fmt: skip
        for name in ("a", "b"):
            own = webhook_config(echo, admin_tokens, redis_server.url, prefix, secret_file, rx.url,
                                 retry_initial_seconds=0.2, concurrency=2)  # fmt: skip
            started.append(start_gateway(tmp_path, name, own, admin_tokens))
        for node in started:
            wait_ready(node)
        count = 20
        for i in range(count):
            status, key = started[i % 2].admin("POST", "/v1/keys", {"name": f"k{i}", "owner": "acme"})
            assert status == 201, key
            status, _ = started[(i + 1) % 2].admin("POST", f"/v1/keys/{key['id']}/disable", {"reason": "test"})
            assert status == 200
        events = 2 * count
        rx.wait(lambda: len({g.msg_id for g in rx.delivered()}) == events, 60, "every event delivered")
        counted = arrivals(rx)
        assert set(counted.values()) == {1}, [k for k, n in counted.items() if n > 1]  # each attempt once
        by_msg: dict[str, list[int]] = collections.defaultdict(list)
        for got in rx.snapshot():
            by_msg[got.msg_id].append(got.attempt)
            got.verified(secret)
            assert got.headers["authorization"] == "Basic " + base64.b64encode(f"hookuser:{password}".encode()).decode()
        assert len(by_msg) == events and all(sorted(a) == [1, 2] for a in by_msg.values())
        texts = [node.metrics() for node in started]
        delivered = [metric(t, 'gateway_webhooks_delivered_total{endpoint="sink"}') for t in texts]
        retried = [metric(t, 'gateway_webhooks_retried_total{endpoint="sink"}') for t in texts]
        assert sum(delivered) == events and sum(retried) == events, (delivered, retried)
        for t in texts:
            assert password not in t and "hookuser" not in t and secret not in t
        for node in started:
            terminate(node)
        logs = "\n".join(node.log.read_text(errors="replace") for node in started)
        assert "webhook delivered" in logs  # the debug-level log did record the deliveries
        for leaked in (password, "hookuser", secret, secret[len("whsec_") :]):
            assert leaked not in logs
