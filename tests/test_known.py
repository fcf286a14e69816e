"""The key filter (gateway/keytable/keyfilter.py): unknown keys refused without a Redis read, on real parts.

What this file shows, each against the session's real redis-server and real in-process replicas:

- a flood of distinct random keys on a replica whose filter is ready is answered 401 key_not_found
  with no Redis GET at all (GETs are counted with `INFO commandstats`: the key lookup is one GET),
  and a valid key still passes;
- keys already in the table when a replica starts are found by its SCAN (more than one SCAN page);
- a key created through one replica's admin API is accepted by another as soon as the create
  returns (the announcement is added to the filter before the ack);
- while a replica's subscription is broken its filter refuses nothing (every key is read from
  Redis), and the rebuild after it resubscribes finds a key whose announcement it missed;
- a break during the scan leaves the filter not ready;
- `cache.key_filter: false` (or GATEWAY_CACHE_KEY_FILTER=false) turns it off: every unknown key
  costs one GET;
- the scan's MATCH pattern takes the prefix literally, glob characters included;
- /metrics on the admin listener shows the filter's state and its refusals.

A replica's resubscription is held where a test needs a window (the real `_session` runs once
released), as tests/test_coherence.py does; nothing that touches Redis is faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway import config as config_mod
from gateway.keytable import record as keys
from gateway.keytable.keyfilter import KnownKeys
from gateway.keytable.record import KeyRecord
from gateway.keytable.store import KeyStore
from tests.conftest import Gateway, get_calls, migrations_over

WAIT = 5.0  # bound on every wait for something asynchronous


# helpers ---------------------------------------------------------------------


def new_prefix() -> str:
    return f"kf{secrets.token_hex(4)}:"


def random_key() -> str:
    return "gw_" + secrets.token_urlsafe(24)


async def until(what: str, predicate: Callable[[], bool | Awaitable[bool]], seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while True:
        outcome = predicate()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


async def filter_ready(gw: Gateway) -> KnownKeys:
    """The replica's key filter, once its subscription is live and the filter may refuse."""
    known = gw.replica.lookup.known
    assert gw.replica.subscriber.known is known, "the lookup and the subscriber must share one filter"
    await until("the key filter is ready", lambda: gw.replica.coherence.coherent and known.ready)
    await migrations_over(gw.replica)  # their script's GET must not land in a count of GETs
    return known


async def proxy(gw: Gateway, key: str) -> tuple[int, str | None]:
    """Status and error code (None when the upstream answered) of a proxied request with `key`."""
    async with await gw.call("GET", "/api/known", key=key) as r:
        body = await r.read()
        if r.headers.get("X-Upstream") == "echo":
            return r.status, None
        return r.status, orjson.loads(body)["error"]["code"]


async def two_replicas(gateway_factory: Callable[..., Any], **overrides: Any) -> tuple[Gateway, Gateway]:
    prefix = new_prefix()
    gw_a: Gateway = await gateway_factory(**{"redis.prefix": prefix, **overrides})
    gw_b: Gateway = await gateway_factory(**{"redis.prefix": prefix, **overrides})
    _, live = await gw_a.replica.registry.live()
    assert set(live) == {gw_a.replica.replica_id, gw_b.replica.replica_id}
    return gw_a, gw_b


def hold_resubscription(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """The replica's next subscription session waits for `release` before it runs (for real)."""
    entered, release = asyncio.Event(), asyncio.Event()
    real_session = gw.replica.subscriber._session

    async def held() -> None:
        entered.set()
        await release.wait()
        await real_session()

    monkeypatch.setattr(gw.replica.subscriber, "_session", held)
    return entered, release


async def settle(*gateways: Gateway) -> None:
    """Best effort, even after a failed assertion: let resubscriptions finish before teardown."""
    for gw in gateways:
        with contextlib.suppress(AssertionError):
            await until("the replica is subscribed again", lambda g=gw: g.replica.coherence.coherent)


async def scrape(gw: Gateway) -> dict[str, float]:
    """The admin /metrics samples without labels, by sample name."""
    async with gw.session.get(gw.admin_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        sample.name: float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def put_records(redis: Redis, prefix: str, hashes: list[str]) -> None:
    """Key records written straight into the table (no announcement: nobody is told), with their
    `ids` member and id index field as the gateway writes them: a replica may build its filter from
    that index once the table's ids are moved (KeyStore.indexed_prefixes)."""
    store = KeyStore(redis, prefix)
    async with redis.pipeline(transaction=False) as pipe:
        for key_hash in hashes:
            rec = KeyRecord(id=keys.new_id(), hash=key_hash, name="direct", created_at=time.time())
            pipe.set(f"{prefix}k:{key_hash}", rec.to_json())
            pipe.hset(store.id_index(rec.id), rec.id, bytes.fromhex(key_hash))
            pipe.zadd(f"{prefix}ids", {rec.id: rec.created_at})
        await pipe.execute()


# 1. a flood of unknown keys costs no Redis read ------------------------------------------


async def test_a_flood_of_distinct_unknown_keys_is_refused_without_a_single_redis_get(
    gw: Gateway, redis: Redis
) -> None:
    valid = (await gw.create_key(name="before-the-flood"))["key"]
    known = await filter_ready(gw)
    refused_before = known.refused
    flood = [random_key() for _ in range(200)]
    assert len(set(flood)) == 200

    gets_before = await get_calls(redis)
    answers = await asyncio.gather(*(proxy(gw, key) for key in flood))
    gets_after = await get_calls(redis)

    assert set(answers) == {(401, "key_not_found")}
    assert gets_after - gets_before == 0, f"{gets_after - gets_before} GET(s) for a flood the filter should refuse"
    assert known.refused - refused_before == 200
    assert known.ready
    # the filter holds the valid key created before: it still passes
    assert await proxy(gw, valid) == (200, None)
    assert known.refused - refused_before == 200


# 2. keys written before the replica started are found by the scan --------------------------


async def test_a_replica_started_on_an_existing_table_finds_every_key_by_its_scan(
    gateway_factory: Callable[..., Any], redis: Redis
) -> None:
    prefix = new_prefix()
    gw_a: Gateway = await gateway_factory(**{"redis.prefix": prefix})
    created = [(await gw_a.create_key(name=f"early-{i}"))["key"] for i in range(5)]
    # and more than one SCAN page (COUNT 1000) of keys no announcement ever told anyone about
    direct = [random_key() for _ in range(2500)]
    await put_records(redis, prefix, [keys.digest(k) for k in direct])

    gw_b: Gateway = await gateway_factory(**{"redis.prefix": prefix})
    known = await filter_ready(gw_b)
    assert len(known) == len(created) + len(direct), "the scan must find exactly the table's keys"

    refused_before = known.refused
    for key in [*created, *direct[::250], direct[-1]]:
        assert await proxy(gw_b, key) == (200, None)
    assert known.refused == refused_before, "a key in the table was refused by the filter"
    assert known.ready

    gets_before = await get_calls(redis)
    assert await proxy(gw_b, random_key()) == (401, "key_not_found")
    assert await get_calls(redis) == gets_before
    assert known.refused == refused_before + 1


# 3. a key created on one replica works on another as soon as the create returns -------------


async def test_a_key_created_on_one_replica_is_accepted_by_the_other_the_moment_the_create_returns(
    gateway_factory: Callable[..., Any],
) -> None:
    gw_a, gw_b = await two_replicas(gateway_factory)
    known_a, known_b = await filter_ready(gw_a), await filter_ready(gw_b)
    refused = (known_a.refused, known_b.refused)
    sizes = (len(known_a), len(known_b))

    for i in range(20):
        maker, user = (gw_a, gw_b) if i % 2 == 0 else (gw_b, gw_a)
        key = (await maker.create_key(name=f"fresh-{i}"))["key"]
        assert user.replica.lookup.known.ready, "the using replica's filter must be ready (or this proves nothing)"
        assert await proxy(user, key) == (200, None), f"key {i}, created on the other replica, was refused"

    assert known_a.ready and known_b.ready
    assert (known_a.refused, known_b.refused) == refused
    assert (len(known_a), len(known_b)) == (sizes[0] + 20, sizes[1] + 20)


# 4. a broken subscription: the filter refuses nothing; the rebuild finds what was missed ------


async def test_while_the_subscription_is_broken_nothing_is_refused_and_the_rebuild_finds_a_missed_key(
    gateway_factory: Callable[..., Any], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw_a, gw_b = await two_replicas(gateway_factory)
    known_a, known_b = await filter_ready(gw_a), await filter_ready(gw_b)
    size_b, refused_b = len(known_b), known_b.refused
    sessions_a, sessions_b = gw_a.replica.subscriber.sessions, gw_b.replica.subscriber.sessions

    entered, release = hold_resubscription(gw_b, monkeypatch)
    try:
        assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 2
        await asyncio.wait_for(entered.wait(), WAIT)  # B is between sessions: not subscribed
        assert gw_b.replica.coherence.coherent is False
        assert known_b.ready is False

        # A comes back on its own; a key it creates now is announced while B is not listening
        await until(
            "A resubscribed with its filter rebuilt",
            lambda: gw_a.replica.subscriber.sessions > sessions_a and known_a.ready,
        )
        created = await gw_a.create_key(name="missed-by-b")
        key, key_hash = created["key"], keys.digest(created["key"])
        assert len(known_b) == size_b, "B was not subscribed, yet the announcement reached its filter"
        assert known_b.ready is False

        # B refuses nothing: the new key and an unknown one are both read from Redis
        gets = await get_calls(redis)
        assert await proxy(gw_b, key) == (200, None)
        assert await proxy(gw_b, random_key()) == (401, "key_not_found")
        assert await get_calls(redis) - gets == 2
        assert known_b.refused == refused_b
    finally:
        release.set()
        await settle(gw_a, gw_b)

    await until(
        "B resubscribed with its filter rebuilt",
        lambda: gw_b.replica.subscriber.sessions == sessions_b + 1 and known_b.ready,
    )
    assert len(known_b) == size_b + 1, "the rebuild scan did not add the key B missed"
    assert not known_b.absent(key_hash)
    gets = await get_calls(redis)
    assert await proxy(gw_b, key) == (200, None)  # the cache was cleared: one read, the filter said "maybe"
    assert await get_calls(redis) - gets == 1
    assert await proxy(gw_b, random_key()) == (401, "key_not_found")
    assert await get_calls(redis) - gets == 1, "an unknown key cost a GET after the filter was rebuilt"
    assert known_b.refused == refused_b + 1


async def test_a_break_during_the_scan_leaves_the_filter_not_ready_until_a_clean_rebuild(redis: Redis) -> None:
    prefix = new_prefix()
    hashes = {keys.digest(random_key()) for _ in range(3)}
    await put_records(redis, prefix, sorted(hashes))
    store = KeyStore(redis, prefix)
    known = KnownKeys()

    async def scan_broken_after_first() -> AsyncIterator[str]:
        n = 0
        async for key_hash in store.hashes():
            n += 1
            if n == 2:
                known.lost()  # what Subscriber._session's finally does on a break
            yield key_hash

    assert await known.rebuild(scan_broken_after_first()) is False
    assert known.ready is False
    assert len(known) == 0
    assert known.absent(next(iter(hashes))) is False  # not ready: refuses nothing
    assert known.absent(keys.digest(random_key())) is False
    assert known.refused == 0

    assert await known.rebuild(store.hashes()) is True
    assert known.ready is True
    assert len(known) == 3
    assert not any(known.absent(h) for h in hashes)
    assert known.absent(keys.digest(random_key())) is True
    assert known.refused == 1


# 5. the filter can be turned off ---------------------------------------------------------


async def test_with_key_filter_false_the_filter_never_becomes_ready_and_each_unknown_key_costs_one_get(
    gateway_factory: Callable[..., Any], redis: Redis
) -> None:
    prefix = new_prefix()
    gw_off: Gateway = await gateway_factory(**{"redis.prefix": prefix, "cache.key_filter": False})
    # a replica with the filter on, on the same table, started the same way: it shows how soon "ready" comes
    gw_on: Gateway = await gateway_factory(**{"redis.prefix": prefix})
    await filter_ready(gw_on)
    off = gw_off.replica.lookup.known
    assert off.enabled is False
    assert gw_off.replica.coherence.coherent
    created = await gw_on.create_key(name="announced-to-all")  # its announcement reaches gw_off too
    assert off.ready is False
    assert len(off) == 0
    assert (await scrape(gw_off))["gateway_key_filter_ready"] == 0.0
    # The startup layout migrations (runtime/replica.py) read Redis too, once: wait them out.
    await migrations_over(gw_off.replica, gw_on.replica)

    for _ in range(5):
        gets = await get_calls(redis)
        assert await proxy(gw_off, random_key()) == (401, "key_not_found")
        assert await get_calls(redis) - gets == 1
    assert await proxy(gw_off, created["key"]) == (200, None)
    assert off.refused == 0

    gets = await get_calls(redis)
    assert await proxy(gw_on, random_key()) == (401, "key_not_found")
    assert await get_calls(redis) == gets, "the filter-on replica on the same table should refuse without a GET"
    assert gw_on.replica.lookup.known.refused == 1


@pytest.mark.parametrize(("text", "expected"), [("false", False), ("true", True), ("off", False)])
def test_gateway_cache_key_filter_from_the_environment(text: str, expected: bool) -> None:
    raw = {
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "routes": [{"name": "api", "path_prefix": "/api", "upstream": "http://127.0.0.1:9"}],
    }
    default = config_mod.parse(yaml.safe_dump(raw), source="<test>", environ={})
    assert default.cache.key_filter is True
    cfg = config_mod.parse(yaml.safe_dump(raw), source="<test>", environ={"GATEWAY_CACHE_KEY_FILTER": text})
    assert cfg.cache.key_filter is expected


def test_a_key_filter_that_is_not_a_boolean_is_a_config_error() -> None:
    raw = {
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "cache": {"key_filter": "sometimes"},
        "routes": [{"name": "api", "path_prefix": "/api", "upstream": "http://127.0.0.1:9"}],
    }
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.parse(yaml.safe_dump(raw), source="<test>", environ={})
    assert "cache.key_filter" in str(caught.value)


# 6. the scan takes the prefix literally ---------------------------------------------------


@pytest.mark.parametrize(
    ("special", "lookalike"),
    [("[x]*?:", "xYZ:"), ("a\\b?*:", "abQQ:"), ("*:", "other:"), ("[^a]:", "b:")],
    ids=["brackets-star-question", "backslash", "star", "negated-class"],
)
async def test_hashes_matches_a_prefix_with_glob_characters_literally(
    redis: Redis, special: str, lookalike: str
) -> None:
    """The config refuses such prefixes today (A-Z a-z 0-9 _ . : - { }), so KeyStore is used directly."""
    with pytest.raises(config_mod.ConfigError):
        config_mod.parse(
            yaml.safe_dump(
                {
                    "redis": {"url": "redis://127.0.0.1:6379/0", "prefix": special},
                    "routes": [{"name": "api", "path_prefix": "/api", "upstream": "http://127.0.0.1:9"}],
                }
            ),
            environ={},
        )
    tag = f"glob{secrets.token_hex(4)}"
    prefix, other = tag + special, tag + lookalike
    own = {keys.digest(random_key()) for _ in range(5)}
    theirs = {keys.digest(random_key()) for _ in range(5)}
    await put_records(redis, prefix, sorted(own))
    await put_records(redis, other, sorted(theirs))
    await redis.set(prefix + "id:key_0123", "not a key record")  # other names under the prefix
    await redis.set(prefix + "kx", "not a key record")
    try:
        # the test means something: the prefix taken as a pattern would match the other prefix's keys
        unescaped = [k async for k in redis.scan_iter(match=f"{prefix}k:*", count=1000)]
        assert any(k.decode().startswith(other) for k in unescaped)

        found = [h async for h in KeyStore(redis, prefix).hashes()]
        assert set(found) == own
        assert {h async for h in KeyStore(redis, other).hashes()} == theirs
    finally:
        names = [f"{prefix}k:{h}" for h in own] + [f"{other}k:{h}" for h in theirs]
        await redis.delete(*names, prefix + "id:key_0123", prefix + "kx")


# 7. metrics ------------------------------------------------------------------------------


async def test_metrics_show_the_filter_ready_its_size_and_its_refusals(
    gw: Gateway, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        await gw.create_key(name=f"m{i}")
    known = await filter_ready(gw)
    for _ in range(7):
        assert await proxy(gw, random_key()) == (401, "key_not_found")
    assert known.refused == 7

    samples = await scrape(gw)
    assert samples["gateway_key_filter_ready"] == 1.0
    assert samples["gateway_key_filter_keys"] == len(known) == 3
    assert samples["gateway_key_filter_refusals_total"] == known.refused == 7

    entered, release = hold_resubscription(gw, monkeypatch)
    try:
        assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        await asyncio.wait_for(entered.wait(), WAIT)
        samples = await scrape(gw)
        assert samples["gateway_key_filter_ready"] == 0.0
        assert samples["gateway_key_filter_keys"] == 3  # nothing is ever removed
        assert await proxy(gw, random_key()) == (401, "key_not_found")  # read from Redis, not refused
        assert (await scrape(gw))["gateway_key_filter_refusals_total"] == 7
    finally:
        release.set()
        await settle(gw)
    await filter_ready(gw)
    assert await proxy(gw, random_key()) == (401, "key_not_found")
    samples = await scrape(gw)
    assert samples["gateway_key_filter_ready"] == 1.0
    assert samples["gateway_key_filter_refusals_total"] == 8
