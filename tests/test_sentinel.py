"""Production Redis (spec 13): three gateways follow a Sentinel failover without losing an
acknowledged disable.

Real processes throughout: one Redis master with two replicas and three sentinels (Debian's
redis-server and redis-sentinel), three `gateway serve` processes with `redis.min_replicas_acked:
1` (one by the `redis.sentinel` section, one by a `redis+sentinel://` URL, one by environment
variables), a recording upstream, clients sending a valid key and every key about to be disabled
to every gateway, and a stream of disables. Mid-stream the master dies (`kill -9`) or hangs
(`SIGSTOP`). What must hold:
- every disable the admin API acknowledged (200) is in force everywhere afterwards: no request with
  that key reached the upstream after the answer (both moments stamped by the kernel as the bytes
  arrived: tests/kernel_stamps.py), and every gateway refuses it at the end;
- disables during the failover got 503 store_unavailable with Retry-After, and succeeded retried;
- the valid key works again, on every gateway and without a restart, within the sentinels'
  down-after time plus 5 s; readiness went 503 during the gap and 200 after.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import AdminTokens
from tests.kernel_stamps import Stamped, stamped_call
from tests.sentinel_topology import DOWN_AFTER_MS, MASTER_NAME, Topology, topology
from tests.test_lease import Arrivals, recording_upstream
from tests.test_replicas import (
    HTTP_TIMEOUT,
    Node,
    error_code,
    gateway_config,
    request,
    start_gateway,
    stop_gateway,
    wait_ready,
)

pytestmark = pytest.mark.slow

LEASE = 0.5  # redis.lease_seconds: a gateway cut off from the master stops trusting its cache this fast
HEALTH = 0.5
DISABLES = 14
BEFORE_FAULT = 4  # disables acknowledged before the master goes
RECOVERY_LIMIT = DOWN_AFTER_MS / 1000 + 5  # the bound for valid-key traffic to recover


# traffic ------------------------------------------------------------------------------------


@dataclass
class Answer:
    at: float  # time.monotonic() when the request was sent
    key: int  # index into the keys the client cycles through
    status: int
    code: str | None


@dataclass
class Cycler:
    """One thread, one keep-alive connection to one gateway, every key in turn."""

    node: Node
    keys: list[str]
    stop: threading.Event
    answers: list[Answer] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"cycler-{self.node.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        parts = urlsplit(self.node.proxy_url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=HTTP_TIMEOUT)
        index = 0
        while not self.stop.is_set():
            index = (index + 1) % len(self.keys)
            at = time.monotonic()
            try:
                conn.request("GET", "/api/failover", headers={"Authorization": f"Bearer {self.keys[index]}"})
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self.answers.append(Answer(at, index, 0, "connection"))
                self.stop.wait(0.02)
                continue
            self.answers.append(Answer(at, index, response.status, error_code(raw)))
            self.stop.wait(0.002)
        conn.close()


@dataclass
class Readiness:
    """Each gateway's /readyz, polled."""

    nodes: list[Node]
    stop: threading.Event
    seen: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="readiness", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for node in self.nodes:
                at = time.monotonic()
                try:
                    status = node.readyz()
                except OSError:
                    status = 0
                self.seen.setdefault(node.name, []).append((at, status))
            self.stop.wait(0.05)


@contextlib.contextmanager
def traffic(nodes: list[Node], keys: list[str]) -> Iterator[tuple[list[Cycler], Readiness]]:
    stop = threading.Event()
    cyclers = [Cycler(node, keys, stop) for node in nodes for _ in range(2)]
    readiness = Readiness(nodes, stop)
    for worker in [*cyclers, readiness]:
        worker.start()
    try:
        yield cyclers, readiness
    finally:
        stop.set()
        for worker in [*cyclers, readiness]:
            assert worker.thread is not None
            worker.thread.join(timeout=HTTP_TIMEOUT * 2)
            assert not worker.thread.is_alive(), "a traffic thread did not stop"


# disables -----------------------------------------------------------------------------------


@dataclass
class Disable:
    key_id: str
    attempts: list[Stamped | str] = field(default_factory=list)  # answers, or the connection error

    @property
    def acknowledged(self) -> Stamped | None:
        return next((a for a in self.attempts if isinstance(a, Stamped) and a.status == 200), None)


def disable_until_acknowledged(nodes: list[Node], key_id: str, via: int, seconds: float = 30.0) -> Disable:
    """POST disable through the gateways in turn, from `via`, until one answers 200."""
    record = Disable(key_id)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        node = nodes[via % len(nodes)]
        via += 1
        try:
            answer = stamped_call(
                "POST",
                f"{node.admin_url}/v1/keys/{key_id}/disable",
                {"Authorization": f"Bearer {node.tokens.developer}", "Content-Type": "application/json"},
                json.dumps({"reason": "failover test"}).encode(),
                timeout=10,
            )
        except (OSError, http.client.HTTPException) as exc:
            record.attempts.append(repr(exc))
            time.sleep(0.1)
            continue
        record.attempts.append(answer)
        if answer.status == 200:
            return record
        time.sleep(0.2)
    raise AssertionError(f"{key_id} was never disabled: {record.attempts}")


# the cluster --------------------------------------------------------------------------------


def sentinel_gateway(
    workdir: Path, name: str, upstream_url: str, tokens: AdminTokens, topo: Topology, prefix: str, form: str
) -> Node:
    raw = gateway_config(upstream_url, tokens, "redis://unused", prefix, health_check_seconds=HEALTH)
    section = raw["redis"]
    del section["url"]
    section.update(lease_seconds=LEASE, min_replicas_acked=1, min_replicas_timeout_seconds=0.5)
    env: dict[str, str] = {}
    if form == "section":
        section["sentinel"] = {"master_name": MASTER_NAME, "sentinels": topo.addresses}
    elif form == "url":
        section["url"] = f"redis+sentinel://{','.join(topo.addresses)}/{MASTER_NAME}"
    else:  # the environment, as a Kubernetes Deployment would set it
        env = {
            "GATEWAY_REDIS_SENTINEL_MASTER_NAME": MASTER_NAME,
            "GATEWAY_REDIS_SENTINEL_SENTINELS": ",".join(topo.addresses),
        }
    return start_gateway(workdir, name, raw, tokens, env=env)


def admin(node: Node, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return node.admin(method, path, body)


@contextlib.contextmanager
def failover_cluster(workdir: Path, tokens: AdminTokens) -> Iterator[tuple[Topology, list[Node], Arrivals]]:
    with recording_upstream() as (upstream_url, arrivals), topology(workdir / "redis") as topo:
        prefix = f"failover{secrets.token_hex(4)}:"
        nodes: list[Node] = []
        try:
            for i, form in enumerate(("section", "url", "env")):
                nodes.append(sentinel_gateway(workdir, f"gw{i}", upstream_url, tokens, topo, prefix, form))
            for node in nodes:
                wait_ready(node, 20)
            yield topo, nodes, arrivals
        finally:
            topo.thaw()
            for node in nodes:
                stop_gateway(node)


def first_steady_success(answers: list[Answer], after: float) -> float | None:
    """When the answers after `after` turned 200 for good (None if the last one was not 200)."""
    later = [a for a in answers if a.at > after]
    if not later or later[-1].status != 200:
        return None
    steady = later[-1].at
    for answer in reversed(later):
        if answer.status != 200:
            break
        steady = answer.at
    return steady


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_acknowledged_disables_survive_a_sentinel_failover_and_traffic_recovers_without_a_restart(
    tmp_path: Path, admin_tokens: AdminTokens, fault: str
) -> None:
    with failover_cluster(tmp_path, admin_tokens) as (topo, nodes, arrivals):
        old_master = topo.master.port
        assert topo.master_port() == old_master
        new = {"owner": "failover"}
        created = [admin(nodes[i % 3], "POST", "/v1/keys", {**new, "name": f"k{i}"}) for i in range(DISABLES + 1)]
        assert all(status == 201 for status, _ in created), created
        keys = [body["key"] for _, body in created]
        ids = [body["id"] for _, body in created]
        valid = 0  # keys[0] is never disabled

        disables: list[Disable] = []
        with traffic(nodes, keys) as (cyclers, readiness):
            time.sleep(0.5)  # every gateway has served every key
            for i in range(1, DISABLES + 1):
                if i == BEFORE_FAULT + 1:
                    fault_at = time.monotonic()
                    if fault == "kill":
                        assert topo.master.proc is not None
                        topo.master.proc.send_signal(signal.SIGKILL)
                    else:
                        topo.freeze_master()
                disables.append(disable_until_acknowledged(nodes, ids[i], via=i))
                time.sleep(0.15)
            deadline = time.monotonic() + 30
            while topo.master_port() in (None, old_master):
                assert time.monotonic() < deadline, "the sentinels never promoted a replica"
                time.sleep(0.1)
            # Valid-key traffic must recover on every gateway: wait for it, bounded.
            deadline = fault_at + RECOVERY_LIMIT + 5
            while time.monotonic() < deadline and not all(
                first_steady_success([a for a in c.answers if a.key == valid], fault_at) for c in cyclers
            ):
                time.sleep(0.2)
            time.sleep(1.0)
        if fault == "hang":
            topo.thaw()  # the old master comes back; the sentinels make it a replica

        # 1. No acknowledged disable was lost: nothing with the key reached the upstream after the answer.
        late: dict[str, list[float]] = {}
        for record in disables:
            answer = record.acknowledged
            assert answer is not None
            after = [t - answer.stamp for t in arrivals.of(record.key_id) if t > answer.stamp]
            if after:
                late[record.key_id] = after
        assert late == {}, f"disabled keys reached the upstream after the disable's answer: {late}"
        # ... and every gateway refuses every disabled key now.
        for node in nodes:
            for i in range(1, DISABLES + 1):
                assert node.proxy(keys[i]) == (403, "key_disabled"), (node.name, i)

        # 2. Disables during the failover were refused with 503 store_unavailable and Retry-After, and
        # succeeded when retried (disable_until_acknowledged got a 200 for each).
        refused = [a for d in disables for a in d.attempts if isinstance(a, Stamped) and a.status != 200]
        assert refused, "no disable was refused during the failover: the fault came too late?"
        for answer in refused:
            assert answer.status == 503, answer
            assert json.loads(answer.body)["error"]["code"] == "store_unavailable", answer.body
            assert answer.headers.get("Retry-After") == "1", answer.headers
        assert all(d.acknowledged for d in disables[:BEFORE_FAULT])
        print(
            f"\n{fault}: {len(refused)} refused attempt(s), "
            f"{sum(isinstance(a, str) for d in disables for a in d.attempts)} connection error(s); "
            f"new master {topo.master_port()} (was {old_master})"
        )

        # 3. The valid key works again on every gateway without a restart, in time.
        recovered: list[tuple[str, float]] = []
        for cycler in cyclers:
            steady = first_steady_success([a for a in cycler.answers if a.key == valid], fault_at)
            assert steady is not None, f"{cycler.node.name}: the valid key never worked again"
            assert steady - fault_at <= RECOVERY_LIMIT, (cycler.node.name, steady - fault_at)
            assert cycler.node.proc.poll() is None, "a gateway exited"
            recovered.append((cycler.node.name, steady - fault_at))
        print("valid key steady again after " + ", ".join(f"{name} {s:.1f} s" for name, s in recovered))

        # 4. Readiness: 503 during the gap, 200 after.
        for node in nodes:
            seen = readiness.seen[node.name]
            assert any(status != 200 for at, status in seen if at > fault_at), f"{node.name} stayed ready"
            assert seen[-1][1] == 200, (node.name, seen[-5:])
            assert node.readyz() == 200


def test_a_change_no_replica_acknowledges_is_answered_503_and_succeeds_when_retried(
    tmp_path: Path, admin_tokens: AdminTokens
) -> None:
    """redis.min_replicas_acked: 1 with both replicas hung: the disable is written on the master but
    no replica holds it, so a failover now could lose it: 503 store_unavailable with Retry-After,
    never a 200. Once a replica is back, the retried disable (a repeat: nothing new to write)
    answers 200 only after WAIT confirms it."""
    with recording_upstream() as (upstream_url, _), topology(tmp_path / "redis") as topo:
        node = sentinel_gateway(tmp_path, "gw", upstream_url, admin_tokens, topo, "wait:", "section")
        try:
            wait_ready(node, 20)
            ready = json.loads(request("GET", node.admin_url + "/readyz")[1])
            assert ready["topology"] == {"mode": "sentinel", "role": "master", "replicas": 2, "min_replicas_acked": 1}
            assert "warning" not in ready, ready
            status, body = node.admin("POST", "/v1/keys", {"name": "wait", "owner": "failover"})
            assert status == 201, body
            for replica in topo.replicas:
                assert replica.proc is not None
                replica.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                answer = stamped_call(
                    "POST",
                    f"{node.admin_url}/v1/keys/{body['id']}/disable",
                    {"Authorization": f"Bearer {admin_tokens.developer}", "Content-Type": "application/json"},
                    json.dumps({"reason": "no replica"}).encode(),
                )
                elapsed = time.monotonic() - started
            finally:
                for replica in topo.replicas:
                    assert replica.proc is not None
                    replica.proc.send_signal(signal.SIGCONT)
            assert answer.status == 503, answer
            error = json.loads(answer.body)["error"]
            assert error["code"] == "store_unavailable"
            assert "min_replicas_acked" in error["detail"], error
            assert answer.headers.get("Retry-After") == "1"
            assert 0.5 <= elapsed < 2.0, elapsed  # WAIT's timeout (0.5 s), not a hang
            retried, again = node.admin("POST", f"/v1/keys/{body['id']}/disable", {"reason": "no replica"})
            assert retried == 200, again
            assert node.proxy(body["key"]) == (403, "key_disabled")
        finally:
            stop_gateway(node)
