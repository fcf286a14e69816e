"""The key table and audit log in Redis: the only module that knows the key layout.

Layout, every name under `redis.prefix` (P):
  P k:<sha256>       record JSON (the request path's one GET)
  P id:<id>          sha256 of the key with that id
  P ids              sorted set of ids by creation time (listing)
  P owner:<owner>    sorted set of that owner's ids by creation time
  P audit            stream of every change; P audit:<id> the same, per key
  P events           pub/sub channel announcing each change (see channel.py)
  P acks             pub/sub channel of replicas' eviction acks
  P replicas         live replicas (see replicas.py)

Every change is one MULTI/EXEC under WATCH: the record, its audit entries and
its announcement are written together or not at all.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import WatchError

from .keys import KeyRecord, rfc3339


@dataclass(frozen=True, slots=True)
class AuditEntry:
    actor: str
    action: str
    key_id: str
    remote: str | None = None
    reason: str | None = None
    request_id: str | None = None
    detail: dict[str, Any] | None = None

    def fields(self, at: float) -> dict[str, str]:
        out = {"ts": f"{at:.3f}", "actor": self.actor, "action": self.action, "key_id": self.key_id}
        for name in ("remote", "reason", "request_id"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.detail:
            out["detail"] = orjson.dumps(self.detail).decode()
        return out


class Refused(Exception):
    """A change that the record's state forbids (e.g. enabling a revoked key)."""

    def __init__(self, code: str, detail: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


class Announcer(Protocol):
    """A change's announcement (propagation.Announcement): its message, and when it was written."""

    def message(self, keys: list[tuple[str, int]]) -> bytes:
        """The channel message announcing the changed keys, as (sha256, version) pairs."""

    def written(self, at_us: int) -> None:
        """Redis server time (microseconds) read in the change's own transaction."""


def _announced(announcer: Announcer, replies: list[Any]) -> None:
    """Tell the announcer the Redis time its transaction read (queued last by _queue_announce)."""
    seconds, micros = replies[-1]
    announcer.written(int(seconds) * 1_000_000 + int(micros))


class KeyStore:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.channel = prefix + "events"

    def _k(self, key_hash: str) -> str:
        return f"{self.prefix}k:{key_hash}"

    def _id(self, key_id: str) -> str:
        return f"{self.prefix}id:{key_id}"

    def _owner(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}"

    # reads ----------------------------------------------------------------

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        raw = await self.redis.get(self._k(key_hash))
        return None if raw is None else KeyRecord.from_json(raw)

    async def hashes(self) -> AsyncIterator[str]:
        """Every key hash in the table (SCAN, so Redis is never blocked; a key present for the
        whole scan is always returned, some may come twice)."""
        pattern = _glob_escape(self._k("")) + "*"
        start = len(self._k(""))
        async for name in self.redis.scan_iter(match=pattern, count=1000):
            key_hash = _text(name)[start:]
            if _SHA256_HEX.fullmatch(key_hash):  # not ours (another deployment's prefix nested in ours): skipped
                yield key_hash

    async def get_by_id(self, key_id: str) -> KeyRecord | None:
        key_hash = await self.redis.get(self._id(key_id))
        if key_hash is None:
            return None
        return await self.get_by_hash(_text(key_hash))

    async def page(
        self, *, owner: str | None, enabled: bool | None, cursor: int, limit: int
    ) -> tuple[list[KeyRecord], int | None]:
        """One page in creation order; the next cursor or None at the end."""
        index = self._owner(owner) if owner is not None else self.prefix + "ids"
        out: list[KeyRecord] = []
        position = cursor
        while len(out) < limit:
            batch = max(limit, 50)
            ids = await self.redis.zrange(index, position, position + batch - 1)
            if not ids:
                return out, None
            hashes = await self.redis.mget([self._id(_text(i)) for i in cast(list[bytes], ids)])
            raws = await self.redis.mget([self._k(_text(h)) for h in hashes if h is not None])
            records = [KeyRecord.from_json(r) for r in raws if r is not None]
            for n, record in enumerate(records, start=1):
                if enabled is None or record.enabled == enabled:
                    out.append(record)
                if len(out) == limit:
                    position += n
                    break
            else:
                position += len(ids)
        more = await self.redis.zrange(index, position, position)
        return out, position if more else None

    async def audit(
        self, *, key_id: str | None, cursor: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; the cursor is the last stream id returned."""
        stream = self.prefix + ("audit:" + key_id if key_id else "audit")
        high = "(" + cursor if cursor else "+"
        rows = cast(
            list[tuple[bytes, dict[bytes, bytes]]], await self.redis.xrevrange(stream, max=high, min="-", count=limit)
        )
        entries = []
        for entry_id, fields in rows:
            f = {_text(k): _text(v) for k, v in fields.items()}
            entries.append(
                {
                    "id": _text(entry_id),
                    "at": rfc3339(float(f["ts"])),
                    "actor": f.get("actor"),
                    "action": f.get("action"),
                    "key_id": f.get("key_id"),
                    "reason": f.get("reason"),
                    "remote": f.get("remote"),
                    "request_id": f.get("request_id"),
                    "detail": orjson.loads(f["detail"]) if "detail" in f else None,
                }
            )
        next_cursor = entries[-1]["id"] if len(entries) == limit else None
        return entries, next_cursor

    async def announce(self, announcer: Announcer, keys: list[tuple[str, int]]) -> None:
        """Publish an announcement for a change that wrote nothing (an idempotent repeat)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self._queue_announce(pipe, announcer, keys)
            _announced(announcer, await pipe.execute())

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # writes ---------------------------------------------------------------

    async def insert(self, record: KeyRecord, audit: list[AuditEntry], announcer: Announcer) -> bool:
        """Add a new record; False when a key with the same hash already exists."""
        hk = self._k(record.hash)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(hk)
                    if await pipe.exists(hk):
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._queue_insert(pipe, record)
                    self._queue_audit(pipe, audit)
                    # A negative answer cached anywhere for this hash must go too.
                    self._queue_announce(pipe, announcer, [(record.hash, record.version)])
                    _announced(announcer, await pipe.execute())
                    return True
                except WatchError:
                    continue

    async def update(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        audit: list[AuditEntry],
        announcer: Announcer,
        *,
        also_insert: Callable[[KeyRecord], KeyRecord] | None = None,
    ) -> tuple[KeyRecord, KeyRecord, KeyRecord | None] | None:
        """Apply `change` to a record atomically: (before, after, inserted) or None if no such id.

        `change` may raise Refused, or return the record unchanged for a no-op
        (nothing is written, audited or announced). `also_insert` builds a new
        record from the changed one, written in the same transaction (rotate).
        """
        raw_hash = await self.redis.get(self._id(key_id))
        if raw_hash is None:
            return None
        hk = self._k(_text(raw_hash))
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(hk)
                    raw = await pipe.get(hk)
                    if raw is None:
                        return None
                    before = KeyRecord.from_json(raw)
                    after = change(before)
                    if after is before:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return before, before, None
                    inserted = also_insert(after) if also_insert is not None else None
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(hk, after.to_json())
                    changed = [(after.hash, after.version)]
                    if inserted is not None:
                        self._queue_insert(pipe, inserted)
                        changed.append((inserted.hash, inserted.version))
                    self._queue_audit(pipe, audit)
                    self._queue_announce(pipe, announcer, changed)
                    _announced(announcer, await pipe.execute())
                    return before, after, inserted
                except WatchError:
                    continue

    def _queue_insert(self, pipe: Any, record: KeyRecord) -> None:
        pipe.set(self._k(record.hash), record.to_json())
        pipe.set(self._id(record.id), record.hash)
        pipe.zadd(self.prefix + "ids", {record.id: record.created_at})
        if record.owner is not None:
            pipe.zadd(self._owner(record.owner), {record.id: record.created_at})

    def _queue_announce(self, pipe: Any, announcer: Announcer, keys: list[tuple[str, int]]) -> None:
        """The announcement, then TIME: queued last, so `_announced` finds the time at the end."""
        pipe.publish(self.channel, announcer.message(keys))
        pipe.time()

    def _queue_audit(self, pipe: Any, entries: list[AuditEntry]) -> None:
        now = time.time()
        for entry in entries:
            fields = entry.fields(now)
            pipe.xadd(self.prefix + "audit", fields)
            pipe.xadd(self.prefix + "audit:" + entry.key_id, fields)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis glob pattern (the prefix is the operator's to choose)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(str(position).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Raises ValueError for a cursor this gateway did not issue."""
    padded = cursor + "=" * (-len(cursor) % 4)
    position = int(base64.urlsafe_b64decode(padded.encode()).decode())
    if position < 0:
        raise ValueError("negative cursor")
    return position
