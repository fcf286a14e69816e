"""Webhooks (spec 10): key events signed as Standard Webhooks specifies, delivered at least once.

Pure parts (the signature, the retry schedule, which audit entry is which event, the config) are
unit-tested; delivery runs against a real redis-server, replicas built in this process and a real
HTTP receiver (tests/webhook_receiver.py), whose signatures the reference library (`standardwebhooks`)
verifies. tests/test_webhooks_replicas.py runs gateway processes: restarts, kills, two replicas.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from standardwebhooks import Webhook, WebhookVerificationError

from gateway import config as config_mod
from gateway.config import WEBHOOK_EVENTS, ConfigError, webhook_key
from gateway.keytable.record import KeyRecord
from gateway.keytable.store import AuditEntry
from gateway.runtime.replica import build
from gateway.runtime.serve import listen_client
from gateway.webhooks import events, signing
from gateway.webhooks.queue import Guard, Queue
from gateway.webhooks.schedule import Schedule
from gateway.webhooks.service import Webhooks
from tests.conftest import AdminTokens, Gateway, RedisProcess, make_config, serve_replica
from tests.webhook_receiver import HANG, Got, Receiver


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


# the signature ------------------------------------------------------------------------------


def test_signature_is_the_standards_example() -> None:
    """The example of the Standard Webhooks test suite: secret, id, timestamp, body -> signature."""
    key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert key is not None
    got = signing.signature(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_reference_library_verifies_our_headers_and_refuses_a_change() -> None:
    secret = new_secret()
    key = webhook_key(secret)
    assert key is not None
    body = b'{"type":"key.disabled","data":{"key":{"id":"key_0123456789abcdef0123"}}}'
    headers = signing.headers(key, "msg_1733140000000-0", int(time.time()), body)
    assert Webhook(secret).verify(body, headers)["type"] == "key.disabled"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"disabled", b"enabled"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": "msg_other"})


@pytest.mark.parametrize(
    ("secret", "ok"),
    [
        ("whsec_" + base64.b64encode(b"k" * 24).decode(), True),
        ("whsec_" + base64.b64encode(b"k" * 64).decode(), True),
        ("whsec_" + base64.b64encode(b"k" * 32).decode().rstrip("="), True),  # unpadded, as the reference accepts
        ("whsec_" + base64.b64encode(b"k" * 23).decode(), False),  # under 192 bits
        ("whsec_" + base64.b64encode(b"k" * 65).decode(), False),
        (base64.b64encode(b"k" * 32).decode(), False),  # no prefix
        ("whsec_not*base64!", False),
    ],
)
def test_secret_form(secret: str, ok: bool) -> None:
    assert (webhook_key(secret) is not None) == ok


# the retry schedule ----------------------------------------------------------------------


def test_schedule_doubles_from_the_initial_step_up_to_the_cap() -> None:
    s = Schedule(initial=5, max_interval=3600, horizon=24 * 3600)
    assert [s.step(n) for n in range(1, 12)] == [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600]
    assert s.step(500) == 3600  # no overflow far out


def test_schedule_jitter_stays_within_half_a_step_and_the_step() -> None:
    s = Schedule(initial=5, max_interval=3600, horizon=24 * 3600)
    rng = random.Random(7)
    for attempt in (1, 3, 8, 20):
        step = s.step(attempt)
        delays = [s.next_due(attempt, 0.0, 100.0, rng) - 100.0 for _ in range(2000)]  # type: ignore[operator]
        assert min(delays) >= step / 2 and max(delays) <= step
        assert max(delays) - min(delays) > step * 0.4  # spread out, not one value


@pytest.mark.parametrize("draw", ["low", "high", "random"])
def test_schedule_tries_for_the_whole_horizon_then_gives_up(draw: str) -> None:
    """Failing forever: attempts go on until 24 h after the event (the last one at 24 h exactly),
    never further apart than the cap, and then the event is given up."""
    s = Schedule(initial=5, max_interval=3600, horizon=24 * 3600)
    rng = random.Random(11)

    class Edge(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return a if draw == "low" else b

    pick = rng if draw == "random" else Edge()
    first = 1_000_000.0
    times = [first]  # attempt 1 at the event
    while (due := s.next_due(len(times), first, times[-1], pick)) is not None:
        times.append(due)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[-1] == first + 24 * 3600  # tried at the horizon itself: at least 24 h
    assert max(gaps) <= 3600 and min(gaps) > 0
    assert gaps[0] <= 5 and gaps[:5] == sorted(gaps[:5])  # fast at first, growing
    assert 24 <= len(times) <= 60, len(times)
    assert s.next_due(len(times), first, first + 24 * 3600) is None


# events from audit entries ------------------------------------------------------------------


def entry(action: str, actor: str = "ops", **kw: Any) -> dict[str, Any]:
    return {"id": "1733140000000-0", "at": "2024-12-02T11:46:40.000Z", "actor": actor, "action": action,
            "key_id": "key_0123456789abcdef0123", "reason": kw.pop("reason", None), "detail": kw or None}  # fmt: skip


@pytest.mark.parametrize(
    ("action", "actor", "kind"),
    [
        ("create", "ops", "key.created"),
        ("import", "ops", "key.created"),
        ("disable", "ops", "key.disabled"),
        ("disable", "policy:many-ips", "key.auto_disabled"),
        ("enable", "ops", "key.enabled"),
        ("revoke", "ops", "key.revoked"),
        ("rotate", "ops", "key.rotated"),
        ("policy_match", "policy:many-ips", None),
        ("something_new", "ops", None),
    ],
)
def test_audit_entry_to_event(action: str, actor: str, kind: str | None) -> None:
    assert events.kind(action, actor) == kind
    event = events.from_audit(entry(action, actor), 1733140000.0, None)
    assert (event.type if event is not None else None) == kind


def test_payload_carries_the_key_fields_and_never_its_hash() -> None:
    record = KeyRecord(id="key_0123456789abcdef0123", hash="ab" * 32, name="ci", owner="acme", scopes=("s:x",),
                       meta={"secret-ish": "m"}, start="gw_Abcd", created_at=1.0, expires_at=2e9)  # fmt: skip
    event = events.from_audit(entry("disable", "policy:many-ips", reason="4 addresses > 3"), 1733140000.0, record)
    assert event is not None and event.msg_id == "msg_1733140000000-0"
    body = orjson.loads(event.body)
    assert body == {
        "type": "key.auto_disabled",
        "timestamp": "2024-12-02T11:46:40.000Z",
        "data": {
            "key": {
                "id": record.id,
                "name": "ci",
                "owner": "acme",
                "state": "disabled",
                "expires_at": "2033-05-18T03:33:20.000Z",
            },
            "actor": "policy:many-ips",
            "reason": "4 addresses > 3",
            "policy": "many-ips",
        },
    }
    for secretish in (record.hash, "gw_Abcd", "secret-ish", "s:x"):
        assert secretish.encode() not in event.body


def test_an_oversized_payload_is_marked_not_sent() -> None:
    big = entry("rotate", "ops", new_key_id="x" * (events.MAX_BODY_BYTES + 10))
    event = events.from_audit(big, 1.0, None)
    assert event is not None and not event.oversized and b"detail" not in event.body  # the detail goes first
    huge = {**entry("disable"), "reason": "r" * (events.MAX_BODY_BYTES + 10)}
    event = events.from_audit(huge, 1.0, None)
    assert event is not None and event.oversized and event.body == b""


# the config ---------------------------------------------------------------------------------


def base_raw(webhooks: Any) -> dict[str, Any]:
    return {
        "admin": {"tokens": []},
        "routes": [{"name": "api", "path_prefix": "/api", "upstream": "http://127.0.0.1:9000"}],
        "webhooks": webhooks,
    }


def parse(raw: dict[str, Any], environ: dict[str, str] | None = None) -> config_mod.Config:
    return config_mod.parse(yaml.safe_dump(raw), source="gw.yaml", environ=environ)


def problems(raw: dict[str, Any], environ: dict[str, str] | None = None) -> tuple[list[config_mod.Problem], str]:
    with pytest.raises(ConfigError) as caught:
        parse(raw, environ)
    return caught.value.problems, str(caught.value)


def test_config_three_ways_to_give_the_secret(tmp_path: Path) -> None:
    one, two, three = new_secret(), new_secret(), new_secret()
    (tmp_path / "hook-secret").write_text(two + "\n")  # a mounted Kubernetes Secret ends in a newline, often
    cfg = parse(base_raw({
        "expiring_soon_seconds": 3600,
        "endpoints": [
            {"name": "a", "url": "https://hooks.example.com/gw", "secret": one},
            {"name": "b", "url": "http://u:p@10.0.0.1:8080/x", "secret_file": str(tmp_path / "hook-secret"),
             "events": ["key.disabled", "key.auto_disabled"]},
            {"name": "c", "url": "https://c.example.com", "secret_env": "HOOK_C", "events": "all"},
        ],
    }), {"HOOK_C": three})  # fmt: skip
    wh = cfg.webhooks
    assert wh is not None and wh.expiring_soon_seconds == 3600 and wh.retry_hours == 24
    a, b, c = wh.endpoints
    assert (a.secret, b.secret, c.secret) == (webhook_key(one), webhook_key(two), webhook_key(three))
    assert a.events == c.events == frozenset(WEBHOOK_EVENTS) and b.events == {"key.disabled", "key.auto_disabled"}
    assert one not in repr(cfg) and "u:p@" not in repr(cfg)  # secrets and URLs are left out of the repr
    assert parse(base_raw(None)).webhooks is None


def test_config_reports_every_problem_at_once_without_secrets_or_credentials(tmp_path: Path) -> None:
    bad_secret = "whsec_" + base64.b64encode(b"short").decode()
    found, text = problems(base_raw({
        "timeout_seconds": 0,
        "retry_hours": 2,
        "retry_initial_seconds": 60,
        "retry_max_interval_seconds": 10,
        "endpoints": [
            {"name": "a", "url": "ftp://hookuser:hookpass@h/x", "secret": bad_secret, "events": ["key.deleted"]},
            {"name": "a", "url": "https://h", "secret_file": str(tmp_path / "missing")},
            {"name": "c", "url": "https://h", "secret_env": "NOT_SET"},
            {"name": "d", "url": "https://h"},
            {"name": "e", "url": "https://h", "secret": new_secret(), "secret_env": "X"},
            {"name": "f", "url": "https://h", "secret": new_secret(), "surprise": "hookpass"},
        ],
    }))  # fmt: skip
    paths = [p.path for p in found]
    assert paths == [
        "webhooks.timeout_seconds",
        "webhooks.retry_hours",
        "webhooks.endpoints[0].url",
        "webhooks.endpoints[0].events",
        "webhooks.endpoints[0].secret",
        "webhooks.endpoints[1].name",
        "webhooks.endpoints[1].secret_file",
        "webhooks.endpoints[2].secret_env",
        "webhooks.endpoints[3].secret",
        "webhooks.endpoints[4].secret",
        "webhooks.endpoints[5].surprise",
        "webhooks.retry_max_interval_seconds",
    ], text
    assert "gw.yaml: webhooks.endpoints[0].url: 'ftp://(credentials)@h/x': must be an http:// or https://" in text
    assert "webhooks.retry_hours: 2: must be between 24 and 744" in text
    assert "names an environment variable that is not set" in text
    assert "give exactly one of secret, secret_file, secret_env" in text
    for leaked in ("hookuser", "hookpass", bad_secret, bad_secret[6:]):
        assert leaked not in text


def test_config_a_bad_secret_in_a_file_or_variable_is_not_echoed(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("whsec_tooshort")
    found, text = problems(base_raw({"endpoints": [
        {"name": "a", "url": "https://h", "secret_file": str(tmp_path / "s")},
        {"name": "b", "url": "https://h", "secret_env": "S"},
    ]}), {"S": "plain-password-1234567890"})  # fmt: skip
    assert [p.path for p in found] == ["webhooks.endpoints[0].secret_file", "webhooks.endpoints[1].secret_env"]
    assert "whsec_tooshort" not in text and "plain-password" not in text
    assert "the file's content must be a Standard Webhooks secret" in text


def test_config_needs_endpoints() -> None:
    found, text = problems(base_raw({"expiring_soon_seconds": 60}))
    assert [p.path for p in found] == ["webhooks.endpoints"], text


# delivery: real Redis, replicas in this process, a real receiver ------------------------------


@pytest.fixture
async def hub(
    redis_server: RedisProcess, upstream: Any, admin_tokens: AdminTokens
) -> AsyncIterator[Callable[..., Any]]:
    """Starts replicas with a `webhooks` section on one prefix: `await hub(webhooks, **service_kw)`."""
    prefix = f"wh{secrets.token_hex(4)}:"
    async with contextlib.AsyncExitStack() as stack:

        async def start(webhooks: dict[str, Any] | None, **service_kw: Any) -> Gateway:
            overrides: dict[str, Any] = {"redis.prefix": prefix}
            if webhooks is not None:
                overrides["webhooks"] = webhooks
            cfg = make_config(redis_url=redis_server.url, upstream_url=str(upstream.make_url("")).rstrip("/"),
                              tokens=admin_tokens.entries, overrides=overrides)  # fmt: skip
            client = Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=0.5)
            listener = listen_client(redis_server.url)
            stack.push_async_callback(client.aclose)
            stack.push_async_callback(listener.aclose)
            replica = build(cfg, client, listener)
            if service_kw:
                assert cfg.webhooks is not None
                replica.webhooks = Webhooks(cfg.webhooks, replica.store, replica.metrics, replica.replica_id,
                                            **service_kw)  # fmt: skip
            await stack.enter_async_context(replica.running())
            return await serve_replica(replica, stack, admin_tokens)

        yield start


def endpoint(name: str, receiver: Receiver, secret: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "url": receiver.url, "secret": secret, **kw}


def counter(gw: Gateway, name: str, **labels: str) -> float:
    metric = getattr(gw.replica.metrics, name)
    return float(metric.labels(**labels)._value.get())


async def post(gw: Gateway, path: str, body: Any = None, token: str = "admin") -> dict[str, Any]:
    async with await gw.admin_call("POST", path, token=token, json=body) as r:
        assert r.status in (200, 201), await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def test_every_event_kind_arrives_signed_with_the_key_fields(hub: Callable[..., Any]) -> None:
    secret = new_secret()
    with Receiver().serving() as rx:
        gw: Gateway = await hub({"expiring_soon_seconds": 600, "check_seconds": 0.2,
                                 "endpoints": [endpoint("audit-sink", rx, secret)]})  # fmt: skip
        # a expires in 2 h: outside the 10 min horizon, until its rotation ends it in 60 s (key.expiring_soon);
        # b, its successor, inherits the 2 h.
        later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))
        a = await post(gw, "/v1/keys", {"name": "ci", "owner": "acme", "expires_at": later}, "developer")
        await post(gw, f"/v1/keys/{a['id']}/disable", {"reason": "left the company"}, "developer")
        await post(gw, f"/v1/keys/{a['id']}/enable", None, "developer")
        rotated = await post(gw, f"/v1/keys/{a['id']}/rotate", {"grace_seconds": 60}, "developer")
        b = rotated["id"]
        # A policy's disable (issue 12's policies): an ordinary audited disable with actor policy:<name>.
        store = gw.replica.store
        async with gw.replica.propagator.announce() as announcement:
            outcome = await store.update(
                b, lambda r: r.bump(enabled=False, disabled_by="policy:many-ips", disabled_reason="ips 5 > 3"),
                [AuditEntry(actor="policy:many-ips", action="disable", key_id=b, reason="ips 5 > 3")], announcement,
            )  # fmt: skip
            assert outcome is not None
        d = await post(gw, "/v1/keys", {"name": "short-lived"}, "developer")
        await post(gw, f"/v1/keys/{d['id']}/revoke", {"reason": "done"})
        plaintext = "gw_imported_" + secrets.token_urlsafe(16)
        async with await gw.admin_call("POST", "/v1/keys/import", token="developer",
                                       data=f'{{"key": "{plaintext}", "name": "bulk"}}\n') as r:  # fmt: skip
            assert r.status == 200
            imported = [line for line in (await r.text()).splitlines() if line]
        wanted = {"key.created": 4, "key.disabled": 1, "key.enabled": 1, "key.rotated": 1, "key.auto_disabled": 1,
                  "key.revoked": 1, "key.expiring_soon": 1}  # fmt: skip

        def kinds() -> dict[str, int]:
            out: dict[str, int] = {}
            for got in rx.delivered():
                out[got.payload["type"]] = out.get(got.payload["type"], 0) + 1
            return out

        await rx.await_(lambda: kinds() == wanted, 15, "every kind of event")
        by_type: dict[str, list[dict[str, Any]]] = {}
        for got in rx.delivered():
            data = got.verified(secret)  # the reference library checks each signature
            assert got.headers["content-type"] == "application/json" and got.msg_id.startswith("msg_")
            by_type.setdefault(data["type"], []).append(data)
            for leaked in (a.get("key"), rotated["key"], d.get("key"), plaintext, secret):
                assert leaked is not None and leaked.encode() not in got.body
        disabled = by_type["key.disabled"][0]["data"]
        assert disabled["key"] == {"id": a["id"], "name": "ci", "owner": "acme", "state": "disabled",
                                   "expires_at": disabled["key"]["expires_at"]}  # fmt: skip
        assert disabled["actor"] == "ops-developer" and disabled["reason"] == "left the company"
        auto = by_type["key.auto_disabled"][0]["data"]
        assert (auto["key"]["id"], auto["policy"], auto["reason"]) == (b, "many-ips", "ips 5 > 3")
        assert by_type["key.rotated"][0]["data"]["detail"] == {"new_key_id": b, "grace_seconds": 60}
        created = {d["data"]["key"]["id"]: d["data"] for d in by_type["key.created"]}
        assert created[b]["detail"] == {"rotated_from": a["id"]}
        assert by_type["key.revoked"][0]["data"]["key"] == {"id": d["id"], "name": "short-lived", "owner": None,
                                                             "state": "revoked", "expires_at": None}  # fmt: skip
        soon = by_type["key.expiring_soon"][0]
        assert soon["data"]["key"]["id"] == a["id"] and soon["data"]["key"]["state"] == "active"
        assert soon["data"]["key"]["expires_at"] == rotated["rotated_from"]["expires_at"]
        assert '"result":"imported"' in imported[0]
        # key.expiring_soon once per key and expiry: five more checks (check_seconds 0.2) send nothing more.
        await asyncio.sleep(1.0)
        assert kinds() == wanted
        # Everything delivered leaves nothing queued.
        redis = gw.replica.store.redis
        assert await redis.zcard(gw.replica.store.prefix + "wh:due:audit-sink") == 0
        assert counter(gw, "webhooks_delivered", endpoint="audit-sink") == sum(wanted.values())


async def test_a_receiver_failing_three_attempts_gets_the_fourth(hub: Callable[..., Any]) -> None:
    secret = new_secret()
    with Receiver(lambda got: 200 if got.attempt >= 4 else 500).serving() as rx:
        gw: Gateway = await hub({"retry_initial_seconds": 0.05, "endpoints": [
            endpoint("flaky", rx, secret, events=["key.disabled"])]})  # fmt: skip
        key = await gw.create_key(name="k")
        await post(gw, f"/v1/keys/{key['id']}/disable", {"reason": "x"}, "developer")
        await rx.await_(lambda: len(rx.delivered()) == 1, 10, "the fourth attempt")
        got = rx.snapshot()
        assert [g.attempt for g in got] == [1, 2, 3, 4]
        assert len({g.msg_id for g in got}) == 1  # one message, retried
        for g in got:
            assert g.verified(secret)["data"]["key"]["id"] == key["id"]  # each attempt signed afresh
        gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
        assert all(0.025 * 2**i * 0.9 <= gap for i, gap in enumerate(gaps)), gaps  # backoff: at least half a step
        assert counter(gw, "webhooks_retried", endpoint="flaky") == 3  # counted before the next attempt was claimed
        # counted once the answer is read, after the receiver recorded it: waited for, not assumed
        await rx.await_(lambda: counter(gw, "webhooks_delivered", endpoint="flaky") == 1, 5, "the delivered count")
        await asyncio.sleep(0.2)  # what must not happen has no event to wait for: no fifth attempt
        assert len(rx.snapshot()) == 4 and counter(gw, "webhooks_delivered", endpoint="flaky") == 1


async def test_a_hung_receiver_does_not_hold_up_another(hub: Callable[..., Any]) -> None:
    secret = new_secret()
    with Receiver(lambda got: HANG).serving() as hung, Receiver().serving() as fine:
        endpoints = [endpoint("hung", hung, secret), endpoint("fine", fine, secret)]
        gw: Gateway = await hub({"timeout_seconds": 3, "concurrency": 1, "retry_initial_seconds": 0.2,
                                 "endpoints": endpoints})  # fmt: skip
        for i in range(3):
            await gw.create_key(name=f"k{i}")
        await fine.await_(lambda: len(fine.delivered()) == 3, 10, "the healthy endpoint's events")
        # All three went while the hung endpoint's one attempt (its concurrency) was still hanging: no
        # timeout, no retry yet. An endpoint that waited for the other would see its timeout first.
        assert counter(gw, "webhooks_retried", endpoint="hung") == 0
        await hung.await_(lambda: len(hung.snapshot()) >= 1, 5, "the hung endpoint's first attempt")
        await hung.await_(lambda: counter(gw, "webhooks_retried", endpoint="hung") >= 1, 10, "a timed-out attempt")
        assert counter(gw, "webhooks_delivered", endpoint="hung") == 0


async def test_an_event_failing_past_the_horizon_is_dropped_with_a_metric_and_a_log_line(
    hub: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    secret = new_secret()
    caplog.set_level(logging.INFO, logger="gateway.webhooks")
    with Receiver(lambda got: 503).serving() as rx:
        # The real horizon is at least 24 h (config.py): scaled down here, the logic is the same.
        gw: Gateway = await hub({"endpoints": [endpoint("down", rx, secret, events=["key.created"])]},
                                schedule=Schedule(initial=0.05, max_interval=0.2, horizon=1.0))  # fmt: skip
        await gw.create_key(name="k")

        def dropped() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage().startswith("webhook dropped")]

        # the log line is the attempt's last step: the metric and the queue's finish come before it
        await rx.await_(lambda: len(dropped()) == 1, 10, "the drop")
        assert counter(gw, "webhooks_dropped", endpoint="down", reason="expired") == 1
        attempts = rx.snapshot()
        assert len(attempts) >= 4 and attempts[-1].at - attempts[0].at >= 0.9
        assert counter(gw, "webhooks_retried", endpoint="down") == len(attempts) - 1
        assert await gw.replica.store.redis.zcard(gw.replica.store.prefix + "wh:due:down") == 0
        assert "key.created" in dropped()[0].getMessage()
        assert dropped()[0].endpoint == "down"
        await asyncio.sleep(0.5)  # what must not happen has no event to wait for
        assert len(rx.snapshot()) == len(attempts) and len(dropped()) == 1  # nothing after the drop


async def test_a_full_queue_drops_the_new_event_for_that_endpoint_only(hub: Callable[..., Any]) -> None:
    secret = new_secret()
    with Receiver(lambda got: 500).serving() as down, Receiver().serving() as fine:
        gw: Gateway = await hub({"max_queue": 1, "retry_initial_seconds": 600, "endpoints": [
            endpoint("down", down, secret), endpoint("fine", fine, secret)]})  # fmt: skip
        redis, prefix = gw.replica.store.redis, gw.replica.store.prefix
        await gw.create_key(name="one")
        await down.await_(lambda: len(down.snapshot()) == 1, 5, "the first attempt")
        # An attempt in flight still counts in its queue: wait until the healthy endpoint's is finished.
        for _ in range(250):
            if await redis.zcard(prefix + "wh:due:fine") == 0:
                break
            await asyncio.sleep(0.02)
        assert await redis.zcard(prefix + "wh:due:fine") == 0 and len(fine.delivered()) == 1
        assert await redis.zcard(prefix + "wh:due:down") == 1  # down's event waits for its retry in 600 s
        await gw.create_key(name="two")
        await fine.await_(lambda: len(fine.delivered()) == 2, 5, "both events at the healthy endpoint")
        assert counter(gw, "webhooks_dropped", endpoint="down", reason="queue_full") == 1
        assert counter(gw, "webhooks_dropped", endpoint="fine", reason="queue_full") == 0


async def test_a_change_made_before_the_intake_loop_first_runs_is_sent(
    hub: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer group starts at the stream's end: it exists once the replica runs (before it
    serves), not whenever the intake task first gets the CPU. Here that task is held back until the
    replica's first change is written, as a loaded machine can do; the change is still sent."""
    secret = new_secret()
    gate = asyncio.Event()
    intake = Webhooks._intake_loop

    async def late_intake(self: Webhooks) -> None:
        await gate.wait()
        await intake(self)

    monkeypatch.setattr(Webhooks, "_intake_loop", late_intake)
    with Receiver().serving() as rx:
        gw: Gateway = await hub({"endpoints": [endpoint("sink", rx, secret, events=["key.created"])]})
        redis, stream = gw.replica.store.redis, gw.replica.store.audit_stream
        key = await gw.create_key(name="first")
        assert await redis.xlen(stream) == 1 and len(rx.snapshot()) == 0  # written, not read yet
        gate.set()
        await rx.await_(lambda: len(rx.delivered()) == 1, 10, "the first change's event")
        assert rx.delivered()[0].verified(secret)["data"]["key"]["id"] == key["id"]


async def test_an_entry_read_and_not_queued_after_a_failure_is_read_again_at_once(
    hub: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queueing an entry fails after the group handed it to this replica (Redis dropped the
    connection): the replica reads its own unacked entries again after the failure, rather than
    leaving them to the reclaim of a dead replica's entries 30 s later."""
    secret = new_secret()
    enqueue = Queue.enqueue
    failed: list[str] = []

    async def flaky_enqueue(self: Queue, guard: Guard, *args: Any, **kw: Any) -> list[int] | None:
        if guard.kind == "ack" and not failed:
            failed.append(guard.args[2])
            raise RedisConnectionError("injected: the connection dropped before the script ran")
        return await enqueue(self, guard, *args, **kw)

    monkeypatch.setattr(Queue, "enqueue", flaky_enqueue)
    with Receiver().serving() as rx:
        gw: Gateway = await hub({"endpoints": [endpoint("sink", rx, secret, events=["key.created"])]})
        assert gw.replica.webhooks is not None and gw.replica.webhooks.reclaim_ms == 30_000
        key = await gw.create_key(name="k")
        await rx.await_(lambda: len(rx.delivered()) == 1, 5, "the event after the failed intake")
        assert rx.delivered()[0].verified(secret)["data"]["key"]["id"] == key["id"]
        assert failed == [rx.delivered()[0].msg_id.removeprefix("msg_")]  # that very entry failed first
        redis, stream = gw.replica.store.redis, gw.replica.store.audit_stream
        assert (await redis.xpending(stream, "webhooks"))["pending"] == 0


async def test_an_audit_entry_a_dead_replica_read_is_taken_over(
    hub: Callable[..., Any], redis_server: RedisProcess
) -> None:
    """A replica that read an entry from the group and died before queueing it: the entry stays
    pending, and a live replica claims it after the reclaim time and delivers its event."""
    secret = new_secret()
    with Receiver().serving() as rx:
        plain: Gateway = await hub(None)  # a replica without webhooks makes the change
        redis = plain.replica.store.redis
        stream = plain.replica.store.audit_stream
        await redis.xgroup_create(stream, "webhooks", id="$", mkstream=True)
        key = await plain.create_key(name="orphan")
        # The dead replica: reads the entry as a consumer of the group, then nothing.
        read = await redis.xreadgroup("webhooks", "r_dead", {stream: ">"}, count=10)
        assert len(read[0][1]) == 1
        gw: Gateway = await hub({"endpoints": [endpoint("sink", rx, secret)]}, reclaim_seconds=0.5)
        await rx.await_(lambda: len(rx.delivered()) == 1, 10, "the orphaned event")
        assert rx.delivered()[0].verified(secret)["data"]["key"]["id"] == key["id"]
        pending = await redis.xpending(stream, "webhooks")
        assert pending["pending"] == 0
        assert gw.replica.webhooks is not None


async def test_stopping_a_replica_hands_its_attempt_in_flight_back(hub: Callable[..., Any]) -> None:
    """A clean stop releases the claim at once: another replica tries again without waiting for the
    visibility timeout (timeout_seconds + 5 s)."""
    secret = new_secret()
    with Receiver(lambda got: HANG if got.attempt == 1 else 200).serving() as rx:
        section = {"timeout_seconds": 20, "endpoints": [endpoint("sink", rx, secret, events=["key.created"])]}
        async with contextlib.AsyncExitStack() as first_stack:
            first: Gateway = await hub(section)
            # Stop the first replica's webhooks the way the runtime does at shutdown.
            assert first.replica.webhooks is not None
            first_stack.push_async_callback(first.replica.webhooks.stop)
            await first.create_key(name="k")
            await rx.await_(lambda: len(rx.snapshot()) == 1, 5, "the first attempt (hung)")
        stopped = time.monotonic()
        await hub(section)
        await rx.await_(lambda: len(rx.delivered()) == 1, 8, "the second attempt, by the other replica")
        assert time.monotonic() - stopped < 5  # well before the 25 s visibility timeout
        assert [g.attempt for g in rx.snapshot()] == [1, 2]


def test_got_helper() -> None:
    """The receiver's record keeps header names lower-cased (as the reference library expects)."""
    got = Got("/hook", {"webhook-id": "msg_1", "webhook-attempt": "2"}, b"{}", 0.0)
    assert (got.msg_id, got.attempt, got.payload) == ("msg_1", 2, {})


async def test_without_the_section_nothing_runs_and_a_reload_asks_for_a_restart(hub: Callable[..., Any]) -> None:
    plain: Gateway = await hub(None)
    assert plain.replica.webhooks is None
    await plain.create_key(name="k")
    redis = plain.replica.store.redis
    prefix = plain.replica.store.prefix
    assert await redis.keys(prefix + "wh:*") == []
    assert await redis.xinfo_groups(plain.replica.store.audit_stream) == []  # no consumer group made
    with Receiver().serving() as rx:
        wanted = plain.replica.config.webhooks
        raw = {"endpoints": [endpoint("sink", rx, new_secret())]}
        new = make_config(redis_url="redis://127.0.0.1:1/0", upstream_url="http://127.0.0.1:9",
                          tokens=[], overrides={"webhooks": raw})  # fmt: skip
        assert "webhooks" in plain.replica.reload_routes(new)
        assert plain.replica.config.webhooks == wanted  # not applied until a restart


async def test_keys_from_before_webhooks_get_key_expiring_soon_once(hub: Callable[..., Any]) -> None:
    """The expiry index is seeded once from the table: a key created while no replica ran webhooks
    still gets its key.expiring_soon, from one replica of two."""
    secret = new_secret()
    plain: Gateway = await hub(None)
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
    old = await post(plain, "/v1/keys", {"name": "old", "expires_at": soon}, "developer")
    far = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    await post(plain, "/v1/keys", {"name": "far", "expires_at": far}, "developer")
    with Receiver().serving() as rx:
        section = {"expiring_soon_seconds": 600, "check_seconds": 0.1, "endpoints": [endpoint("sink", rx, secret)]}
        await hub(section)
        await hub(section)
        await rx.await_(lambda: len(rx.delivered()) == 1, 10, "key.expiring_soon for the old key")
        await asyncio.sleep(0.5)  # five more checks on each replica: nothing more
        got = rx.snapshot()
        assert len(got) == 1 and got[0].verified(secret)["type"] == "key.expiring_soon"
        assert got[0].payload["data"]["key"]["id"] == old["id"]
        assert await plain.replica.store.redis.get(plain.replica.store.prefix + "wh:seeded") == b"done"
