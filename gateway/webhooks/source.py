"""The one reader of the key table's audit stream: key events come from here.

Every change to a key (the admin API on any replica, the bulk import, a policy's disable) is an
entry in the global audit stream, written in the change's own transaction (keytable/store.py). A
consumer group (`webhooks`) on that stream hands each entry to one replica; the replica acks it in
the same Lua script that queues its deliveries (queue.py), so an entry is queued once, and an entry
whose replica died before that stays pending and is claimed by another after `reclaim_ms`.

The group starts at the stream's end when it is first made: changes from before webhooks were
configured are not sent. The stream's format is keytable/store.py's; this module only reads it.

May import: keytable.store.
"""

from __future__ import annotations

import re
from typing import Any, Final, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from gateway.keytable.store import KeyStore, as_text, audit_entry
from gateway.webhooks.queue import Guard

GROUP: Final = "webhooks"
_ID: Final = re.compile(r"([0-9]+)-[0-9]+")

Entry = dict[str, Any]  # as store.audit_entry decodes it: id, at, actor, action, key_id, reason, detail...


class AuditSource:
    def __init__(self, store: KeyStore, consumer: str) -> None:
        self.redis: Redis = store.redis
        self.stream = store.audit_stream
        self.consumer = consumer
        self._reclaim_from = "0-0"

    async def join(self) -> None:
        """Make the consumer group if there is none (at the stream's end; the stream too)."""
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer (waits up to `block_ms` for one)."""
        return await self._read(">", count, block_ms)

    async def unacked(self, count: int) -> list[Entry]:
        """Entries this consumer read and has not acked yet (a step after the read failed), oldest
        first, without waiting: read again at once rather than reclaimed after `reclaim_ms`."""
        return await self._read("0", count, None)

    async def _read(self, since: str, count: int, block_ms: int | None) -> list[Entry]:
        try:
            reply = await self.redis.xreadgroup(GROUP, self.consumer, {self.stream: since}, count=count, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.join()  # the stream or the group was deleted (FLUSHDB): start again at its end
            return []
        rows: list[Any] = []
        for _stream, entries in cast(list[Any], reply or []):
            rows += entries
        return [self._decoded(entry_id, fields) for entry_id, fields in rows if fields is not None]

    async def reclaim(self, min_idle_ms: int, count: int) -> list[Entry]:
        """Entries another consumer read and never acked for `min_idle_ms` (it died): now ours."""
        try:
            reply = await self.redis.xautoclaim(
                self.stream, GROUP, self.consumer, min_idle_ms, start_id=self._reclaim_from, count=count)  # fmt: skip
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.join()
            return []
        self._reclaim_from = as_text(reply[0])
        return [self._decoded(entry_id, fields) for entry_id, fields in reply[1] if fields is not None]

    async def forget_idle_consumers(self, idle_ms: int) -> int:
        """Remove consumers (replicas gone) with nothing pending and idle this long."""
        removed = 0
        for info in await self.redis.xinfo_consumers(self.stream, GROUP):
            name = as_text(info["name"])
            if name != self.consumer and int(info["pending"]) == 0 and int(info["idle"]) >= idle_ms:
                removed += int(await self.redis.xgroup_delconsumer(self.stream, GROUP, name))
        return removed

    def guard(self, entry: Entry) -> Guard:
        """The enqueue guard that acks `entry` (queue.py): the entry is queued by whoever acks it."""
        return Guard("ack", (self.stream, GROUP, entry["id"]))

    @staticmethod
    def _decoded(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Entry:
        entry = audit_entry(as_text(entry_id), fields)
        match = _ID.fullmatch(entry["id"])
        entry["_ms"] = int(match[1]) if match else 0  # the stream id's time: when the change was written
        return entry
