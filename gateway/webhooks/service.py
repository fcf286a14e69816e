"""One replica's part in delivering webhooks: intake, delivery per endpoint, the expiry check.

Started by the runtime (runtime/replica.py) only when `webhooks:` is configured, stopped with the
replica. Every replica runs the same loops; Redis decides who does what (queue.py, source.py):
- intake: reads the audit stream through the consumer group and queues each entry's event for
  every endpoint subscribed to it, acking the entry in the same script; it also takes over entries
  a dead replica read but never acked;
- delivery, one loop per endpoint: claims due attempts (at most `concurrency` in flight), posts
  each signed (signing.py) with a `timeout_seconds` bound, then finishes it: done on 2xx, else
  scheduled again (schedule.py) or, past the retry horizon, dropped with a metric and a log line;
- the expiry check, every `check_seconds`: key.expiring_soon once per key and expiry.

Logs and metrics name an endpoint by its configured name: never its URL (which may carry
credentials) nor its secret; a failed attempt is described by status code or exception type only.

May import: webhooks.*, keytable, config, metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterable
from typing import Final

import aiohttp

from gateway.config import WebhookEndpoint, WebhooksConfig
from gateway.keytable.record import KeyRecord
from gateway.keytable.store import KeyStore
from gateway.metrics import Metrics
from gateway.webhooks import events, signing
from gateway.webhooks.events import Event
from gateway.webhooks.queue import Guard, Job, NewJob, Queue
from gateway.webhooks.schedule import Schedule
from gateway.webhooks.source import AuditSource, Entry

log = logging.getLogger("gateway.webhooks")

VISIBILITY_MARGIN: Final = 5.0  # seconds past the request timeout before an attempt in flight is taken back
RECLAIM_SECONDS: Final = 30.0  # an audit entry read and not acked this long is taken over (its replica died)
INTAKE_BATCH: Final = 100
EXPIRY_BATCH: Final = 1000  # keys checked for key.expiring_soon per round
CONSUMER_IDLE_MS: Final = 24 * 3600 * 1000  # a consumer (a replica gone) idle this long with nothing pending is removed
SEED_LEASE_SECONDS: Final = 600
JOIN_SECONDS: Final = 5.0  # start() waits this long for the consumer group before leaving it to the intake loop
USER_AGENT: Final = "gateway-webhooks/1"
_EXPIRY_ACTIONS: Final = frozenset({"create", "import", "rotate"})  # changes that set a key's expires_at


class Webhooks:
    def __init__(
        self,
        config: WebhooksConfig,
        store: KeyStore,
        metrics: Metrics,
        replica_id: str,
        *,
        schedule: Schedule | None = None,
        poll_seconds: float = 1.0,
        reclaim_seconds: float = RECLAIM_SECONDS,
        block_ms: int = 500,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.replica_id = replica_id
        self.queue = Queue(store.redis, store.prefix)
        self.source = AuditSource(store, replica_id)
        self.schedule = schedule or Schedule(
            config.retry_initial_seconds, config.retry_max_interval_seconds, config.retry_hours * 3600
        )
        self.poll_seconds = poll_seconds
        self.reclaim_ms = int(reclaim_seconds * 1000)
        self.block_ms = block_ms
        self.visibility_ms = int((config.timeout_seconds + VISIBILITY_MARGIN) * 1000)
        self._wake = {ep.name: asyncio.Event() for ep in config.endpoints}
        self._loops: list[asyncio.Task[None]] = []
        self._inflight: dict[asyncio.Task[None], Job] = {}
        self._session: aiohttp.ClientSession | None = None
        self._claims = itertools.count()

    # lifetime ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.concurrency * len(cfg.endpoints)),
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_seconds),
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,
        )
        # The consumer group is made before the replica serves (the runtime starts its listeners after
        # this): it starts at the stream's end, so a change written before it exists is never read,
        # and the intake task may run only after the replica's first change (a loaded machine).
        try:
            await asyncio.wait_for(self.source.join(), JOIN_SECONDS)
        except Exception as exc:  # Redis down: the intake loop joins when it can, as it would after a FLUSHDB
            log.warning("webhooks: making the consumer group failed (%s); retrying", type(exc).__name__)
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._intake_loop(), name="webhooks-intake"),
            loop.create_task(self._expiry_loop(), name="webhooks-expiry"),
            *(loop.create_task(self._deliver_loop(ep), name=f"webhooks-{ep.name}") for ep in cfg.endpoints),
        ]
        log.info("webhooks: %d endpoint(s): %s", len(cfg.endpoints), ", ".join(ep.name for ep in cfg.endpoints))

    async def stop(self) -> None:
        """Stop the loops; attempts in flight are cancelled and handed back (due now, their attempt
        counted), so another replica takes them without waiting for the visibility timeout."""
        await _cancel(self._loops)
        inflight = dict(self._inflight)
        await _cancel(inflight)
        for job in inflight.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.queue.finish(job, "release"), 1.0)
        if self._session is not None:
            await self._session.close()

    # intake ------------------------------------------------------------------------------

    async def _intake_loop(self) -> None:
        loop = asyncio.get_running_loop()
        joined = False
        next_reclaim = next_cleanup = 0.0
        failures = 0
        # After a failure, entries this replica read but did not queue (the rest of a batch) are read
        # again before new ones, not left for `reclaim_seconds`. Not after a failure while queueing
        # those: an entry that always fails then holds up nothing (reclaimed, and failing, now and then).
        unacked = retaking = False
        while True:
            try:
                if not joined:
                    await self.source.join()
                    joined = True
                now = loop.time()
                if now >= next_reclaim:
                    next_reclaim = now + self.reclaim_ms / 2000
                    for entry in await self.source.reclaim(self.reclaim_ms, INTAKE_BATCH):
                        await self.take(entry)
                if now >= next_cleanup:
                    next_cleanup = now + 3600
                    await self.source.forget_idle_consumers(CONSUMER_IDLE_MS)
                if unacked:
                    entries = await self.source.unacked(INTAKE_BATCH)
                    retaking = True
                    for entry in entries:
                        await self.take(entry)
                    unacked = retaking = False
                for entry in await self.source.read(INTAKE_BATCH, self.block_ms):
                    await self.take(entry)
                failures = 0
            except Exception as exc:  # Redis down, a bad entry: logged by type (no message can leak here), retried
                failures += 1
                unacked, retaking = not retaking, False
                log.warning("webhooks intake failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(min(5.0, 0.2 * failures))

    async def take(self, entry: Entry) -> None:
        """Queue one audit entry's event for its endpoints and ack the entry, atomically."""
        key_id = entry.get("key_id")
        record = await self._record(key_id) if isinstance(key_id, str) else None
        event = events.from_audit(entry, entry["_ms"] / 1000, record)
        expiry: list[tuple[str, int | None]] = []
        if entry.get("action") in _EXPIRY_ACTIONS and record is not None and record.expires_at is not None:
            expiry.append((record.id, None if record.revoked else int(record.expires_at * 1000)))
        jobs = self._jobs(event) if event is not None else []
        result = await self.queue.enqueue(self.source.guard(entry), jobs, self.config.max_queue, expiry)
        if result is not None and event is not None:
            self._queued(event, jobs, result)

    def _jobs(self, event: Event) -> list[NewJob]:
        endpoints = [ep for ep in self.config.endpoints if event.type in ep.events]
        if event.oversized:
            for ep in endpoints:
                self.metrics.webhooks_dropped.labels(ep.name, "too_large").inc()
                log.warning("webhook dropped: %s %s is over %d bytes", event.type, event.msg_id, events.MAX_BODY_BYTES,
                            extra={"endpoint": ep.name})  # fmt: skip
            return []
        return [(ep.name, event.msg_id, event.type, event.at, event.body) for ep in endpoints]

    def _queued(self, event: Event, jobs: list[NewJob], result: list[int]) -> None:
        for (endpoint, *_), outcome in zip(jobs, result, strict=True):
            if outcome == 1:
                self._wake[endpoint].set()
                log.debug("webhook queued: %s %s", event.type, event.msg_id, extra={"endpoint": endpoint})
            elif outcome == -1:
                self.metrics.webhooks_dropped.labels(endpoint, "queue_full").inc()
                log.warning("webhook dropped: %s %s: the endpoint's queue holds webhooks.max_queue (%d) events",
                            event.type, event.msg_id, self.config.max_queue, extra={"endpoint": endpoint})  # fmt: skip

    async def _record(self, key_id: str) -> KeyRecord | None:
        try:
            return await self.store.get_by_id(key_id)
        except ValueError:  # a record that does not decode: the event goes without name and owner
            return None

    # key.expiring_soon --------------------------------------------------------------------

    async def _expiry_loop(self) -> None:
        while True:
            try:
                await self._seed()
                await self.check_expiring()
            except Exception as exc:
                log.warning("webhooks expiry check failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(self.config.check_seconds)

    async def _seed(self) -> None:
        """Once for a deployment: index the expiry of keys created before the index existed."""
        if not await self.queue.seeding(SEED_LEASE_SECONDS):
            return
        now = time.time()
        async for key_hash in self.store.hashes():
            try:
                record = await self.store.get_by_hash(key_hash)
            except ValueError:
                continue
            if record is not None and record.expires_at is not None and not record.revoked and record.expires_at > now:
                await self.queue.index_expiry(record.id, int(record.expires_at * 1000), only_new=True)
        await self.queue.seeded()

    async def check_expiring(self) -> None:
        now = time.time()
        horizon = self.config.expiring_soon_seconds
        for key_id, expires_ms in await self.queue.expiring(int((now + horizon) * 1000), EXPIRY_BATCH):
            record = await self._record(key_id)
            if record is None or record.revoked or record.expires_at is None or record.expires_at <= now:
                await self.queue.forget_expiry(key_id, expires_ms)  # gone, revoked, no expiry, expired already
                continue
            current = int(record.expires_at * 1000)
            if current != expires_ms:  # changed since it was indexed: checked at its new expiry
                await self.queue.index_expiry(key_id, current)
                continue
            event = events.expiring_soon(record, now)
            jobs = self._jobs(event)
            guard = Guard("expiry", (key_id, str(expires_ms), ""))
            result = await self.queue.enqueue(guard, jobs, self.config.max_queue)
            if result is not None:
                self._queued(event, jobs, result)

    # delivery ----------------------------------------------------------------------------

    async def _deliver_loop(self, ep: WebhookEndpoint) -> None:
        loop = asyncio.get_running_loop()
        inflight: set[asyncio.Task[None]] = set()
        wake = self._wake[ep.name]
        failures = 0
        while True:
            free = self.config.concurrency - len(inflight)
            if free <= 0:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            wake.clear()
            try:
                claimed = await self.queue.claim(ep.name, free, self.visibility_ms, self._token())
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning("webhooks claim failed (%s); retrying", type(exc).__name__, extra={"endpoint": ep.name})
                await asyncio.sleep(min(5.0, 0.2 * failures))
                continue
            self.metrics.webhooks_queued.labels(ep.name).set(claimed.queued)
            for job in claimed.jobs:
                task = loop.create_task(self._attempt(ep, job), name=f"webhook-{ep.name}")
                inflight.add(task)
                self._inflight[task] = job
                task.add_done_callback(inflight.discard)
                task.add_done_callback(self._inflight.pop)
            if len(claimed.jobs) == free:
                continue  # more may be due
            wait = self.poll_seconds
            if claimed.next_due_ms is not None:
                wait = min(wait, max(0.01, (claimed.next_due_ms - claimed.now_ms) / 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)

    def _token(self) -> str:
        return f"{self.replica_id}:{next(self._claims)}"

    async def _attempt(self, ep: WebhookEndpoint, job: Job) -> None:
        started = time.monotonic()
        ok, why = await self._post(ep, job)
        now = job.claimed_ms / 1000 + (time.monotonic() - started)  # Redis time, as the queue keeps it
        fields = {"endpoint": ep.name, "webhook_id": job.msg_id, "event": job.type, "attempt": job.attempt}
        try:
            if ok:
                self.metrics.webhooks_delivered.labels(ep.name).inc()
                await self.queue.finish(job, "done")
                log.info("webhook delivered: %s %s, attempt %d", job.type, job.msg_id, job.attempt, extra=fields)
                return
            due = self.schedule.next_due(job.attempt, job.at, now)
            if due is None:
                self.metrics.webhooks_dropped.labels(ep.name, "expired").inc()
                await self.queue.finish(job, "drop")
                log.warning("webhook dropped: %s %s failed %d attempt(s) over %.1f h (last: %s)", job.type,
                            job.msg_id, job.attempt, (now - job.at) / 3600, why, extra=fields)  # fmt: skip
                return
            self.metrics.webhooks_retried.labels(ep.name).inc()
            await self.queue.finish(job, "retry", int(due * 1000))
            if due - now < self.poll_seconds:  # sooner than the loop's next look: woken when it is due
                asyncio.get_running_loop().call_later(max(0.0, due - now), self._wake[ep.name].set)
            log.info("webhook attempt %d failed (%s): %s %s, next in %.3g s", job.attempt, why, job.type,
                     job.msg_id, due - now, extra=fields)  # fmt: skip
        except Exception as exc:  # Redis failed: the claim lapses after the visibility timeout and is retried
            log.warning("webhook attempt %d: finishing it failed (%s)", job.attempt, type(exc).__name__, extra=fields)

    async def _post(self, ep: WebhookEndpoint, job: Job) -> tuple[bool, str]:
        """One attempt: (answered 2xx, what happened) - a status or an exception's type, never its text
        (aiohttp's can quote the URL, credentials and all)."""
        assert self._session is not None
        headers = signing.headers(ep.secret, job.msg_id, int(time.time()), job.body)
        headers["Content-Type"] = "application/json"
        headers["webhook-attempt"] = str(job.attempt)  # not part of the standard, nor signed: for receivers' logs
        try:
            async with self._session.post(ep.url, data=job.body, headers=headers, allow_redirects=False) as response:
                return 200 <= response.status < 300, f"status {response.status}"
        except TimeoutError:
            return False, "timeout"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return False, type(exc).__name__


async def _cancel(tasks: Iterable[asyncio.Task[None]], seconds: float = 5.0) -> None:
    """Cancel until each has ended (a cancel inside redis-py's own wait_for can be swallowed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pending = {task for task in tasks if not task.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
