"""The key table and audit log in Redis: the only module that knows the key layout.

Layout, every name under `redis.prefix` (P):
  P k:<sha256>       record JSON (the request path's one GET)
  P id:<id>          sha256 of the key with that id
  P ids              sorted set of ids by creation time (listing)
  P owner:<owner>    sorted set of that owner's ids by creation time
  P audit            stream of every change (never trimmed: the audit trail is complete)
  P auditix:<4 hex>  per-key index of that stream, 65,536 hashes bucketed by the first 4 hex
                     digits of SHA-1(key id): field <id> = the key's entry ids, oldest first,
                     space-separated. A hash of a few dozen fields is listpack-encoded, so a
                     key's index costs ~60-150 bytes where a stream of its own cost ~4.7 KB
                     (docs/scale.md). P audit:<id>: a key's own stream, written by versions
                     before the index; still read (merged with the index), never written;
                     moved into the index once (P audit-moved: when that was done).
  P events           pub/sub channel announcing each change (see coherence/channel.py)
  P acks             pub/sub channel of replicas' eviction acks
  P replicas         live replicas (see coherence/replicas.py)

Every change is one MULTI/EXEC under WATCH: the record, its audit entries and
its announcement are written together or not at all. With `Durability` (spec 13,
redis.min_replicas_acked) a change then waits, on the same connection, for `WAIT N`:
fewer replicas holding it raises NotDurable (the change is written on the master and
announced, but a failover could lose it), which the admin API answers with 503.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import re
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError, WatchError

from gateway.errors import ErrorCode
from gateway.keytable.keyfilter import Checkpoint, Prefixes
from gateway.keytable.record import SHA256_HEX, KeyRecord, rfc3339


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

    def __init__(self, code: ErrorCode, detail: str | None = None) -> None:
        super().__init__(code)
        self.code: ErrorCode = code
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


@dataclass(frozen=True, slots=True)
class Durability:
    """A change counts as made once `replicas` Redis replicas hold it (WAIT), within `timeout`
    seconds. `writer` is a client whose pool holds one connection: WAIT counts the replicas that
    reached the offset of the last write made on its own connection, so the change and its WAIT
    must share it (and one change at a time goes through it)."""

    replicas: int
    timeout: float
    writer: Redis = field(repr=False)


class NotDurable(Exception):
    """Fewer Redis replicas than redis.min_replicas_acked acknowledged a change within the timeout."""

    def __init__(self, acked: int, wanted: int) -> None:
        super().__init__(f"{acked} of {wanted} Redis replica(s) acknowledged the change")
        self.acked = acked
        self.wanted = wanted


class KeyStore:
    def __init__(self, redis: Redis, prefix: str, *, durability: Durability | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.channel = prefix + "events"
        self.durability = durability
        self._writes = asyncio.Lock()  # with durability: one change at a time on the writer's connection

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[Pipeline]:
        """A transaction pipeline for a change: on the command client, or with Durability on the
        writer's one connection, held until `_durable` has run."""
        if self.durability is None:
            async with self.redis.pipeline(transaction=True) as pipe:
                yield pipe
            return
        async with self._writes:
            async with self.durability.writer.pipeline(transaction=True) as pipe:
                yield pipe

    async def _durable(self) -> None:
        """After a change's EXEC, inside `_changing`: WAIT for the replicas it must reach."""
        if self.durability is None:
            return
        wanted, timeout_ms = self.durability.replicas, max(1, round(self.durability.timeout * 1000))
        acked = await self.durability.writer.wait(wanted, timeout_ms)
        if int(acked) < wanted:
            raise NotDurable(int(acked), wanted)

    def _k(self, key_hash: str) -> str:
        return f"{self.prefix}k:{key_hash}"

    def _id(self, key_id: str) -> str:
        return f"{self.prefix}id:{key_id}"

    def _owner(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}"

    @property
    def audit_stream(self) -> str:
        """The stream of every change (webhooks/source.py reads it through a consumer group)."""
        return self.prefix + "audit"

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
            key_hash = as_text(name)[start:]
            if SHA256_HEX.fullmatch(key_hash):  # not ours (another deployment's prefix nested in ours): skipped
                yield key_hash

    async def hash_prefixes(self, count: int = 5000) -> AsyncIterator[Prefixes]:
        """Every key hash in the table as its first 64 bits, a SCAN reply at a time (the key filter's
        rebuild at scale; what `hashes` returns, with the same guarantee). Names are decoded with
        numpy, and each reply while Redis already works on the next SCAN: on a 1M-key table the
        scan takes about Redis's own SCAN time. `count`: SCAN's COUNT, the buckets Redis walks a
        call (about 3-6 ms of its time at 5,000 on this machine, docs/scale.md)."""
        head = self._k("").encode()
        size = len(head) + 64
        pattern = _glob_escape(self._k("")) + "*"
        pending = asyncio.ensure_future(self.redis.scan(0, match=pattern, count=count))
        try:
            while True:
                cursor, names = await pending
                if int(cursor) != 0:
                    pending = asyncio.ensure_future(self.redis.scan(cursor, match=pattern, count=count))
                fitting = [raw for raw in (as_bytes(name) for name in names) if len(raw) == size]
                if fitting:
                    rows = np.frombuffer(b"".join(fitting), dtype=np.uint8).reshape(-1, size)[:, len(head) :]
                    nibbles = _NIBBLE[rows]
                    valid = (nibbles < 16).all(axis=1)  # lowercase hex only, as SHA256_HEX: not ours otherwise
                    yield (nibbles[valid, :16].astype(np.uint64) << _SHIFTS).sum(axis=1, dtype=np.uint64)
                if int(cursor) == 0:
                    return
        finally:
            if not pending.done():  # the consumer stopped early (a break): the SCAN in flight goes
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    async def checkpoint(self) -> Checkpoint | None:
        """Where the change log stands now (see KnownKeys.checkpoint): the global audit stream,
        which every change that writes a key appends to in its own transaction, in commit order.
        None when Redis does not say how many entries the stream was given (before 7.0)."""
        async with self.redis.pipeline(transaction=True) as pipe:  # one process answers both
            pipe.info("server")
            pipe.xinfo_stream(self.audit_stream)
            server, info = await pipe.execute(raise_on_error=False)
        if isinstance(server, Exception):
            raise server
        run_id = str(server.get("run_id", ""))
        if isinstance(info, ResponseError) and not await self.redis.exists(self.audit_stream):
            return Checkpoint(run_id, "0-0", 0) if run_id else None  # no change yet
        if isinstance(info, Exception):
            raise info
        if not run_id or "entries-added" not in info:
            return None
        return Checkpoint(run_id, as_text(info["last-generated-id"]), int(info["entries-added"]))

    async def hashes_since(self, since: Checkpoint, until: Checkpoint, limit: int = 50_000) -> list[str] | None:
        """The hashes of every key changed (created included) between two checkpoints, from the
        change log; None when it cannot tell: another Redis process (restart, failover), entries
        deleted or trimmed meanwhile, or more than `limit` entries (a full scan is cheaper)."""
        if since.server != until.server or until.added < since.added:
            return None
        expected = until.added - since.added
        if expected == 0:
            return []
        if expected > limit:
            return None
        key_ids: set[str] = set()
        seen = 0
        low = "(" + since.entry
        while seen < expected:
            count = min(expected - seen, 5000)
            rows = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self.redis.xrange(self.audit_stream, min=low, max=until.entry, count=count),
            )
            if not rows:
                break
            for _, fields in rows:  # field names are bytes, or str with a decoding client
                key_ids.update(as_text(v) for k, v in fields.items() if as_text(k) == "key_id")
            seen += len(rows)
            low = "(" + as_text(rows[-1][0])
        if seen != expected:  # an entry went (XDEL, XTRIM): what it said is unknown
            return None
        ordered = sorted(key_ids)
        hashes: list[str] = []
        for start in range(0, len(ordered), 1000):
            found = await self.redis.mget([self._id(i) for i in ordered[start : start + 1000]])
            hashes += [h for h in (as_text(v) for v in found if v is not None) if SHA256_HEX.fullmatch(h)]
        return hashes

    async def get_by_id(self, key_id: str) -> KeyRecord | None:
        key_hash = await self.redis.get(self._id(key_id))
        if key_hash is None:
            return None
        return await self.get_by_hash(as_text(key_hash))

    async def record_by_id(self, key_id: str) -> KeyRecord | Unreadable | None:
        """The record with this id for the admin API: one that does not decode is `Unreadable`."""
        key_hash = await self.redis.get(self._id(key_id))
        if key_hash is None:
            return None
        raw = await self.redis.get(self._k(as_text(key_hash)))
        return None if raw is None else _decoded(key_id, raw)

    async def page(
        self, *, owner: str | None, enabled: bool | None, cursor: int, limit: int
    ) -> tuple[list[KeyRecord | Unreadable], int | None]:
        """One page in creation order; the next cursor or None at the end.

        A record that does not decode (written by hand, or by a version with other rules)
        is listed as `Unreadable` rather than failing the page; it matches no `enabled`
        filter, since its state is unknown. An id whose record is gone is skipped.
        """
        index = self._owner(owner) if owner is not None else self.prefix + "ids"
        out: list[KeyRecord | Unreadable] = []
        position = cursor
        while len(out) < limit:
            batch = max(limit, 50)
            page = cast(list[bytes], await self.redis.zrange(index, position, position + batch - 1))
            ids = [as_text(i) for i in page]
            if not ids:
                return out, None
            hashes = await self.redis.mget([self._id(i) for i in ids])
            present = [(i, as_text(h)) for i, h in zip(ids, hashes, strict=True) if h is not None]
            raws = await self.redis.mget([self._k(h) for _, h in present]) if present else []
            by_id = {i: raw for (i, _), raw in zip(present, raws, strict=True)}
            for n, key_id in enumerate(ids, start=1):
                raw = by_id.get(key_id)
                if raw is not None:
                    record = _decoded(key_id, raw)
                    wanted = enabled is None if isinstance(record, Unreadable) else enabled in (None, record.enabled)
                    if wanted:
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
        rows: list[tuple[bytes | str, dict[bytes, bytes]]]
        if not key_id:
            high = "(" + cursor if cursor else "+"
            rows = cast(
                list[tuple[bytes | str, dict[bytes, bytes]]],
                await self.redis.xrevrange(self.audit_stream, max=high, min="-", count=limit),
            )
        else:
            rows = await self._key_audit(key_id, cursor, limit)
        entries = [_audit_entry(as_text(entry_id), fields) for entry_id, fields in rows]
        next_cursor = entries[-1]["id"] if len(entries) == limit else None
        return entries, next_cursor

    async def _key_audit(
        self, key_id: str, cursor: str | None, limit: int
    ) -> list[tuple[bytes | str, dict[bytes, bytes]]]:
        """A key's entries below `cursor`, newest first: its ids from the index, and from its own
        stream if a version before the index wrote one (read as long as it exists, see
        `migrate_audit`); the entries themselves from the global stream."""
        below = _stream_id(cursor) if cursor else None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.audit_index(key_id), key_id)
            pipe.xrevrange(self._old_audit(key_id), max="(" + cursor if cursor else "+", min="-", count=limit)
            indexed, old_rows = await pipe.execute()
        found: dict[tuple[int, int], tuple[bytes | str, dict[bytes, bytes]] | None] = {
            _stream_id(as_text(entry_id)): (entry_id, fields) for entry_id, fields in old_rows
        }
        for text in as_text(indexed).split() if indexed else ():
            if _STREAM_ID.fullmatch(text) is None:  # not written by the gateway: skipped, the page still answers
                continue
            entry = _stream_id(text)
            if below is None or entry < below:
                found.setdefault(entry, None)
        newest = sorted(found, reverse=True)[:limit]
        missing = [entry for entry in newest if found[entry] is None]
        if missing:
            async with self.redis.pipeline(transaction=False) as pipe:
                for ms, seq in missing:
                    pipe.xrange(self.audit_stream, min=f"{ms}-{seq}", max=f"{ms}-{seq}", count=1)
                for entry, rows in zip(missing, await pipe.execute(), strict=True):
                    if rows:
                        found[entry] = rows[0]
        return [row for row in (found[entry] for entry in newest) if row is not None]

    def audit_index(self, key_id: str) -> str:
        """The hash holding `key_id`'s entry ids (the bucket _AUDIT_INDEXED computes alike)."""
        return f"{self.prefix}auditix:{hashlib.sha1(key_id.encode(), usedforsecurity=False).hexdigest()[:4]}"

    def _old_audit(self, key_id: str) -> str:
        return f"{self.prefix}audit:{key_id}"

    async def migrate_audit(self) -> int:
        """Move every per-key audit stream of the layout before the index into the index (their
        entries are in the global stream under the same ids) and delete it; how many were moved.
        Safe to run on every replica at once and while changes are made: each key's move is one
        script that merges, in id order, with what the index holds already. Runs once a table:
        a complete pass sets `P audit-moved`, and later starts skip the scan of the whole
        database (a stream an older replica writes after that is read where it is)."""
        done = self.prefix + "audit-moved"
        if await self.redis.exists(done):
            return 0
        pattern = _glob_escape(self.prefix + "audit:") + "*"
        start = len(self.prefix + "audit:")
        moved = 0
        async for name in self.redis.scan_iter(match=pattern, count=1000, _type="stream"):
            key_id = as_text(name)[start:]
            moved += int(await self.redis.eval(_MIGRATE_AUDIT, 2, name, self.audit_index(key_id), key_id))
        await self.redis.set(done, rfc3339(time.time()) or "")
        return moved

    async def announce(self, announcer: Announcer, keys: list[tuple[str, int]]) -> None:
        """Publish an announcement for a change that wrote nothing (an idempotent repeat)."""
        async with self._changing() as pipe:
            self._queue_announce(pipe, announcer, keys)
            _announced(announcer, await pipe.execute())
            # A repeat of a change that was not durable is durable only once the replicas hold it:
            # WAIT covers every write made before on the writer's connection.
            await self._durable()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # writes ---------------------------------------------------------------

    async def insert(self, record: KeyRecord, audit: list[AuditEntry], announcer: Announcer) -> bool:
        """Add a new record; False when a key with the same hash already exists."""
        hk = self._k(record.hash)
        async with self._changing() as pipe:
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
                    await self._durable()
                    return True
                except WatchError:
                    continue

    async def insert_many(self, records: list[KeyRecord], audit: list[AuditEntry], announcer: Announcer) -> list[bool]:
        """Add many new records in one transaction (a bulk import's batch): for each, True when it
        was added, False when a key with its hash existed already (or came earlier in the batch).
        `audit` holds one entry per record, in the same order. One announcement evicts every hash
        of the batch (a negative answer cached anywhere must go)."""
        assert len(audit) == len(records)
        if not records:
            return []
        now = time.time()
        args: list[str | bytes] = [self.prefix]
        for record, entry in zip(records, audit, strict=True):
            fields = [part for pair in entry.fields(now).items() for part in pair]
            args += [record.hash, record.id, record.to_json(), repr(record.created_at), record.owner or "",
                     orjson.dumps(fields).decode()]  # fmt: skip
        async with self._changing() as pipe:
            pipe.eval(_INSERT_MANY, 0, *args)
            self._queue_announce(pipe, announcer, [(r.hash, r.version) for r in records])
            replies = await pipe.execute()
            _announced(announcer, replies)
            await self._durable()
        return [bool(flag) for flag in replies[0]]

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
        hk = self._k(as_text(raw_hash))
        async with self._changing() as pipe:
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
                    await self._durable()
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
        """Each entry into the global stream, its id into its key's index (see _AUDIT_INDEXED)."""
        now = time.time()
        for entry in entries:
            args = [part for pair in entry.fields(now).items() for part in pair]
            pipe.eval(_AUDIT_XADD, 2, self.audit_stream, self.audit_index(entry.key_id), entry.key_id, *args)


# One audit entry: XADD to the global stream, then its id appended to the key's field in its
# index bucket (P auditix:<first 4 hex of SHA-1(id)>). In Lua so that both happen in the change's
# transaction. EVAL rather than EVALSHA: in MULTI an unknown sha would fail alone at EXEC, leaving
# the change written without its audit entry.
_AUDIT_INDEXED = """
local function audit_indexed(stream, bucket, key_id, fields)
  local id = redis.call('XADD', stream, '*', unpack(fields))
  local ids = redis.call('HGET', bucket, key_id)
  redis.call('HSET', bucket, key_id, ids and (ids .. ' ' .. id) or id)
  return id
end
"""
_AUDIT_XADD = _AUDIT_INDEXED + "return audit_indexed(KEYS[1], KEYS[2], ARGV[1], {select(2, unpack(ARGV))})\n"

# One key's stream of the layout before the index, moved into the index (store.migrate_audit):
# its ids merged in id order with those the index has (an older replica may still have written
# the stream after a newer one wrote the index), then the stream deleted. Ids compare as decimal
# strings, shorter first (a Lua number cannot hold every 64-bit part).
_MIGRATE_AUDIT = """
local function less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am ~= bm then
    if #am ~= #bm then return #am < #bm end
    return am < bm
  end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local ids, seen = {}, {}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  if not seen[entry[1]] then seen[entry[1]] = true; ids[#ids + 1] = entry[1] end
end
local current = redis.call('HGET', KEYS[2], ARGV[1])
if current then
  for id in string.gmatch(current, '%S+') do
    if not seen[id] then seen[id] = true; ids[#ids + 1] = id end
  end
end
redis.call('DEL', KEYS[1])
if #ids == 0 then return 0 end
table.sort(ids, less)
redis.call('HSET', KEYS[2], ARGV[1], table.concat(ids, ' '))
return 1
"""

# A bulk import's batch (insert_many), atomic: ARGV is the prefix, then six values a record (hash,
# id, record JSON, created_at, owner or "", its audit entry's fields as a JSON list). A record whose
# hash exists (or came earlier in the batch) writes nothing. Keys are built here from the prefix:
# Redis Cluster is not supported (docs/deployment.md).
_INSERT_MANY = (
    _AUDIT_INDEXED
    + """
local prefix = ARGV[1]
local added = {}
for i = 2, #ARGV, 6 do
  local hash, id, json, created, owner = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local k = prefix .. 'k:' .. hash
  if redis.call('EXISTS', k) == 1 then
    added[#added + 1] = 0
  else
    redis.call('SET', k, json)
    redis.call('SET', prefix .. 'id:' .. id, hash)
    redis.call('ZADD', prefix .. 'ids', created, id)
    if owner ~= '' then redis.call('ZADD', prefix .. 'owner:' .. owner, created, id) end
    local bucket = prefix .. 'auditix:' .. string.sub(redis.sha1hex(id), 1, 4)
    audit_indexed(prefix .. 'audit', bucket, id, cjson.decode(ARGV[i + 5]))
    added[#added + 1] = 1
  end
end
return added
"""
)


_NIBBLE = np.full(256, 255, dtype=np.uint8)  # a lowercase hex digit's value; 255 for any other byte
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)
_SHIFTS = np.arange(60, -4, -4, dtype=np.uint64)  # where each of the first 16 digits goes in 64 bits


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis glob pattern (the prefix is the operator's to choose)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _stream_id(text: str) -> tuple[int, int]:
    """A stream id as numbers, for ordering ("(ms, seq)"); ValueError when it is not one."""
    match = _STREAM_ID.fullmatch(text)
    if match is None:
        raise ValueError("not a stream id")
    return int(match[1]), int(match[2])


def as_text(value: bytes | str) -> str:
    """A Redis reply value as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value


def as_bytes(value: bytes | str) -> bytes:
    """A Redis reply value as bytes, whether the client decodes responses or not."""
    return value if isinstance(value, bytes) else value.encode()


def audit_entry(entry_id: str, raw_fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One audit stream entry decoded, as the API shows it (webhooks/source.py reads them too)."""
    return _audit_entry(entry_id, raw_fields)


def _audit_entry(entry_id: str, raw_fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One audit entry as the API shows it; a field that does not decode shows as null."""
    f: dict[str, str] = {}
    for k, v in raw_fields.items():
        try:
            f[as_text(k)] = as_text(v)
        except UnicodeDecodeError:
            continue
    try:
        at: str | None = rfc3339(float(f["ts"]))
    except (KeyError, ValueError, OverflowError, OSError):
        at = None
    detail: Any = None
    if "detail" in f:
        try:
            detail = orjson.loads(f["detail"])
            orjson.dumps(detail)  # the answer encodes it again: nested too deep is refused there
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            detail = None
    return {
        "id": entry_id,
        "at": at,
        "actor": f.get("actor"),
        "action": f.get("action"),
        "key_id": f.get("key_id"),
        "reason": f.get("reason"),
        "remote": f.get("remote"),
        "request_id": f.get("request_id"),
        "detail": detail,
    }


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored record that does not decode: listed and shown by its id, never a failed page."""

    id: str

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": "unreadable",
            "unreadable": True,
            "detail": "The stored record could not be decoded; it is shown by its id only",
        }


def _decoded(key_id: str, raw: bytes | str) -> KeyRecord | Unreadable:
    try:
        record = KeyRecord.from_json(raw)
        # What the API will encode: a record that decodes but cannot be shown is unreadable too.
        orjson.dumps(record.public())
    except Exception:  # any shape of bad stored data: the page must still answer
        return Unreadable(key_id)
    return record


# Cursors (spec 7): only cursors this gateway issued are accepted. A cursor is
# base64url(version, the position as unsigned 64-bit numbers, 12 bytes of
# HMAC-SHA256 over the endpoint, the query it was issued for and the position).
# The key is derived from the configuration, so every replica and worker accepts
# the cursors of the others; anything else is refused before Redis is asked.

CURSOR_VERSION = 1
_CURSOR_MAC = 12
_CURSOR_CHARS = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_POSITION = 2**53  # far beyond any table; a listing position is a ZRANGE index
MAX_STREAM_MS = 2**48  # stream ids are milliseconds since the epoch: year 10889
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


class BadCursor(ValueError):
    """A cursor this gateway did not issue (for this endpoint and query)."""


class CursorCodec:
    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def derived(cls, *material: str) -> CursorCodec:
        """A codec whose key every replica with the same configuration derives alike."""
        digest = hashlib.sha256(b"gateway cursor key v1")
        for item in material:
            digest.update(b"\0" + item.encode("utf-8", "surrogatepass"))
        return cls(digest.digest())

    def _mac(self, endpoint: str, context: str, payload: bytes) -> bytes:
        message = f"{endpoint}\0{context}\0".encode("utf-8", "surrogatepass") + payload
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_CURSOR_MAC]

    def _encode(self, endpoint: str, context: str, values: tuple[int, ...]) -> str:
        payload = struct.pack(f">B{len(values)}Q", CURSOR_VERSION, *values)
        raw = payload + self._mac(endpoint, context, payload)
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    def _decode(self, endpoint: str, context: str, cursor: str, count: int) -> tuple[int, ...]:
        if not _CURSOR_CHARS.fullmatch(cursor):  # ASCII, bounded: checked before anything is decoded
            raise BadCursor(endpoint)
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError):
            raise BadCursor(endpoint) from None
        size = 1 + 8 * count
        if len(raw) != size + _CURSOR_MAC or raw[0] != CURSOR_VERSION:
            raise BadCursor(endpoint)
        payload, mac = raw[:size], raw[size:]
        if not hmac.compare_digest(mac, self._mac(endpoint, context, payload)):
            raise BadCursor(endpoint)
        # Re-encoding must give the same text: no second spelling of one cursor is accepted.
        values = struct.unpack(f">{count}Q", payload[1:])
        if self._encode(endpoint, context, values) != cursor:
            raise BadCursor(endpoint)
        return values

    def keys(self, position: int, context: str) -> str:
        if not 0 <= position <= MAX_POSITION:
            raise ValueError("listing position out of range")
        return self._encode("keys", context, (position,))

    def keys_position(self, cursor: str, context: str) -> int:
        (position,) = self._decode("keys", context, cursor, 1)
        if position > MAX_POSITION:
            raise BadCursor("keys")
        return position

    def audit(self, stream_id: str, context: str) -> str:
        match = _STREAM_ID.fullmatch(stream_id)
        if match is None:
            raise ValueError("not a stream id")
        return self._encode("audit", context, (int(match[1]), int(match[2])))

    def audit_id(self, cursor: str, context: str) -> str:
        """The stream id the cursor stands for: an exclusive upper bound, so never 0-0."""
        ms, seq = self._decode("audit", context, cursor, 2)
        if ms > MAX_STREAM_MS or (ms, seq) == (0, 0):
            raise BadCursor("audit")
        return f"{ms}-{seq}"
