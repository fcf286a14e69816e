"""Spec 8, "Disable takes effect at once": the channel codec, the key cache, the stale-refill
race, coherence, the live-replica registry, and two in-process replicas sharing one Redis.

Unit tests use fake clocks; everything touching Redis uses the session's real redis-server,
each test under a prefix of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.coherence.channel import MAX_MESSAGE, Ack, Codec, Evict, Rejected
from gateway.coherence.replicas import Registry
from gateway.keytable import record as keys
from gateway.keytable.cache import MISS, KeyCache
from gateway.keytable.lease import Coherence
from gateway.keytable.lookup import AuthUnavailable, KeyLookup
from gateway.keytable.record import KeyRecord
from gateway.keytable.store import KeyStore
from gateway.runtime.replica import Replica
from tests.conftest import AdminTokens, Gateway, RedisProcess, make_config, start_replica
from tests.relays import Relay

SECRET = "coherence-secret-0123456789abcdef"
OTHER_SECRET = "some-other-secret-fedcba9876543210"
H1 = hashlib.sha256(b"one").hexdigest()
H2 = hashlib.sha256(b"two").hexdigest()
WAIT = 5.0  # bound on every wait for something asynchronous


# helpers ---------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sign(payload: bytes, secret: str) -> bytes:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest().encode() + b"." + payload


def evict_payload(*pairs: tuple[str, int], nonce: str = "n1", origin: str = "r_origin") -> bytes:
    return orjson.dumps({"t": "e", "n": nonce, "o": origin, "k": [list(p) for p in pairs]})


def record(key_hash: str, **changes: Any) -> KeyRecord:
    return KeyRecord(id=keys.new_id(), hash=key_hash, name="coherence", created_at=time.time(), **changes)


def new_prefix() -> str:
    return f"co{secrets.token_hex(4)}:"


async def eventually(what: str, predicate: Callable[[], bool | Awaitable[bool]]) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        outcome = predicate()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


def metric(replica: Replica, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample from the replica's /metrics text, or None when absent."""
    text = replica.metrics.render().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return float(sample.value)
    return None


async def proxy(gw: Gateway, key: str) -> tuple[int, str | None]:
    """Status and error code (None when forwarded) of a proxied request with `key`."""
    async with await gw.call("GET", "/api/coherence", key=key) as r:
        data = await r.read()
        if r.headers.get("X-Upstream") == "echo":
            return r.status, None
        return r.status, orjson.loads(data)["error"]["code"]


async def admin(gw: Gateway, method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    async with await gw.admin_call(method, path, **kw) as r:
        return r.status, orjson.loads(await r.read())


def cached(replica: Replica, key_hash: str) -> Any:
    return replica.cache.get(key_hash)


async def put_in_redis(redis: Redis, prefix: str, rec: KeyRecord) -> None:
    await redis.set(f"{prefix}k:{rec.hash}", rec.to_json())


def dead_redis() -> Redis:
    """A client for a closed port, retries off: every command fails at once."""
    return Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))


# 1. the channel codec ----------------------------------------------------------


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
@pytest.mark.parametrize(
    "pairs",
    [[(H1, 1)], [(H1, 3), (H2, 7)], [(H2, 0)], [(H1, 2**40)]],
    ids=["one-key", "two-keys", "version-0", "large-version"],
)
def test_codec_evict_round_trips(secret: str | None, pairs: list[tuple[str, int]]) -> None:
    codec = Codec(secret)
    raw = codec.evict("nonce_1-A", "r_abc123", pairs)
    mac, dot, _ = raw.partition(b".")
    assert dot == b"."
    assert (len(mac) == 64) if secret else (mac == b"")
    assert codec.decode(raw) == Evict("nonce_1-A", "r_abc123", tuple(pairs))


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
def test_codec_ack_round_trips(secret: str | None) -> None:
    codec = Codec(secret)
    assert codec.decode(codec.ack("abcdef0123456789", "r_replica")) == Ack("abcdef0123456789", "r_replica")


@pytest.mark.parametrize(
    "make_raw",
    [
        lambda: Codec(SECRET).evict("n1", "r1", [(H1, 1)]),
        lambda: Codec(OTHER_SECRET).ack("n1", "r1"),
        lambda: b"0" * 64 + b"." + evict_payload((H1, 1)),
        lambda: b"not-even-hex." + evict_payload((H1, 1)),
    ],
    ids=["signed-evict", "signed-ack-other-secret", "zero-mac", "garbage-mac"],
)
def test_codec_without_secret_accepts_a_message_whatever_its_mac(make_raw: Callable[[], bytes]) -> None:
    assert isinstance(Codec(None).decode(make_raw()), Evict | Ack)


def _tamper(raw: bytes) -> bytes:
    mac, _, payload = raw.partition(b".")
    return mac + b"." + payload.replace(H1.encode(), H2.encode())


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"." + evict_payload((H1, 1)), "unsigned"),
        (b"." + orjson.dumps({"t": "a", "n": "n1", "r": "r1"}), "unsigned"),
        (b"0" * 64 + b"." + evict_payload((H1, 1)), "bad_signature"),
        (sign(evict_payload((H1, 1)), OTHER_SECRET), "bad_signature"),
        (Codec(OTHER_SECRET).ack("n1", "r1"), "bad_signature"),
        (_tamper(sign(evict_payload((H1, 1)), SECRET)), "bad_signature"),
        (sign(evict_payload((H1, 1)), SECRET)[:62] + b"." + evict_payload((H1, 1)), "bad_signature"),
        (sign(evict_payload((H1, 1)), SECRET) + b" ", "bad_signature"),
    ],
    ids=[
        "unsigned-evict",
        "unsigned-ack",
        "wrong-mac",
        "mac-with-other-secret",
        "ack-with-other-secret",
        "tampered-payload",
        "truncated-mac",
        "payload-extended-after-signing",
    ],
)
def test_codec_with_secret_rejects_unauthenticated_messages(raw: bytes, reason: str) -> None:
    assert Codec(SECRET).decode(raw) == Rejected(reason)


_OVERSIZED_KEYS = [[hashlib.sha256(str(i).encode()).hexdigest(), i] for i in range(1000)]

# Payloads (the part after the dot) that parse badly or break the message rules.
MALFORMED_PAYLOADS = {
    "empty": b"",
    "not-json": b"{not json",
    "invalid-utf8": b"\xff\xfe\xfd",
    "json-list": b'[["e"]]',
    "json-string": b'"e"',
    "json-number": b"7",
    "json-null": b"null",
    "missing-nonce": orjson.dumps({"t": "e", "o": "r1", "k": [[H1, 1]]}),
    "nonce-int": orjson.dumps({"t": "e", "n": 5, "o": "r1", "k": [[H1, 1]]}),
    "nonce-empty": orjson.dumps({"t": "e", "n": "", "o": "r1", "k": [[H1, 1]]}),
    "nonce-with-space": orjson.dumps({"t": "e", "n": "a b", "o": "r1", "k": [[H1, 1]]}),
    "nonce-too-long": orjson.dumps({"t": "e", "n": "a" * 65, "o": "r1", "k": [[H1, 1]]}),
    "missing-origin": orjson.dumps({"t": "e", "n": "n1", "k": [[H1, 1]]}),
    "origin-bad-chars": orjson.dumps({"t": "e", "n": "n1", "o": "r/1", "k": [[H1, 1]]}),
    "hash-uppercase": evict_payload((H1.upper(), 1)),
    "hash-63-chars": evict_payload((H1[:63], 1)),
    "hash-65-chars": evict_payload((H1 + "a", 1)),
    "hash-not-hex": evict_payload(("g" * 64, 1)),
    "hash-int": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [[7, 1]]}),
    "version-true": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [[H1, True]]}),
    "version-false": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [[H1, False]]}),
    "version-string": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [[H1, "1"]]}),
    "version-float": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [[H1, 1.5]]}),
    "version-null": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [[H1, None]]}),
    "pair-without-version": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [[H1]]}),
    "pair-of-three": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [[H1, 1, 2]]}),
    "pair-as-object": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [{"h": H1, "v": 1}]}),
    "one-bad-pair-among-good": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": [[H1, 1], [H2, "2"]]}),
    "empty-key-list": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": []}),
    "missing-key-list": orjson.dumps({"t": "e", "n": "n1", "o": "r1"}),
    "key-list-a-string": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": H1}),
    "unknown-type": orjson.dumps({"t": "x", "n": "n1", "o": "r1", "k": [[H1, 1]]}),
    "missing-type": orjson.dumps({"n": "n1", "o": "r1", "k": [[H1, 1]]}),
    "ack-missing-replica": orjson.dumps({"t": "a", "n": "n1"}),
    "ack-bad-replica": orjson.dumps({"t": "a", "n": "n1", "r": "r 1"}),
    "oversized": orjson.dumps({"t": "e", "n": "n1", "o": "r1", "k": _OVERSIZED_KEYS}),
}


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
@pytest.mark.parametrize("payload", list(MALFORMED_PAYLOADS.values()), ids=list(MALFORMED_PAYLOADS))
def test_codec_rejects_malformed_payloads_even_when_correctly_signed(secret: str | None, payload: bytes) -> None:
    raw = sign(payload, secret) if secret else b"." + payload
    assert Codec(secret).decode(raw) == Rejected("malformed")


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00\xff\xfe\x80garbage", b"no dot at all", b"{}", "a str, not bytes"],
    ids=["empty", "garbage-bytes", "no-dot", "bare-json", "not-bytes"],
)
def test_codec_rejects_messages_without_the_wire_form(secret: str | None, raw: Any) -> None:
    assert Codec(secret).decode(raw) == Rejected("malformed")


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
def test_codec_accepts_a_message_of_exactly_the_size_limit_and_rejects_one_byte_more(secret: str | None) -> None:
    codec = Codec(secret)
    head = len(codec.evict("n1", "r1", [(H1, 1)])) - len(evict_payload((H1, 1), origin="r1"))
    for extra, expected in ((0, Evict("n1", "r1", ((H1, 1),))), (1, Rejected("malformed"))):
        payload = evict_payload((H1, 1), origin="r1")
        payload += b" " * (MAX_MESSAGE - head - len(payload) + extra)  # JSON allows trailing whitespace
        raw = sign(payload, secret) if secret else b"." + payload
        assert len(raw) == MAX_MESSAGE + extra
        assert codec.decode(raw) == expected


# 2. the key cache ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "ttl", "negative_ttl", "fresh_until"),
    [
        (record(H1), 30.0, 2.0, 30.0),
        (None, 30.0, 2.0, 2.0),
        (record(H1), 0.5, 60.0, 0.5),
        (None, 60.0, 0.25, 0.25),
    ],
    ids=["positive-30s", "negative-2s", "positive-0.5s", "negative-0.25s"],
)
def test_cache_entries_live_for_their_ttl(
    stored: KeyRecord | None, ttl: float, negative_ttl: float, fresh_until: float
) -> None:
    clock = FakeClock()
    cache = KeyCache(ttl, negative_ttl, 100, clock=clock)
    assert cache.get(H1) is MISS
    assert cache.put(H1, stored, cache.generation) is True
    start = clock.now
    clock.now = start + fresh_until * 0.99
    assert cache.get(H1) is stored  # a cached "unknown key" is None, which is not MISS
    clock.now = start + fresh_until
    assert cache.get(H1) is MISS
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("stored", "ttl", "negative_ttl"),
    [(record(H1), 0.0, 2.0), (None, 30.0, 0.0), (record(H1), 0.0, 0.0), (None, 0.0, 0.0)],
    ids=["positive-ttl-0", "negative-ttl-0", "both-0-positive", "both-0-negative"],
)
def test_cache_with_ttl_zero_caches_nothing(stored: KeyRecord | None, ttl: float, negative_ttl: float) -> None:
    cache = KeyCache(ttl, negative_ttl, 100, clock=FakeClock())
    assert cache.put(H1, stored, cache.generation) is False
    assert cache.get(H1) is MISS
    assert len(cache) == 0


def test_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = KeyCache(30, 30, 3, clock=FakeClock())
    hashes = [hashlib.sha256(bytes([i])).hexdigest() for i in range(5)]
    recs = {h: record(h) for h in hashes}
    for h in hashes[:3]:
        assert cache.put(h, recs[h], cache.generation)
    assert cache.get(hashes[0]) is recs[hashes[0]]  # 0 is now the most recently used
    assert cache.put(hashes[3], recs[hashes[3]], cache.generation)
    assert len(cache) == 3
    assert cache.get(hashes[1]) is MISS  # the least recently used went
    assert cache.put(hashes[2], recs[hashes[2]], cache.generation)  # re-put refreshes 2
    assert cache.put(hashes[4], recs[hashes[4]], cache.generation)
    assert len(cache) == 3
    assert cache.get(hashes[0]) is MISS
    assert [cache.get(h) for h in hashes[2:]] == [recs[h] for h in hashes[2:]]


@pytest.mark.parametrize("evicted", [H1, H2], ids=["the-cached-key", "another-key"])
def test_cache_evict_bumps_the_generation_and_drops_the_entry(evicted: str) -> None:
    cache = KeyCache(30, 30, 100, clock=FakeClock())
    rec = record(H1)
    assert cache.put(H1, rec, cache.generation)
    before = cache.generation
    cache.evict(evicted)
    assert cache.generation > before
    assert cache.get(H1) is (MISS if evicted == H1 else rec)


@pytest.mark.parametrize("stored", [record(H1), None], ids=["positive", "negative"])
@pytest.mark.parametrize("invalidate", ["evict-same", "evict-other", "clear"])
def test_cache_put_with_a_generation_from_before_an_eviction_is_refused(
    stored: KeyRecord | None, invalidate: str
) -> None:
    cache = KeyCache(30, 30, 100, clock=FakeClock())
    generation = cache.generation  # a lookup notes this, then reads Redis ...
    if invalidate == "clear":
        cache.clear()
    else:
        cache.evict(H1 if invalidate == "evict-same" else H2)  # ... an invalidation lands meanwhile
    assert cache.put(H1, stored, generation) is False
    assert cache.get(H1) is MISS
    assert len(cache) == 0
    assert cache.put(H1, stored, cache.generation) is True  # a lookup started afterwards may cache


def test_cache_clear_empties_it_and_bumps_the_generation() -> None:
    cache = KeyCache(30, 30, 100, clock=FakeClock())
    assert cache.put(H1, record(H1), cache.generation)
    assert cache.put(H2, None, cache.generation)
    before = cache.generation
    cache.clear()
    assert len(cache) == 0
    assert cache.generation > before
    assert cache.get(H1) is MISS
    assert cache.get(H2) is MISS
    assert cache.peek_stale(H1, 3600) is MISS


@pytest.mark.parametrize(
    ("age", "max_age", "served"),
    [
        (1.0, 5.0, True),  # not expired yet
        (10.0, 5.0, True),  # expired just now
        (14.0, 5.0, True),  # expired 4 s ago, window 5 s
        (15.5, 5.0, False),  # expired 5.5 s ago
        (14.0, 3.0, False),  # expired 4 s ago, window 3 s
        (100.0, 5.0, False),
    ],
)
@pytest.mark.parametrize("stored", [record(H1), None], ids=["positive", "negative"])
def test_cache_peek_stale_serves_entries_only_within_the_window_after_expiry(
    age: float, max_age: float, served: bool, stored: KeyRecord | None
) -> None:
    clock = FakeClock()
    cache = KeyCache(10, 10, 100, clock=clock)  # expires at +10
    assert cache.put(H1, stored, cache.generation)
    clock.advance(age)
    assert cache.peek_stale(H1, max_age) is (stored if served else MISS)
    assert cache.peek_stale(H1, max_age) is (stored if served else MISS)  # peeking does not consume


def test_cache_peek_stale_never_returns_an_evicted_entry() -> None:
    clock = FakeClock()
    cache = KeyCache(10, 10, 100, clock=clock)
    assert cache.put(H1, record(H1), cache.generation)
    cache.evict(H1)
    assert cache.peek_stale(H1, 3600) is MISS
    clock.advance(11)
    assert cache.peek_stale(H1, 3600) is MISS


# 3. the stale-refill race against the real Redis -------------------------------------


class GatedStore(KeyStore):
    """A KeyStore whose first get_by_hash reads Redis, then waits to be released."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        super().__init__(redis, prefix)
        self.reads = 0
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        answer = await super().get_by_hash(key_hash)
        self.reads += 1
        if self.reads == 1:
            self.read_done.set()
            await self.release.wait()
        return answer


def _coherent() -> Coherence:
    coherence = Coherence(lease_seconds=3600)  # the lease (tested in tests/test_lease.py) never ends here
    coherence.restored()
    return coherence


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("active", "disabled"),  # a disable lands during the read
        ("unknown", "active"),  # an import lands during the read (negative answer)
        ("active", "revoked"),
    ],
)
async def test_a_lookup_in_flight_during_an_eviction_answers_once_but_never_caches_its_stale_answer(
    redis: Redis, before: str, after: str
) -> None:
    prefix = new_prefix()
    store = GatedStore(redis, prefix)
    cache = KeyCache(30, 30, 100)
    lookup = KeyLookup(store, cache, _coherent(), serve_stale_seconds=0)
    key_hash = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
    active = record(key_hash)
    if before == "active":
        await put_in_redis(redis, prefix, active)

    task = asyncio.get_running_loop().create_task(lookup.find(key_hash))
    try:
        await asyncio.wait_for(store.read_done.wait(), WAIT)  # it has read the old state
        changed = {
            "disabled": active.bump(enabled=False),
            "revoked": active.bump(enabled=False, revoked=True),
            "active": active,
        }[after]
        await put_in_redis(redis, prefix, changed)
        cache.evict(key_hash)  # what the subscriber does on the invalidation
    finally:
        store.release.set()
    in_flight = await asyncio.wait_for(task, WAIT)

    assert in_flight == (active if before == "active" else None)  # it asked before the change
    assert cache.get(key_hash) is MISS, "the stale answer was written into the cache after the eviction"
    assert await lookup.find(key_hash) == changed
    assert store.reads == 2
    assert cache.get(key_hash) == changed


@pytest.mark.parametrize("before", ["active", "unknown"])
async def test_a_lookup_with_no_eviction_in_flight_caches_its_answer(redis: Redis, before: str) -> None:
    """The control for the race above: the same gated read, no eviction, and the answer is cached."""
    prefix = new_prefix()
    store = GatedStore(redis, prefix)
    cache = KeyCache(30, 30, 100)
    lookup = KeyLookup(store, cache, _coherent(), serve_stale_seconds=0)
    rec = record(hashlib.sha256(secrets.token_bytes(16)).hexdigest())
    if before == "active":
        await put_in_redis(redis, prefix, rec)
    task = asyncio.get_running_loop().create_task(lookup.find(rec.hash))
    await asyncio.wait_for(store.read_done.wait(), WAIT)
    store.release.set()
    expected = rec if before == "active" else None
    assert await asyncio.wait_for(task, WAIT) == expected
    assert cache.get(rec.hash) == expected
    assert await lookup.find(rec.hash) == expected
    assert store.reads == 1  # the second answer came from the cache


# 4. coherence in KeyLookup -------------------------------------------------------------


@pytest.mark.parametrize("incoherent", ["lost", "fresh"])
async def test_an_incoherent_replica_reads_every_key_from_redis_not_its_cache(redis: Redis, incoherent: str) -> None:
    prefix = new_prefix()
    cache = KeyCache(30, 30, 100)
    coherence = _coherent()
    lookup = KeyLookup(KeyStore(redis, prefix), cache, coherence, serve_stale_seconds=0)
    rec = record(hashlib.sha256(secrets.token_bytes(16)).hexdigest())
    await put_in_redis(redis, prefix, rec)
    assert await lookup.find(rec.hash) == rec  # cached now

    disabled = rec.bump(enabled=False)
    await put_in_redis(redis, prefix, disabled)  # behind the cache's back: no eviction
    assert await lookup.find(rec.hash) == rec, "a coherent replica trusts its cache"

    if incoherent == "lost":
        coherence.lost()
    else:
        lookup.coherence = Coherence()  # a replica that has never been subscribed
    assert lookup.coherence.coherent is False
    assert await lookup.find(rec.hash) == disabled
    await redis.delete(f"{prefix}k:{rec.hash}")
    assert await lookup.find(rec.hash) is None  # and again: no answer of the cache is used


@pytest.mark.parametrize(
    ("serve_stale", "ttl", "break_age", "served"),
    [
        (0.0, 30.0, 0.0, False),  # the operator did not allow stale entries
        (0.0, 30.0, 5.0, False),
        (10.0, 30.0, 5.0, True),  # break younger than the window
        (10.0, 30.0, 9.5, True),
        (10.0, 30.0, 10.5, False),  # break older than the window
        (10.0, 30.0, 300.0, False),
        (10.0, 2.0, 5.0, True),  # the entry's TTL ran out during the break, still inside the window
    ],
)
@pytest.mark.parametrize("answer", ["record", "unknown"])
async def test_with_redis_unreachable_a_cached_entry_is_served_only_within_serve_stale_seconds(
    redis: Redis, serve_stale: float, ttl: float, break_age: float, served: bool, answer: str
) -> None:
    prefix = new_prefix()
    clock = FakeClock()
    cache = KeyCache(ttl, ttl, 100, clock=clock)
    coherence = Coherence(clock=clock)
    coherence.restored()
    lookup = KeyLookup(KeyStore(redis, prefix), cache, coherence, serve_stale_seconds=serve_stale)
    rec = record(hashlib.sha256(secrets.token_bytes(16)).hexdigest())
    if answer == "record":
        await put_in_redis(redis, prefix, rec)
    expected = rec if answer == "record" else None
    assert await lookup.find(rec.hash) == expected  # cached before the break

    unreachable = dead_redis()
    try:
        lookup.store = KeyStore(unreachable, prefix)
        clock.advance(0.5)
        coherence.lost()  # the subscriber noticed the break
        clock.advance(break_age)
        if served:
            assert await lookup.find(rec.hash) == expected
            clock.advance(serve_stale + 0.01 - break_age)  # the break is now older than the window
        with pytest.raises(AuthUnavailable):
            await lookup.find(rec.hash)
    finally:
        await unreachable.aclose()


@pytest.mark.parametrize("serve_stale", [0.0, 10.0])
async def test_with_redis_unreachable_an_uncached_key_is_auth_unavailable(redis: Redis, serve_stale: float) -> None:
    clock = FakeClock()
    unreachable = dead_redis()
    try:
        lookup = KeyLookup(
            KeyStore(unreachable, new_prefix()), KeyCache(30, 30, 100, clock=clock), Coherence(clock), serve_stale
        )
        with pytest.raises(AuthUnavailable):
            await lookup.find(H1)
    finally:
        await unreachable.aclose()


# 6. the live-replica registry -------------------------------------------------------------


async def test_registry_join_heartbeat_leave_and_live(redis: Redis) -> None:
    prefix = new_prefix()
    a = Registry(redis, prefix, "r_a", ttl_ms=10_000)
    b = Registry(redis, prefix, "r_b", ttl_ms=10_000)
    elsewhere = Registry(redis, new_prefix(), "r_c", ttl_ms=10_000)
    assert (await a.live())[1] == {}

    epoch_a = await a.now_us()
    assert abs(epoch_a - time.time() * 1_000_000) < 5_000_000  # Redis time in microseconds
    await a.join(epoch_a)
    epoch_b = await b.now_us()
    assert epoch_b > epoch_a
    await b.join(epoch_b)
    await elsewhere.join(await elsewhere.now_us())  # another prefix: another gateway
    now_ms, live = await a.live()
    assert live == {"r_a": epoch_a, "r_b": epoch_b}
    assert epoch_b // 1000 <= now_ms
    assert abs(now_ms - time.time() * 1000) < 5000  # Redis time in milliseconds

    await a.heartbeat()
    assert (await b.live())[1] == {"r_a": epoch_a, "r_b": epoch_b}  # a heartbeat keeps the epoch
    rejoined = await a.now_us()
    await a.join(rejoined)  # a new join is a new epoch (the cache was cleared again)
    assert (await b.live())[1] == {"r_a": rejoined, "r_b": epoch_b}

    await a.leave()
    assert (await b.live())[1] == {"r_b": epoch_b}
    assert await redis.hexists(prefix + "replica-epochs", "r_a") == 0
    await b.leave()
    assert (await a.live())[1] == {}
    assert list((await elsewhere.live())[1]) == ["r_c"]
    await elsewhere.leave()


async def test_registry_drops_replicas_whose_heartbeat_expired(redis: Redis) -> None:
    prefix = new_prefix()
    short = Registry(redis, prefix, "r_short", ttl_ms=1000)
    long = Registry(redis, prefix, "r_long", ttl_ms=60_000)
    await short.join(await short.now_us())
    epoch_long = await long.now_us()
    await long.join(epoch_long)
    await asyncio.sleep(0.6)
    await short.heartbeat()  # pushes its expiry 1,000 ms on
    await asyncio.sleep(0.6)  # 1,200 ms after the join: alive only thanks to the heartbeat
    assert set((await long.live())[1]) == {"r_short", "r_long"}
    await asyncio.sleep(1.0)
    assert (await long.live())[1] == {"r_long": epoch_long}
    assert await redis.hexists(prefix + "replica-epochs", "r_short") == 0  # the epoch went with it
    await long.leave()


# 5. replicas in process ---------------------------------------------------------------------


async def two_replicas(gateway_factory: Callable[..., Any], **overrides: Any) -> tuple[Gateway, Gateway]:
    prefix = new_prefix()
    gw_a: Gateway = await gateway_factory(**{"redis.prefix": prefix, **overrides})
    gw_b: Gateway = await gateway_factory(**{"redis.prefix": prefix, **overrides})
    _, live = await gw_a.replica.registry.live()
    assert set(live) == {gw_a.replica.replica_id, gw_b.replica.replica_id}
    return gw_a, gw_b


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
async def test_a_disable_on_one_replica_is_evicted_from_the_other_before_the_answer(
    gateway_factory: Callable[..., Any], secret: str | None
) -> None:
    overrides = {"redis.channel_secret": secret} if secret else {}
    gw_a, gw_b = await two_replicas(gateway_factory, **overrides)
    created = await gw_a.create_key(name="shared")
    key, key_hash = created["key"], keys.digest(created["key"])
    assert await proxy(gw_a, key) == (200, None)
    assert await proxy(gw_b, key) == (200, None)
    assert isinstance(cached(gw_b.replica, key_hash), KeyRecord)
    assert isinstance(cached(gw_a.replica, key_hash), KeyRecord)
    applied = metric(gw_b.replica, "gateway_invalidations_total", {"outcome": "applied"}) or 0

    status, body = await admin(gw_a, "POST", f"/v1/keys/{created['id']}/disable", token="developer")
    # nothing awaited since the answer: the eviction happened before it
    assert cached(gw_b.replica, key_hash) is MISS
    assert cached(gw_a.replica, key_hash) is MISS
    assert status == 200
    assert body["enabled"] is False
    assert body["propagation"]["replicas"] == 2
    assert body["propagation"]["confirmed"] == 2
    assert await proxy(gw_b, key) == (403, "key_disabled")
    assert await proxy(gw_a, key) == (403, "key_disabled")
    value = metric(gw_b.replica, "gateway_invalidations_total", {"outcome": "applied"})
    assert value == applied + 1


@pytest.mark.parametrize("key_filter", [False, True], ids=["negative-cache", "key-filter"])
async def test_an_import_on_one_replica_evicts_the_other_replicas_cached_unknown_key(
    gateway_factory: Callable[..., Any], key_filter: bool
) -> None:
    """Without the key filter the unknown key is a cached negative answer that the import evicts;
    with it, the import's announcement adds the hash to the filter before B acks."""
    gw_a, gw_b = await two_replicas(gateway_factory, **{"cache.key_filter": key_filter})
    plaintext = "imp_" + secrets.token_urlsafe(24)
    key_hash = keys.digest(plaintext)
    refused = gw_b.replica.lookup.known.refused
    assert await proxy(gw_b, plaintext) == (401, "key_not_found")
    if key_filter:
        assert gw_b.replica.lookup.known.refused == refused + 1  # refused without Redis, not cached
        assert cached(gw_b.replica, key_hash) is MISS
    else:
        assert cached(gw_b.replica, key_hash) is None  # a cached negative answer

    status, _ = await admin(gw_a, "POST", "/v1/keys", token="developer", json={"key": plaintext})
    assert status == 201
    assert cached(gw_b.replica, key_hash) is MISS
    assert await proxy(gw_b, plaintext) == (200, None)


async def test_a_proxy_lookup_in_flight_during_a_disable_does_not_cache_the_enabled_record(
    gateway_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stale-refill race end to end: replica B's read is in flight while A disables the key;
    B's own subscriber evicts, and B's late answer must not land in its cache."""
    gw_a, gw_b = await two_replicas(gateway_factory)
    created = await gw_a.create_key()
    key, key_hash = created["key"], keys.digest(created["key"])

    read_done, release = asyncio.Event(), asyncio.Event()
    real_read = gw_b.replica.store.get_by_hash

    async def gated(h: str) -> KeyRecord | None:
        answer = await real_read(h)
        if not read_done.is_set():
            read_done.set()
            await release.wait()
        return answer

    monkeypatch.setattr(gw_b.replica.store, "get_by_hash", gated)
    request = asyncio.get_running_loop().create_task(proxy(gw_b, key))
    try:
        await asyncio.wait_for(read_done.wait(), WAIT)
        status, body = await admin(gw_a, "POST", f"/v1/keys/{created['id']}/disable", token="developer")
        assert status == 200
        assert body["propagation"] == {**body["propagation"], "replicas": 2, "confirmed": 2}
    finally:
        release.set()
    assert await asyncio.wait_for(request, WAIT) == (200, None)  # it asked before the disable
    assert cached(gw_b.replica, key_hash) is MISS
    assert await proxy(gw_b, key) == (403, "key_disabled")


async def test_a_stopped_replica_leaves_the_live_set_and_is_no_longer_waited_for(
    gateway_factory: Callable[..., Any], redis_server: RedisProcess, upstream: Any, admin_tokens: AdminTokens
) -> None:
    prefix = new_prefix()
    gw_a: Gateway = await gateway_factory(**{"redis.prefix": prefix, "admin.propagation_timeout_seconds": 2.0})
    cfg = make_config(
        redis_url=redis_server.url,
        upstream_url=str(upstream.make_url("")).rstrip("/"),
        tokens=admin_tokens.entries,
        overrides={"redis.prefix": prefix},
    )
    async with contextlib.AsyncExitStack() as stack:
        replica_b = await start_replica(cfg, stack)
        _, live = await gw_a.replica.registry.live()
        assert set(live) == {gw_a.replica.replica_id, replica_b.replica_id}
        first = await gw_a.create_key()
        status, body = await admin(gw_a, "POST", f"/v1/keys/{first['id']}/disable", token="developer")
        assert (status, body["propagation"]["replicas"], body["propagation"]["confirmed"]) == (200, 2, 2)
    # B's subscriber was cancelled and B left the live set
    _, live = await gw_a.replica.registry.live()
    assert set(live) == {gw_a.replica.replica_id}

    second = await gw_a.create_key()
    started = time.monotonic()
    status, body = await admin(gw_a, "POST", f"/v1/keys/{second['id']}/disable", token="developer")
    assert status == 200
    assert body["propagation"]["replicas"] == 1
    assert body["propagation"]["confirmed"] == 1
    assert time.monotonic() - started < 1.0, "the answer waited for a replica that had left"
    unconfirmed = metric(gw_a.replica, "gateway_propagation_unconfirmed_total")
    assert unconfirmed == 0


async def test_a_live_replica_that_never_acks_is_reported_unconfirmed_after_the_bounded_wait(
    gateway_factory: Callable[..., Any], redis: Redis
) -> None:
    prefix = new_prefix()
    gw: Gateway = await gateway_factory(**{"redis.prefix": prefix, "admin.propagation_timeout_seconds": 0.3})
    silent = Registry(redis, prefix, "r_silent", ttl_ms=60_000)  # joined, but no subscriber
    await silent.join(await silent.now_us())
    try:
        created = await gw.create_key()  # waits for the silent replica too
        unconfirmed = metric(gw.replica, "gateway_propagation_unconfirmed_total")
        fenced = metric(gw.replica, "gateway_propagation_fenced_total")
        started = time.monotonic()
        status, body = await admin(gw, "POST", f"/v1/keys/{created['id']}/disable", token="developer")
        waited = time.monotonic() - started
        assert status == 200
        assert body["propagation"]["replicas"] == 2
        assert body["propagation"]["confirmed"] == 1
        assert 0.3 <= waited < 2.0
        # Not before its lease (redis.lease_seconds, 1 s by default) has certainly lapsed.
        assert body["propagation"]["fenced"] == 1
        assert waited >= gw.replica.config.redis.lease_seconds
        assert unconfirmed is not None
        now_unconfirmed = metric(gw.replica, "gateway_propagation_unconfirmed_total")
        assert now_unconfirmed == unconfirmed + 1
        assert fenced is not None
        assert metric(gw.replica, "gateway_propagation_fenced_total") == fenced + 1
    finally:
        await silent.leave()


def hold_resubscription(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """The subscriber's next session waits for `release`; `entered` is set once the replica has
    noticed the break, left the live set and is about to subscribe again."""
    entered, release = asyncio.Event(), asyncio.Event()
    real_session = replica.subscriber._session

    async def held() -> None:
        entered.set()
        await release.wait()
        await real_session()

    monkeypatch.setattr(replica.subscriber, "_session", held)
    return entered, release


async def test_after_client_kill_pubsub_replicas_turn_incoherent_then_resubscribe_with_an_empty_cache(
    gateway_factory: Callable[..., Any], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw_a, gw_b = await two_replicas(gateway_factory)
    gateways = (gw_a, gw_b)
    prefix = gw_a.replica.config.redis.prefix
    created = await gw_a.create_key()
    key, key_hash = created["key"], keys.digest(created["key"])
    for gw in gateways:
        assert await proxy(gw, key) == (200, None)
        status, _ = await admin(gw, "GET", "/readyz", token=None)
        assert status == 200
    active = cached(gw_a.replica, key_hash)
    assert isinstance(active, KeyRecord)
    disabled = active.bump(enabled=False)
    await put_in_redis(redis, prefix, disabled)  # behind every cache's back
    for gw in gateways:
        assert await proxy(gw, key) == (200, None), "a coherent replica answers from its cache"
    epochs = (await gw_a.replica.registry.live())[1]
    sessions = {gw.replica.replica_id: gw.replica.subscriber.sessions for gw in gateways}

    holds = [hold_resubscription(gw.replica, monkeypatch) for gw in gateways]
    try:
        assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 2
        for entered, _ in holds:
            await asyncio.wait_for(entered.wait(), WAIT)

        assert (await gw_a.replica.registry.live())[1] == {}, "an incoherent replica stays in the live set"
        for gw in gateways:
            assert gw.replica.coherence.coherent is False
            status, body = await admin(gw, "GET", "/readyz", token=None)
            assert (status, body["error"]["code"]) == (503, "not_ready")
            value = metric(gw.replica, "gateway_cache_coherent")
            assert value == 0
            # the cache is not trusted: the disable made behind its back is seen at once
            assert await proxy(gw, key) == (403, "key_disabled")
            # whatever the cache holds when the subscription comes back must go
            assert gw.replica.cache.put(key_hash, active, gw.replica.cache.generation)
            assert len(gw.replica.cache) >= 1
    finally:
        for _, release in holds:
            release.set()
        await settle(gw.replica for gw in gateways)

    for gw in gateways:
        replica = gw.replica
        await eventually("the replica is coherent again", lambda r=replica: r.coherence.coherent)
        await eventually(
            "the replica rejoined the live set",
            lambda r=replica: _in_live_set(r),
        )
        assert len(replica.cache) == 0
        assert cached(replica, key_hash) is MISS
        assert replica.subscriber.sessions == sessions[replica.replica_id] + 1
        assert (await replica.registry.live())[1][replica.replica_id] > epochs[replica.replica_id]
        value = metric(replica, "gateway_cache_coherent")
        assert value == 1
        status, _ = await admin(gw, "GET", "/readyz", token=None)
        assert status == 200
        assert await proxy(gw, key) == (403, "key_disabled")


async def settle(replicas: Iterable[Replica]) -> None:
    """Best effort, even after a failed assertion: let resubscriptions finish before teardown.

    Teardown cancels each subscriber once; on Python 3.11 a cancellation that lands while redis-py
    sends a command (asyncio.wait_for around the write) can be swallowed, and the teardown then
    waits forever. In steady state the subscriber sends rarely, so the window is small."""
    for replica in replicas:
        with contextlib.suppress(Exception):
            await eventually("the replica is subscribed again", lambda r=replica: _steady(r))


async def _steady(replica: Replica) -> bool:
    return replica.coherence.coherent and await _in_live_set(replica)


async def _in_live_set(replica: Replica) -> bool:
    return replica.replica_id in (await replica.registry.live())[1]


def _unsigned_evict(key_hash: str) -> bytes:
    return b"." + evict_payload((key_hash, 99))


def _other_secret_evict(key_hash: str) -> bytes:
    return Codec(OTHER_SECRET).evict("n2", "r_intruder", [(key_hash, 99)])


def _tampered_evict(key_hash: str) -> bytes:
    mac, _, _ = Codec(SECRET).evict("n3", "r_intruder", [(H1, 99)]).partition(b".")
    return mac + b"." + evict_payload((key_hash, 99), nonce="n3", origin="r_intruder")


@pytest.mark.parametrize(
    ("secret", "make_message", "outcome"),
    [
        (None, lambda h: b"\x00\xff\xfe garbage \x80", "ignored_malformed"),
        (None, lambda h: b"no-dot-at-all", "ignored_malformed"),
        (None, lambda h: b'.{"t":"e","n":"n1","o":"r1","k":[]}', "ignored_malformed"),
        (None, lambda h: b"." + evict_payload((h.upper(), 2)), "ignored_malformed"),
        (SECRET, lambda h: b"\x00\xff\xfe garbage \x80", "ignored_malformed"),
        (SECRET, _unsigned_evict, "ignored_unsigned"),
        (SECRET, _other_secret_evict, "ignored_bad_signature"),
        (SECRET, _tampered_evict, "ignored_bad_signature"),
    ],
    ids=[
        "garbage",
        "no-dot",
        "empty-key-list",
        "uppercase-hash",
        "garbage-with-secret",
        "unsigned-evict",
        "evict-signed-with-other-secret",
        "tampered-evict",
    ],
)
async def test_a_bad_message_on_the_channel_is_counted_and_changes_nothing(
    gateway_factory: Callable[..., Any],
    redis: Redis,
    secret: str | None,
    make_message: Callable[[str], bytes],
    outcome: str,
) -> None:
    gw: Gateway = await gateway_factory(**({"redis.channel_secret": secret} if secret else {}))
    replica = gw.replica
    created = await gw.create_key()
    key, key_hash = created["key"], keys.digest(created["key"])
    assert await proxy(gw, key) == (200, None)
    entry = cached(replica, key_hash)
    assert isinstance(entry, KeyRecord)
    sessions, generation = replica.subscriber.sessions, replica.cache.generation
    applied = metric(replica, "gateway_invalidations_total", {"outcome": "applied"})

    receivers = await redis.publish(replica.config.redis.prefix + "events", make_message(key_hash))
    assert receivers == 1
    await eventually(
        f"{outcome} is counted",
        lambda: metric(replica, "gateway_invalidations_total", {"outcome": outcome}) == 1,
    )
    assert replica.coherence.coherent is True
    assert replica.subscriber.sessions == sessions
    assert replica.cache.generation == generation
    assert cached(replica, key_hash) is entry
    value = metric(replica, "gateway_invalidations_total", {"outcome": "applied"})
    assert value == applied
    assert await proxy(gw, key) == (200, None)


async def test_a_correctly_signed_evict_on_the_channel_is_applied(
    gateway_factory: Callable[..., Any], redis: Redis
) -> None:
    """The control for the test above: the same key, a message signed with the right secret."""
    gw: Gateway = await gateway_factory(**{"redis.channel_secret": SECRET})
    replica = gw.replica
    created = await gw.create_key()
    key_hash = keys.digest(created["key"])
    assert await proxy(gw, created["key"]) == (200, None)
    applied = metric(replica, "gateway_invalidations_total", {"outcome": "applied"}) or 0
    await redis.publish(replica.config.redis.prefix + "events", Codec(SECRET).evict("n9", "r_x", [(key_hash, 9)]))
    await eventually(
        "the evict is applied",
        lambda: metric(replica, "gateway_invalidations_total", {"outcome": "applied"}) == applied + 1,
    )
    assert cached(replica, key_hash) is MISS


async def test_a_replica_that_resubscribed_just_before_the_write_is_not_counted_confirmed_before_it_evicts(
    gateway_factory: Callable[..., Any], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disable is under way (announced, not yet written) when replica B's subscription comes
    back: B clears its cache, a lookup caches the still-active record, B rejoins with a new epoch.
    That record predates the write, so only B's own eviction may count it as confirmed; here B is
    slow to handle the evict message, so the answer must report it unconfirmed or wait for it."""
    gw_a, gw_b = await two_replicas(gateway_factory, **{"admin.propagation_timeout_seconds": 0.3})
    created = await gw_a.create_key()
    key, key_hash = created["key"], keys.digest(created["key"])

    in_update, write = asyncio.Event(), asyncio.Event()
    real_update = gw_a.replica.store.update

    async def update_after_go(*args: Any, **kw: Any) -> Any:
        in_update.set()
        await write.wait()
        return await real_update(*args, **kw)

    b_handles = asyncio.Event()
    real_handle = gw_b.replica.subscriber._handle

    async def slow_handle(message: dict[str, Any]) -> None:
        await b_handles.wait()
        await real_handle(message)

    monkeypatch.setattr(gw_a.replica.store, "update", update_after_go)
    disable = asyncio.get_running_loop().create_task(
        admin(gw_a, "POST", f"/v1/keys/{created['id']}/disable", token="developer")
    )
    try:
        await asyncio.wait_for(in_update.wait(), WAIT)  # the disable is under way, not written yet
        await asyncio.sleep(0.005)
        old_epochs = (await gw_b.replica.registry.live())[1]
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        for gw in (gw_a, gw_b):
            await eventually(
                "both replicas resubscribed with a new epoch",
                lambda r=gw.replica: _epoch_after(r, old_epochs[r.replica_id]),
            )
        assert await proxy(gw_b, key) == (200, None)  # the write has not happened: still active
        assert isinstance(cached(gw_b.replica, key_hash), KeyRecord)
        monkeypatch.setattr(gw_b.replica.subscriber, "_handle", slow_handle)
        write.set()
        status, body = await asyncio.wait_for(disable, WAIT)
        assert status == 200
        b_entry = cached(gw_b.replica, key_hash)
        b_answer = await proxy(gw_b, key)
    finally:
        write.set()
        b_handles.set()
        await settle([gw_a.replica, gw_b.replica])
    assert body["propagation"]["replicas"] == 2
    assert b_entry is MISS or body["propagation"]["confirmed"] < 2, (
        f"the answer claims {body['propagation']} although B still caches the enabled record "
        f"and answers {b_answer} for the disabled key"
    )


async def _epoch_after(replica: Replica, old: int) -> bool:
    live = (await replica.registry.live())[1]
    return live.get(replica.replica_id, 0) > old


class StallableLink(Relay):
    """A TCP relay to the redis-server (tests/relays.py) that can stall: bytes stop flowing both
    ways, nothing is closed (a network black hole, not a disconnect)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: dict[str, object]) -> None:
        await self._pipe(r, w)

    async def down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: dict[str, object]) -> None:
        await self._pipe(r, w)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            await self.flowing.wait()
            sink.write(data)
            await sink.drain()

    async def close(self) -> None:
        self.flowing.set()
        await super().close()


@pytest.fixture
async def stallable_link(redis_server: RedisProcess) -> AsyncIterator[StallableLink]:
    link = StallableLink(redis_server.port)
    await link.start()
    yield link
    await link.close()


async def test_a_replica_whose_redis_link_stalls_stops_trusting_its_cache_before_it_drops_out_of_the_live_set(
    stallable_link: StallableLink, gateway_factory: Callable[..., Any]
) -> None:
    """Silence past the health-check interval must end the trust in the cache at once. Replica B
    reaches Redis through a link that stalls; A disables a key B has cached. A's answer may come
    once B's heartbeat has expired (B is no longer live, so it is not waited for), so by then B
    must have stopped answering from its cache, or the answer's "confirmed" is a lie."""
    overrides = {
        "redis.prefix": new_prefix(),
        "redis.health_check_seconds": 0.2,  # registry TTL 0.6 s
        "admin.propagation_timeout_seconds": 3.0,
    }
    gw_a: Gateway = await gateway_factory(**overrides)
    gw_b: Gateway = await gateway_factory(redis_url=stallable_link.url, **overrides)
    created = await gw_a.create_key()
    key, key_hash = created["key"], keys.digest(created["key"])
    assert await proxy(gw_b, key) == (200, None)

    started = time.monotonic()
    stallable_link.flowing.clear()
    try:
        status, body = await admin(gw_a, "POST", f"/v1/keys/{created['id']}/disable", token="developer")
        answered_after = time.monotonic() - started
        b_trusts_cache = gw_b.replica.coherence.coherent
        b_entry = cached(gw_b.replica, key_hash)
        # a coherent B answers from its cache without touching Redis: see what it does
        b_answer = await proxy(gw_b, key) if b_trusts_cache else None
    finally:
        stallable_link.flowing.set()
        await settle([gw_a.replica, gw_b.replica])
    assert status == 200
    live_at_answer = body["propagation"]["replicas"]
    assert not (b_trusts_cache and isinstance(b_entry, KeyRecord)), (
        f"{answered_after:.2f} s into a stall (interval 0.2 s) the disable answered {body['propagation']} "
        f"(B counted live: {live_at_answer == 2}), yet B still trusts its cache, holds the enabled record "
        f"and answers {b_answer} for the disabled key"
    )


async def test_a_resubscribing_replica_does_not_answer_from_its_cache_before_it_is_in_the_live_set(
    gateway_factory: Callable[..., Any], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica back from a break must not trust its cache while disables do not wait for it.
    Here B's rejoin round trip is slow (held): A's disable does not count B, so B must not be
    answering from a cache that the disable's message has not reached yet."""
    gw_a, gw_b = await two_replicas(gateway_factory)
    created = await gw_a.create_key()
    key, key_hash = created["key"], keys.digest(created["key"])

    joining, go = asyncio.Event(), asyncio.Event()
    real_join = gw_b.replica.registry.join

    async def slow_join(epoch_us: int) -> None:
        joining.set()
        await go.wait()
        await real_join(epoch_us)

    monkeypatch.setattr(gw_b.replica.registry, "join", slow_join)
    old_epoch = (await gw_a.replica.registry.live())[1][gw_a.replica.replica_id]
    try:
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await asyncio.wait_for(joining.wait(), WAIT)
        await eventually("A resubscribed", lambda: _epoch_after(gw_a.replica, old_epoch))
        assert await proxy(gw_b, key) == (200, None)  # before the disable: forwarded, rightly

        status, body = await admin(gw_a, "POST", f"/v1/keys/{created['id']}/disable", token="developer")
        assert status == 200
        assert set((await gw_a.replica.registry.live())[1]) == {gw_a.replica.replica_id}
        b_trusts_cache, b_entry = gw_b.replica.coherence.coherent, cached(gw_b.replica, key_hash)
        b_answer = await proxy(gw_b, key)
    finally:
        go.set()
        await settle([gw_a.replica, gw_b.replica])
    assert b_answer == (403, "key_disabled"), (
        f"the disable answered {body['propagation']} without B (not yet rejoined), yet B "
        f"(trusting its cache: {b_trusts_cache}, cached enabled record: {isinstance(b_entry, KeyRecord)}) "
        f"answers {b_answer} for the disabled key"
    )
