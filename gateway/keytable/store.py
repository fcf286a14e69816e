"""The key table and audit log in Redis: the only module that knows the key layout.

Layout, every name under `redis.prefix` (P):
  P k:<sha256>       record JSON (the request path's one GET)
  P idix:<4 hex>     which key has an id: 65,536 hashes bucketed by the first 4 hex digits of
                     SHA-1(key id), as the audit index is: field <id> = the key's SHA-256, its 32
                     bytes (not hex). ~70 bytes a key at 1M keys where a string per id cost ~170,
                     and half as many Redis keys for the key filter's SCAN to walk (docs/scale.md).
  P id:<id>          the same as a string (hex): the layout before idix, still read (after idix),
                     written beside idix only until `P ids-bucketed` is set, moved into idix by
                     `migrate_ids` once no replica of an earlier version is live.
  P ids-bucketed     set when writes stopped writing P id:<id> ("moving"; "moved <time>" once
                     every earlier P id:<id> was moved). P id-readers: replicas that read idix.
  P ids              sorted set of ids by creation time (listing; every key ever created: the key
                     filter reads the id index instead of a SCAN when the two agree, see
                     `indexed_prefixes`)
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
import itertools
import logging
import re
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from gateway.errors import ErrorCode
from gateway.keytable.keyfilter import Checkpoint, Prefixes
from gateway.keytable.record import SHA256_HEX, KeyRecord, rfc3339

log = logging.getLogger("gateway.store")


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
    # Below this many keys the key filter is built by the SCAN even from a complete id index: the
    # index read costs ~0.5 s whatever the table's size (65,536 replies, each ~5-8 us of the
    # gateway's time), the SCAN ~1.5-2 us a Redis key (measured: 100k keys 0.18 s against 0.53-0.69
    # s; 300k 0.47-0.54 s against 0.56-0.71 s; 1M 1.8-3.0 s against 0.66-0.9 s; docs/scale.md).
    index_min = 250_000

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
        self.filter_source = ""  # what the last hash_prefixes read: "index" (the id index) or "scan"

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

    async def hash_prefixes(self, count: int = 5000) -> AsyncIterator[Prefixes]:
        """Every key hash in the table as its first 64 bits, in batches (the key filter's rebuild at
        scale): every record present when it begins is in them. From the id index when it is known
        complete (`indexed_prefixes`: ~0.3 s of Redis time for 1M keys), else from a SCAN of the
        key space (`scanned_prefixes`: 1.4-2 s). `filter_source` says which the last call took."""
        indexed = await self.indexed_prefixes()
        self.filter_source = "scan" if indexed is None else "index"
        if indexed is not None:
            for batch in indexed:
                yield batch
            return
        scan = self.scanned_prefixes(count)
        try:
            async for batch in scan:
                yield batch
        finally:  # closed early (a break): the scan's connection is closed now, not when collected
            await scan.aclose()

    async def indexed_prefixes(self, chunk: int = 1024) -> list[Prefixes] | None:
        """Every key hash as its first 64 bits, read from the id index (`HVALS` of its 65,536 buckets,
        `chunk` buckets a pipelined batch, each batch sent before the one before it is decoded, on a
        connection of its own); None when the index is not known to hold every record, or the table
        is smaller than `index_min` keys (a SCAN is then cheaper), and the caller must scan instead.

        Known complete: `P ids-bucketed` says "moved" (no `P id:<id>` of the layout before is left
        to move: without it the index is not read at all), and the fields read equal the members of
        `P ids`, read by a ZCARD on the same connection after the last HVALS. Why equality proves
        it, without a race with concurrent writes (docs/scale.md, "The key filter at scale"):
          - an `ids` member and an index field are only ever added, never removed (keys are never
            deleted; rotated-away and revoked keys keep both);
          - every record's id is in `ids` (insert() writes the record, its `ids` member and, from
            this version on, its index field in one script; every earlier version wrote `ids` too);
          - every index field names an id in `ids` with its record's hash (insert() writes both;
            migrate_ids moves `P id:<id>` strings, which insert() wrote beside the `ids` member).
        So with `fields(t)` the index's fields and `ids(t)` the members at time t, fields(t) is a
        subset of ids(t), and each bucket only grows: what the pass reads, bucket by bucket at
        times up to T (the ZCARD's), is at most |fields(T)| <= |ids(T)|. Equality with |ids(T)|
        therefore means the pass read exactly fields(T) = ids(T): every record there at T, so
        every record there when the subscription went live (before this began). A record without
        its field (an earlier version's replica writing only `P id:<id>` after the move, which
        still adds to `ids`; a field that is not 32 bytes) makes the read short of the count: a
        mismatch, and the scan. A create during the pass can do the same (its field in a bucket
        already read, its `ids` member counted): also a mismatch, so a start during a bulk import
        scans; never a false match. Only writing the index by hand (a field without its `ids`
        member) could mask a missing one: the Redis structures are the gateway's own (spec), and a
        record written by hand is found only by the scan (docs/scale.md)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.prefix + "ids-bucketed")
            pipe.zcard(self.prefix + "ids")
            state, size = await pipe.execute()
        if state is None or not as_text(state).startswith("moved"):
            return None
        if int(size) < self.index_min:  # a small table: its SCAN costs less than 65,536 replies
            return None
        # Packed here, each batch one write: redis-py's packing took ~0.4 s of the ~1.5 s on 1M keys.
        head = f"{self.prefix}idix:".encode()
        commands = [b"*2\r\n$5\r\nHVALS\r\n$%d\r\n%s%04x\r\n" % (len(head) + 4, head, i) for i in range(_BUCKETS)]
        chunks = [commands[i : i + chunk] for i in range(0, len(commands), chunk)]
        sends = [b"".join(part) for part in chunks]
        # After every HVALS, on the same connection: the count they must match (see above).
        ids = f"{self.prefix}ids".encode()
        sends[-1] += b"*2\r\n$5\r\nZCARD\r\n$%d\r\n%s\r\n" % (len(ids), ids)
        conn = await self._own_connection()
        pool = self.redis.connection_pool
        pending = 0  # replies sent for and not yet read
        batches: list[Prefixes] = []
        fields = 0
        try:
            for n in range(min(2, len(sends))):
                await conn.send_packed_command(sends[n])
                pending += len(chunks[n]) + (n == len(sends) - 1)
            for n, part in enumerate(chunks):
                replies = []
                for _ in part:
                    replies.append(await conn.read_response(disable_decoding=True))
                    pending -= 1
                if n + 2 < len(sends):  # two batches in flight: Redis works while this one is decoded
                    await conn.send_packed_command(sends[n + 2])
                    pending += len(chunks[n + 2]) + (n + 2 == len(sends) - 1)
                values = list(itertools.chain.from_iterable(cast(list[list[bytes]], replies)))
                batch = _index_prefixes(values)
                fields += len(batch)
                if len(batch):
                    batches.append(batch)
            listed = int(await conn.read_response())
            pending -= 1
        except ResponseError as exc:  # a bucket that is not a hash (not written by the gateway)
            log.warning("key filter: the id index could not be read (%s); scanning the table instead", exc)
            return None
        finally:
            if pending:  # stopped early (a break, an error): replies may come that no one reads
                with contextlib.suppress(Exception):
                    await conn.disconnect()
            await pool.release(conn)
        if fields != listed:
            log.info("key filter: the id index holds %d key(s), the table lists %d; scanning the table instead",
                     fields, listed)  # fmt: skip
            return None
        return batches

    async def _own_connection(self) -> Any:
        """A connection of the command client's pool, driven by hand (given back with pool.release)."""
        pool = self.redis.connection_pool
        connect = cast(Callable[..., Awaitable[Any]], pool.get_connection)
        try:
            return await connect()  # redis-py >= 5.3 (which deprecates its arguments)
        except TypeError:
            return await connect("SCAN")  # before 5.3 the command's name is required

    async def scanned_prefixes(self, count: int = 5000) -> AsyncGenerator[Prefixes, None]:
        """Every key hash in the table as its first 64 bits, a SCAN reply at a time (what `hashes`
        returns, with the same guarantee). Names are decoded with
        numpy, and each reply while Redis already works on the next SCAN (sent before the decode):
        on a 1M-key table the scan takes Redis's own SCAN time plus ~0.3 s. `count`: SCAN's COUNT,
        the buckets Redis walks a call (about 5-8 ms of its time at 5,000 on this machine,
        docs/scale.md)."""
        head = self._k("").encode()
        command = ("SCAN", "MATCH", _glob_escape(self._k("")) + "*", "COUNT", count)
        # A connection of its own, driven by hand: the next SCAN is on the wire before this reply is
        # decoded (with `await redis.scan()` in a task it went out only once the decode was done).
        pool = self.redis.connection_pool
        conn = await self._own_connection()
        in_flight = False
        try:
            await conn.send_command(command[0], 0, *command[1:])
            in_flight = True
            while True:
                cursor, names = await conn.read_response()
                in_flight = False
                if int(cursor) != 0:
                    await conn.send_command(command[0], cursor, *command[1:])
                    in_flight = True
                batch = _prefixes(names, len(head))
                if len(batch):
                    yield batch
                if int(cursor) == 0:
                    return
        finally:
            if in_flight:  # stopped early (a break, an error): a reply may come that no one reads
                with contextlib.suppress(Exception):
                    await conn.disconnect()
            await pool.release(conn)

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
            hashes += [h for h in await self._hashes_of(ordered[start : start + 1000]) if h is not None]
        return hashes

    async def get_by_id(self, key_id: str) -> KeyRecord | None:
        raw = await self._raw_by_id(key_id)
        return None if raw is None else KeyRecord.from_json(raw[1])

    async def record_by_id(self, key_id: str) -> KeyRecord | Unreadable | None:
        """The record with this id for the admin API: one that does not decode is `Unreadable`."""
        raw = await self._raw_by_id(key_id)
        return None if raw is None else _decoded(key_id, raw[1])

    async def _raw_by_id(self, key_id: str) -> tuple[str, bytes | str] | None:
        """(hash, stored JSON) of the key with this id, either layout (idix, else P id:<id>): one
        round trip; None when no such id or its record is gone."""
        read = await self._read_by_id(args=[self.prefix, key_id])
        if not read or not read[1]:
            return None
        return as_text(read[0]), read[1]

    async def _hashes_of(self, key_ids: list[str]) -> list[str | None]:
        """The key hash of each id, either layout (idix first, then P id:<id>), one pipelined round
        trip; None where there is no such id (or what is stored is not a key hash)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hget(self.id_index(key_id), key_id)
                pipe.get(self._id(key_id))
            replies = await pipe.execute()
        out: list[str | None] = []
        for bucketed, legacy in zip(replies[::2], replies[1::2], strict=True):
            if bucketed is not None and len(raw := as_bytes(bucketed)) == 32:
                out.append(raw.hex())
            elif legacy is not None and SHA256_HEX.fullmatch(text := as_text(legacy)):
                out.append(text)
            else:
                out.append(None)
        return out

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
            hashes = await self._hashes_of(ids)
            present = [(i, h) for i, h in zip(ids, hashes, strict=True) if h is not None]
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
        return f"{self.prefix}auditix:{_bucket(key_id)}"

    def id_index(self, key_id: str) -> str:
        """The hash holding `key_id`'s key hash (the bucket the change scripts' insert() computes alike)."""
        return f"{self.prefix}idix:{_bucket(key_id)}"

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

    async def migrate_ids(self, replica_id: str) -> int | None:
        """Move every `P id:<id>` of the layout before the id index into it; how many were moved, or
        None when not now: a live replica has not declared that it reads the index (an earlier
        version, which reads only `P id:<id>`), so the writes go on writing both; try again later.

        The first step declares this replica a reader (`P id-readers`) and, in the same script, if
        every live replica is one, sets `P ids-bucketed`: from then on writes write only the index.
        Then a SCAN moves each earlier `P id:<id>` (one script a SCAN reply: into the index unless
        it has the id already, then deleted). A complete pass marks `P ids-bucketed` "moved", and
        later starts skip the scan. Idempotent, safe on several replicas at once and while keys
        are written: the index is read first and `P id:<id>` after it, so either layout answers."""
        marker = self.prefix + "ids-bucketed"
        state = await self.redis.eval(
            _IDS_GATE, 3, self.prefix + "replicas", self.prefix + "id-readers", marker, replica_id
        )
        if as_text(state).startswith("moved"):
            return 0
        if as_text(state) != "moving":
            return None
        head = self.prefix + "id:"
        moved = 0
        cursor = 0
        while True:
            reply, names = await self.redis.scan(cursor, match=_glob_escape(head) + "*", count=1000)
            cursor = int(reply)
            if names:
                moved += int(await self.redis.eval(_MIGRATE_IDS, len(names), *names, self.prefix, len(head)))
            if int(cursor) == 0:
                break
        await self.redis.set(marker, "moved " + (rfc3339(time.time()) or ""))
        await self.redis.delete(self.prefix + "id-readers")
        return moved

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
        *fields, raw_hash = self._record_args(record)
        args = [self.prefix, *fields, self._audit_args(audit)]
        async with self._writing() as client:
            # A negative answer cached anywhere for this hash must go too.
            message = announcer.message([(record.hash, record.version)])
            reply = await self._create(args=[*args, message, effects.encoded(), raw_hash], client=client)
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
                     bytes.fromhex(record.hash), orjson.dumps(fields).decode()]  # fmt: skip
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
        return [record.hash, record.id, record.to_json(), repr(record.created_at), record.owner or "",
                bytes.fromhex(record.hash)]  # fmt: skip

    def _audit_args(self, entries: list[AuditEntry]) -> str:
        """Audit entries as the change scripts' audit() takes them: [key id, flat fields] each."""
        now = time.time()
        flat = [[e.key_id, [part for pair in e.fields(now).items() for part in pair]] for e in entries]
        return orjson.dumps(flat).decode()


# One audit entry: XADD to the global stream, then its id appended to the key's field in its
# index bucket (P auditix:<first 4 hex of SHA-1(id)>, as audit_index() names it). Part of every
# change's script, so both happen with the change or not at all.
_AUDIT_INDEXED = """
local function audit_indexed(stream, bucket, key_id, fields)
  local id = redis.call('XADD', stream, '*', unpack(fields))
  local ids = redis.call('HGET', bucket, key_id)
  redis.call('HSET', bucket, key_id, ids and (ids .. ' ' .. id) or id)
  return id
end
"""

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

# The id index's gate (store.migrate_ids): KEYS live replicas (coherence/replicas.py), the readers of
# the index, P ids-bucketed; ARGV this replica. This replica is declared a reader; then, unless set
# already, P ids-bucketed is set to "moving" if every live replica is a reader. Its value, or
# "wait <replica>" naming a live replica that is not (yet) one.
_IDS_GATE = """
redis.call('HSET', KEYS[2], ARGV[1], '1')
local state = redis.call('GET', KEYS[3])
if state then return state end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  if redis.call('HEXISTS', KEYS[2], id) == 0 then return 'wait ' .. id end
end
redis.call('SET', KEYS[3], 'moving')
return 'moving'
"""

# Earlier P id:<id> strings moved into the id index: KEYS the names (a SCAN reply), ARGV prefix and
# the length of P id:. A name that is not a string holding a key hash is left alone (not ours).
_MIGRATE_IDS = """
local moved = 0
for _, name in ipairs(KEYS) do
  if redis.call('TYPE', name).ok == 'string' then
    local hash = redis.call('GET', name)
    if #hash == 64 and string.match(hash, '^[0-9a-f]+$') then
      local id = string.sub(name, tonumber(ARGV[2]) + 1)
      local raw = string.gsub(hash, '..', function(cc) return string.char(tonumber(cc, 16)) end)
      redis.call('HSETNX', ARGV[1] .. 'idix:' .. string.sub(redis.sha1hex(id), 1, 4), id, raw)
      redis.call('DEL', name)
      moved = moved + 1
    end
  end
end
return moved
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
-- A new record. `raw`: its hash's 32 bytes, for the id index (P idix:, see store.py); P id:<id>
-- too until P ids-bucketed is set (a replica of an earlier version, which reads only that, may be live).
local function insert(prefix, hash, id, json, created, owner, raw)
  redis.call('SET', prefix .. 'k:' .. hash, json)
  redis.call('HSET', prefix .. 'idix:' .. string.sub(redis.sha1hex(id), 1, 4), id, raw)
  if redis.call('EXISTS', prefix .. 'ids-bucketed') == 0 then redis.call('SET', prefix .. 'id:' .. id, hash) end
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
    local bucket = prefix .. 'auditix:' .. string.sub(redis.sha1hex(entry[1]), 1, 4)
    audit_indexed(prefix .. 'audit', bucket, entry[1], entry[2])
  end
end
"""

# A repeat that writes nothing: ARGV prefix, message.
_ANNOUNCE = _ANNOUNCE_LUA + "return announce_and_read(ARGV[1], ARGV[2])\n"

# A new record: ARGV prefix, hash, id, json, created_at, owner or "", audit entries (JSON list of
# [key id, fields]), message, side effects, the hash's 32 bytes. {0} when a record with that hash
# exists (nothing written).
_CREATE = (
    _AUDIT_INDEXED
    + _ANNOUNCE_LUA
    + """
local prefix = ARGV[1]
if redis.call('EXISTS', prefix .. 'k:' .. ARGV[2]) == 1 then return {0} end
insert(prefix, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[10])
side_effects(ARGV[9])
audit(prefix, ARGV[7])
return {1, announce_and_read(prefix, ARGV[8])}
"""
)

# Audit entries alone (no record changes): ARGV prefix, entries.
_APPEND_AUDIT = _AUDIT_INDEXED + _ANNOUNCE_LUA + "audit(ARGV[1], ARGV[2])\nreturn 1\n"

# A record and its id, read together: ARGV prefix, id. nil when no such id. The id index (32 bytes,
# shown as hex), else P id:<id> (the layout before it: tables not yet moved, replicas of an earlier version).
_READ_BY_ID = """
local raw = redis.call('HGET', ARGV[1] .. 'idix:' .. string.sub(redis.sha1hex(ARGV[2]), 1, 4), ARGV[2])
local hash
if raw and #raw == 32 then
  hash = string.gsub(raw, '.', function(c) return string.format('%02x', string.byte(c)) end)
else
  hash = redis.call('GET', ARGV[1] .. 'id:' .. ARGV[2])
end
if not hash then return false end
return {hash, redis.call('GET', ARGV[1] .. 'k:' .. hash) or false}
"""

# A change to a record read before, if it is still as read (compare and set): ARGV prefix, hash,
# the JSON read, the new JSON, audit entries, message, side effects, then an optional record to
# insert beside it (rotate: hash, id, json, created_at, owner, the hash's 32 bytes). {0} when the
# record changed meanwhile.
_UPDATE = (
    _AUDIT_INDEXED
    + _ANNOUNCE_LUA
    + """
local prefix, k = ARGV[1], ARGV[1] .. 'k:' .. ARGV[2]
if redis.call('GET', k) ~= ARGV[3] then return {0} end
redis.call('SET', k, ARGV[4])
if #ARGV >= 13 then insert(prefix, ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13]) end
side_effects(ARGV[7])
audit(prefix, ARGV[5])
return {1, announce_and_read(prefix, ARGV[6])}
"""
)


# A bulk import's batch (insert_many), atomic: ARGV is the prefix, the announcement, then seven values
# a record (hash, id, record JSON, created_at, owner or "", the hash's 32 bytes, its audit entry's
# fields as a JSON list).
# A record whose hash exists (or came earlier in the batch) writes nothing. Keys are built here from
# the prefix: Redis Cluster is not supported (docs/deployment.md).
_INSERT_MANY = (
    _AUDIT_INDEXED
    + _ANNOUNCE_LUA
    + """
local prefix = ARGV[1]
local added = {}
for i = 3, #ARGV, 7 do
  local hash, id, json, created, owner = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if redis.call('EXISTS', prefix .. 'k:' .. hash) == 1 then
    added[#added + 1] = 0
  else
    insert(prefix, hash, id, json, created, owner, ARGV[i + 5])
    local bucket = prefix .. 'auditix:' .. string.sub(redis.sha1hex(id), 1, 4)
    audit_indexed(prefix .. 'audit', bucket, id, cjson.decode(ARGV[i + 6]))
    added[#added + 1] = 1
  end
end
return {added, announce_and_read(prefix, ARGV[2])}
"""
)


_NIBBLE = np.full(256, 255, dtype=np.uint8)  # a lowercase hex digit's value; 255 for any other byte
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)
_SHIFTS = np.arange(60, -4, -4, dtype=np.uint64)  # where each of the first 16 digits goes in 64 bits


def _prefixes(names: list[bytes] | list[str], start: int) -> Prefixes:
    """The first 64 bits of each name's digest (the name less its first `start` characters), for
    the names that are a record of the table: 64 lowercase hex digits after `start`."""
    size = start + 64
    raws = cast(list[bytes], names if not names or isinstance(names[0], bytes) else [as_bytes(n) for n in names])
    # Every name ours, as a rule: one join. The lengths are checked one by one (in C), not by the
    # joined total: a shorter and a longer name of someone else's would add up to two of ours and
    # shift every row after them.
    if set(map(len, raws)) <= {size}:
        joined = b"".join(raws)
    else:  # some other name under the prefix: only those that fit
        joined = b"".join(raw for raw in raws if len(raw) == size)
    rows = np.frombuffer(joined, dtype=np.uint8).reshape(-1, size)[:, start:]
    nibbles = _NIBBLE[rows]
    valid = (nibbles < 16).all(axis=1)  # lowercase hex only, as SHA256_HEX: not ours otherwise
    prefixes: Prefixes = (nibbles[valid, :16].astype(np.uint64) << _SHIFTS).sum(axis=1, dtype=np.uint64)
    return prefixes


_BUCKETS = 65_536  # P idix:<4 hex> and P auditix:<4 hex>: every 4-hex-digit bucket name


def _index_prefixes(values: list[bytes]) -> Prefixes:
    """The first 64 bits of each id index value (a key's SHA-256, its 32 bytes), for the values
    that are 32 bytes (any other is not the gateway's: left out, so the caller's count check fails)."""
    # Every value 32 bytes, as a rule: one join; lengths checked one by one, as in _prefixes (a
    # 31- and a 33-byte value add up to two of 32, and would shift the rest and pass the count).
    if set(map(len, values)) <= {32}:
        joined = b"".join(values)
    else:
        joined = b"".join(value for value in values if len(value) == 32)
    return np.frombuffer(joined, dtype=">u8")[::4].astype(np.uint64)


def _bucket(key_id: str) -> str:
    """A key id's index bucket (P auditix:, P idix:): the first 4 hex digits of its SHA-1, as the
    scripts compute it (redis.sha1hex)."""
    return hashlib.sha1(key_id.encode(), usedforsecurity=False).hexdigest()[:4]


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
