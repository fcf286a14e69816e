"""The key table and audit log in Redis: the only module that knows the key layout.

Layout, every name under `redis.prefix` (P):
  P k:<sha256>       record JSON (the request path's one GET)
  P id:<id>          sha256 of the key with that id
  P ids              sorted set of ids by creation time (listing)
  P owner:<owner>    sorted set of that owner's ids by creation time
  P audit            stream of every change; P audit:<id> the same, per key, under the same ids
  P events           pub/sub channel announcing each change (see coherence/channel.py)
  P acks             pub/sub channel of replicas' eviction acks
  P replicas         live replicas (see coherence/replicas.py)

Every change is one Lua script, one round trip: the record, its audit entries and
its announcement are written together or not at all, and the same script reads the
Redis time and the live replicas the answer must wait for. An update reads the
record first and writes it only if it is still as read (compare and set). With `Durability` (spec 13,
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson
from redis.asyncio import Redis

from gateway.errors import ErrorCode
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

    def written(self, at_us: int, live: dict[str, int] | None = None) -> None:
        """Redis server time (microseconds) read in the change's own transaction, and the live
        replicas with their epochs as that transaction read them (None: not read with it)."""


def _announced_with_live(announcer: Announcer, reply: list[Any]) -> None:
    """A change script's reply ends with TIME's two parts, then the live set as id/epoch pairs
    (see _ANNOUNCE_LUA)."""
    seconds, micros, *pairs = reply
    live = {as_text(pairs[i]): int(pairs[i + 1]) for i in range(0, len(pairs), 2)}
    announcer.written(int(seconds) * 1_000_000 + int(micros), live)


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


class SideEffects:
    """What a change writes besides the key table, in the change's own script (a credit balance:
    gateway/ratelimit/store.py): plain data, so the store runs no caller's code inside Redis. Times
    are Redis's own (milliseconds), taken in the script."""

    def __init__(self) -> None:
        self.ops: list[list[str | int]] = []

    def delete(self, key: str) -> None:
        self.ops.append(["del", key])

    def hset_stamped(self, key: str, name: str, value: int, stamp: str) -> None:
        """HSET key name value, and stamp = now."""
        self.ops.append(["hset_stamped", key, name, value, stamp])

    def hadd_clamped(self, key: str, name: str, amount: int, most: int, stamp: str) -> None:
        """name += amount, kept within 0..most; stamp = now unless already set."""
        self.ops.append(["hadd_clamped", key, name, amount, most, stamp])

    def encoded(self) -> str:
        return orjson.dumps(self.ops).decode()


class KeyStore:
    def __init__(self, redis: Redis, prefix: str, *, durability: Durability | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.channel = prefix + "events"
        self.durability = durability
        self._writes = asyncio.Lock()  # with durability: one change at a time on the writer's connection
        # EVALSHA, loading the script on NOSCRIPT (a restarted or failed-over Redis has none).
        self._announce = redis.register_script(_ANNOUNCE)
        self._create = redis.register_script(_CREATE)
        self._read_by_id = redis.register_script(_READ_BY_ID)
        self._update = redis.register_script(_UPDATE)
        self._insert_many = redis.register_script(_INSERT_MANY)
        self._append_audit = redis.register_script(_APPEND_AUDIT)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[Redis]:
        """The client a change script runs on: the command client, or with Durability the writer
        (its one connection), held until `_durable` has run."""
        if self.durability is None:
            yield self.redis
            return
        async with self._writes:
            yield self.durability.writer

    async def _durable(self) -> None:
        """After a change's script, inside `_writing`: WAIT for the replicas it must reach."""
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
        self,
        *,
        owner: str | None,
        enabled: bool | None,
        cursor: int,
        limit: int,
        keep: Callable[[list[str]], Awaitable[list[bool]]] | None = None,
    ) -> tuple[list[KeyRecord | Unreadable], int | None]:
        """One page in creation order; the next cursor or None at the end.

        A record that does not decode (written by hand, or by a version with other rules)
        is listed as `Unreadable` rather than failing the page; it matches no `enabled`
        filter, since its state is unknown. An id whose record is gone is skipped. `keep`, when
        given, is asked about each batch of ids and lists only those it answers True for.
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
            kept = await keep(ids) if keep is not None else None
            for n, key_id in enumerate(ids, start=1):
                raw = by_id.get(key_id)
                if raw is not None and (kept is None or kept[n - 1]):
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
        stream = self.prefix + ("audit:" + key_id if key_id else "audit")
        high = "(" + cursor if cursor else "+"
        rows = cast(
            list[tuple[bytes, dict[bytes, bytes]]], await self.redis.xrevrange(stream, max=high, min="-", count=limit)
        )
        entries = [_audit_entry(as_text(entry_id), fields) for entry_id, fields in rows]
        next_cursor = entries[-1]["id"] if len(entries) == limit else None
        return entries, next_cursor

    async def announce(self, announcer: Announcer, keys: list[tuple[str, int]]) -> None:
        """Publish an announcement for a change that wrote nothing (an idempotent repeat)."""
        async with self._writing() as client:
            reply = await self._announce(args=[self.prefix, announcer.message(keys)], client=client)
            # A repeat of a change that was not durable is durable only once the replicas hold it:
            # WAIT covers every write made before on the writer's connection.
            await self._durable()
        _announced_with_live(announcer, reply)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # writes ---------------------------------------------------------------

    async def insert(
        self,
        record: KeyRecord,
        audit: list[AuditEntry],
        announcer: Announcer,
        also: Callable[[SideEffects], None] | None = None,
    ) -> bool:
        """Add a new record; False when a key with the same hash already exists. One round trip.
        `also` adds side effects to the same script (a new key's credit balance: ratelimit/store.py)."""
        effects = SideEffects()
        if also is not None:
            also(effects)
        args = [self.prefix, *self._record_args(record), self._audit_args(audit)]
        async with self._writing() as client:
            # A negative answer cached anywhere for this hash must go too.
            message = announcer.message([(record.hash, record.version)])
            reply = await self._create(args=[*args, message, effects.encoded()], client=client)
            if not int(reply[0]):
                return False
            await self._durable()
        _announced_with_live(announcer, reply[1])
        return True

    async def insert_many(self, records: list[KeyRecord], audit: list[AuditEntry], announcer: Announcer) -> list[bool]:
        """Add many new records in one transaction (a bulk import's batch): for each, True when it
        was added, False when a key with its hash existed already (or came earlier in the batch).
        `audit` holds one entry per record, in the same order. One announcement evicts every hash
        of the batch (a negative answer cached anywhere must go)."""
        assert len(audit) == len(records)
        if not records:
            return []
        now = time.time()
        args: list[str | bytes] = []
        for record, entry in zip(records, audit, strict=True):
            fields = [part for pair in entry.fields(now).items() for part in pair]
            args += [record.hash, record.id, record.to_json(), repr(record.created_at), record.owner or "",
                     orjson.dumps(fields).decode()]  # fmt: skip
        message = announcer.message([(r.hash, r.version) for r in records])
        async with self._writing() as client:
            reply = await self._insert_many(args=[self.prefix, message, *args], client=client)
            await self._durable()
        _announced_with_live(announcer, reply[1])
        return [bool(flag) for flag in reply[0]]

    async def update(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        audit: list[AuditEntry],
        announcer: Announcer,
        *,
        also_insert: Callable[[KeyRecord], KeyRecord] | None = None,
        also: Callable[[SideEffects, KeyRecord, KeyRecord], None] | None = None,
    ) -> tuple[KeyRecord, KeyRecord, KeyRecord | None] | None:
        """Apply `change` to a record atomically: (before, after, inserted) or None if no such id.

        `change` may raise Refused, or return the record unchanged for a no-op
        (nothing is written, audited or announced). `also_insert` builds a new
        record from the changed one, written in the same transaction (rotate). `also(pipe, before,
        after)` queues more commands into that transaction (a PATCH's credits: ratelimit/store.py).
        """
        while True:
            read = await self._read_by_id(args=[self.prefix, key_id])
            if not read or not read[1]:
                return None
            key_hash, raw = as_text(read[0]), read[1]
            before = KeyRecord.from_json(raw)
            after = change(before)
            if after is before:
                return before, before, None
            inserted = also_insert(after) if also_insert is not None else None
            effects = SideEffects()
            if also is not None:
                also(effects, before, after)
            changed = [(after.hash, after.version)]
            extra: list[str | bytes] = []
            if inserted is not None:
                changed.append((inserted.hash, inserted.version))
                extra = self._record_args(inserted)
            async with self._writing() as client:
                args = [self.prefix, key_hash, raw, after.to_json(), self._audit_args(audit)]
                message = announcer.message(changed)
                reply = await self._update(args=[*args, message, effects.encoded(), *extra], client=client)
                if not int(reply[0]):  # changed since it was read: read it again
                    continue
                await self._durable()
            _announced_with_live(announcer, reply[1])
            return before, after, inserted

    async def append_audit(self, entries: list[AuditEntry]) -> None:
        """Audit entries that go with no change of a record (a policy's report, gateway/usage)."""
        await self._append_audit(args=[self.prefix, self._audit_args(entries)])

    def _record_args(self, record: KeyRecord) -> list[str | bytes]:
        """A record as _CREATE's and _UPDATE's insert() takes it."""
        return [record.hash, record.id, record.to_json(), repr(record.created_at), record.owner or ""]

    def _audit_args(self, entries: list[AuditEntry]) -> str:
        """Audit entries as the change scripts' audit() takes them: [key id, flat fields] each."""
        now = time.time()
        flat = [[e.key_id, [part for pair in e.fields(now).items() for part in pair]] for e in entries]
        return orjson.dumps(flat).decode()


# One audit entry, one stream id in both streams: two XADD * can take two ids (the clock can
# tick between them), and a page of one stream and a cursor from the other would then disagree.
# An explicit id must be above the stream's last generated id, so the stream whose last id is
# higher generates it (XADD *: above its own last id and the clock) and the other takes it as
# given. Ids are compared as decimal strings (Redis writes them without leading zeros): a
# Lua number cannot hold every 64-bit part.
_XADD_BOTH = """
local function last(stream)
  if redis.call('EXISTS', stream) == 0 then return {'0', '0'} end
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return {string.match(info[i + 1], '^(%d+)-(%d+)$')} end
  end
  return {'0', '0'}
end
local function less(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function xadd_both(all_stream, own_stream, fields)
  local all, own = last(all_stream), last(own_stream)
  local first, second = all_stream, own_stream
  if less(all[1], own[1]) or (all[1] == own[1] and less(all[2], own[2])) then
    first, second = own_stream, all_stream
  end
  local id = redis.call('XADD', first, '*', unpack(fields))
  redis.call('XADD', second, id, unpack(fields))
  return id
end
"""

# A change in one round trip (spec 13: the disable's latency): the write, its audit entries, its
# announcement, the Redis time and the live replicas (coherence/replicas.py's sorted set and epochs,
# expired members dropped), all in one script, so the answer can start waiting for acks at once.
# `announce_and_read` ends every change script: PUBLISH, then TIME and the live set as the reply.
_ANNOUNCE_LUA = """
local function announce_and_read(prefix, message)
  redis.call('PUBLISH', prefix .. 'events', message)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local members, epochs = prefix .. 'replicas', prefix .. 'replica-epochs'
  local gone = redis.call('ZRANGEBYSCORE', members, '-inf', now)
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', members, '-inf', now)
    redis.call('HDEL', epochs, unpack(gone))
  end
  local out = {t[1], t[2]}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', members, now, '+inf')) do
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', epochs, id) or '0'
  end
  return out
end
local function insert(prefix, hash, id, json, created, owner)
  redis.call('SET', prefix .. 'k:' .. hash, json)
  redis.call('SET', prefix .. 'id:' .. id, hash)
  redis.call('ZADD', prefix .. 'ids', created, id)
  if owner ~= '' then redis.call('ZADD', prefix .. 'owner:' .. owner, created, id) end
end
-- Side effects a change carries (SideEffects): plain data, run after the write in the same script.
local function side_effects(encoded)
  local ops = cjson.decode(encoded)
  if #ops == 0 then return end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _, op in ipairs(ops) do
    local name, key = op[1], op[2]
    if name == 'del' then
      redis.call('DEL', key)
    elseif name == 'hset_stamped' then
      redis.call('HSET', key, op[3], op[4], op[5], now)
    elseif name == 'hadd_clamped' then
      local n = tonumber(redis.call('HGET', key, op[3]) or '0') + tonumber(op[4])
      if n < 0 then n = 0 end
      if n > tonumber(op[5]) then n = tonumber(op[5]) end
      redis.call('HSET', key, op[3], n)
      redis.call('HSETNX', key, op[6], now)
    else
      error('unknown side effect ' .. tostring(name))
    end
  end
end
local function audit(prefix, entries)
  for _, entry in ipairs(cjson.decode(entries)) do
    xadd_both(prefix .. 'audit', prefix .. 'audit:' .. entry[1], entry[2])
  end
end
"""

# A repeat that writes nothing: ARGV prefix, message.
_ANNOUNCE = _ANNOUNCE_LUA + "return announce_and_read(ARGV[1], ARGV[2])\n"

# A new record: ARGV prefix, hash, id, json, created_at, owner or "", audit entries (JSON list of
# [key id, fields]), message, side effects. {0} when a record with that hash exists (nothing written).
_CREATE = (
    _XADD_BOTH
    + _ANNOUNCE_LUA
    + """
local prefix = ARGV[1]
if redis.call('EXISTS', prefix .. 'k:' .. ARGV[2]) == 1 then return {0} end
insert(prefix, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
side_effects(ARGV[9])
audit(prefix, ARGV[7])
return {1, announce_and_read(prefix, ARGV[8])}
"""
)

# Audit entries alone (no record changes): ARGV prefix, entries.
_APPEND_AUDIT = _XADD_BOTH + _ANNOUNCE_LUA + "audit(ARGV[1], ARGV[2])\nreturn 1\n"

# A record and its id, read together: ARGV prefix, id. nil when no such id.
_READ_BY_ID = """
local hash = redis.call('GET', ARGV[1] .. 'id:' .. ARGV[2])
if not hash then return false end
return {hash, redis.call('GET', ARGV[1] .. 'k:' .. hash) or false}
"""

# A change to a record read before, if it is still as read (compare and set): ARGV prefix, hash,
# the JSON read, the new JSON, audit entries, message, side effects, then an optional record to
# insert beside it (rotate: hash, id, json, created_at, owner). {0} when the record changed meanwhile.
_UPDATE = (
    _XADD_BOTH
    + _ANNOUNCE_LUA
    + """
local prefix, k = ARGV[1], ARGV[1] .. 'k:' .. ARGV[2]
if redis.call('GET', k) ~= ARGV[3] then return {0} end
redis.call('SET', k, ARGV[4])
if #ARGV >= 12 then insert(prefix, ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12]) end
side_effects(ARGV[7])
audit(prefix, ARGV[5])
return {1, announce_and_read(prefix, ARGV[6])}
"""
)


# A bulk import's batch (insert_many), atomic: ARGV is the prefix, the announcement, then six values
# a record (hash, id, record JSON, created_at, owner or "", its audit entry's fields as a JSON list).
# A record whose hash exists (or came earlier in the batch) writes nothing. Keys are built here from
# the prefix: Redis Cluster is not supported (docs/deployment.md).
_INSERT_MANY = (
    _XADD_BOTH
    + _ANNOUNCE_LUA
    + """
local prefix = ARGV[1]
local added = {}
for i = 3, #ARGV, 6 do
  local hash, id, json, created, owner = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if redis.call('EXISTS', prefix .. 'k:' .. hash) == 1 then
    added[#added + 1] = 0
  else
    insert(prefix, hash, id, json, created, owner)
    xadd_both(prefix .. 'audit', prefix .. 'audit:' .. id, cjson.decode(ARGV[i + 5]))
    added[#added + 1] = 1
  end
end
return {added, announce_and_read(prefix, ARGV[2])}
"""
)


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis glob pattern (the prefix is the operator's to choose)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


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
