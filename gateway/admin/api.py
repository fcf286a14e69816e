"""Admin API handlers (spec 7): check the caller, parse, change the table, evict, answer."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from gateway import errors
from gateway.admin import bodies
from gateway.admin.auth import MAX_ADMIN_TOKEN_LENGTH, Principal, Throttled, TokenVerifier
from gateway.coherence.propagation import Propagation, Propagator
from gateway.config import KeysConfig
from gateway.errors import Denial
from gateway.h1.headers import trusted_peer
from gateway.keytable import record as keys
from gateway.keytable.credentials import REPEATED_DETAIL, VISIBLE_ASCII, NoBearer, bearer_token
from gateway.keytable.lease import Coherence
from gateway.keytable.record import KeyRecord
from gateway.keytable.store import (
    AuditEntry,
    BadCursor,
    CursorCodec,
    KeyStore,
    NotDurable,
    Refused,
    SideEffects,
    Unreadable,
)  # fmt: skip
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.ratelimit.policy import MAX_CREDITS, CreditPolicy
from gateway.ratelimit.store import RateStore
from gateway.usage.layout import WINDOWS
from gateway.usage.store import UsageStore, last_use_fields

log = logging.getLogger("gateway.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Action = Callable[["AdminApi", web.Request, Principal, str], Awaitable[web.StreamResponse]]
Persistence = Literal["aof", "off", "unknown"]  # Redis AOF, as /readyz reports it (runtime/serve.py)


def json_response(data: Any, request_id: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data),
        content_type="application/json",
        headers={"X-Request-Id": request_id, "Cache-Control": "no-store"},
    )


IMPORT_BATCH = 500  # records a bulk import writes in one transaction, under one announcement
IMPORT_MAX_LINES = 100_000  # lines one bulk import request may carry
IMPORT_MAX_LINE = 16 * 1024  # bytes one line may take
READY_PING_SECONDS = 1.0  # /readyz: a Redis that does not answer PING this fast is not ready


def _ndjson_response(request_id: str) -> web.StreamResponse:
    return web.StreamResponse(
        status=200,
        headers={"Content-Type": "application/x-ndjson", "X-Request-Id": request_id, "Cache-Control": "no-store"},
    )


# A 503 store_unavailable asks the client to come back: Redis may be failing over (spec 13).
RETRY_AFTER: Final = {"Retry-After": "1"}
NOT_DURABLE_DETAIL: Final = (
    "The change was written, but fewer Redis replicas than redis.min_replicas_acked acknowledged it, "
    "so a failover could lose it; retry (changes are idempotent)"
)


class Forbidden(Exception):
    """The caller's role is below what the action needs: 403 insufficient_permissions."""

    def __init__(self, role: str) -> None:
        super().__init__(role)
        self.role = role


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, from where, under which request id: all an action needs of its HTTP request. The
    JSON API and the console (gateway/console) build one each and call the same actions below,
    which check the role again themselves, so neither can do what the other would refuse."""

    principal: Principal
    remote: str | None
    request_id: str

    def need(self, role: str) -> None:
        if not self.principal.may(role):
            raise Forbidden(role)


@dataclass(frozen=True, slots=True)
class Changed:
    """A change in force: the record after it and how it propagated."""

    record: KeyRecord
    propagation: Propagation


@dataclass(frozen=True, slots=True)
class Rotated:
    new: KeyRecord
    old: KeyRecord
    plaintext: str = field(repr=False)
    propagation: Propagation


def requires(role: str) -> Callable[[Action], Callable[[AdminApi, web.Request], Awaitable[web.StreamResponse]]]:
    """Authenticate the caller and check their role before the action runs."""

    def wrap(action: Action) -> Callable[[AdminApi, web.Request], Awaitable[web.StreamResponse]]:
        async def handler(self: AdminApi, request: web.Request) -> web.StreamResponse:
            request_id = errors.request_id_from(request.headers.get("X-Request-Id"))
            principal = await self.authenticate(request)
            if isinstance(principal, Denial):
                return errors.render(principal, request_id, realm=errors.ADMIN_WWW_AUTHENTICATE)
            if not principal.may(role):
                denial = Denial("insufficient_permissions", f"This action requires the {role} role")
                return errors.render(denial, request_id)
            try:
                return await action(self, request, principal, request_id)
            except Forbidden as exc:
                denial = Denial("insufficient_permissions", f"This action requires the {exc.role} role")
                return errors.render(denial, request_id)
            except bodies.BadInput as exc:
                return errors.render(Denial("invalid_request", str(exc)), request_id)
            except Refused as exc:
                return errors.render(Denial(exc.code, exc.detail, status=409), request_id)
            except NotDurable as exc:
                self.metrics.redis_errors.labels("admin_durability").inc()
                log.warning("admin %s: %s within the timeout (redis.min_replicas_acked)", action.__name__, exc,
                            extra={"request_id": request_id})  # fmt: skip
                return errors.render(Denial("store_unavailable", NOT_DURABLE_DETAIL, headers=RETRY_AFTER), request_id)
            except (RedisError, OSError, TimeoutError) as exc:
                self.metrics.redis_errors.labels("admin").inc()
                log.warning("admin %s: redis failed: %s", action.__name__, type(exc).__name__,
                            extra={"request_id": request_id})  # fmt: skip
                return errors.render(Denial("store_unavailable", headers=RETRY_AFTER), request_id)

        return handler

    return wrap


@dataclass
class AdminApi:
    store: KeyStore
    verifier: TokenVerifier
    propagator: Propagator
    coherence: Coherence
    keys_config: KeysConfig
    metrics: Metrics
    persistence: Persistence = "unknown"  # Redis AOF: "aof", "off" or "unknown"; set at startup (runtime/serve.py)
    # What Redis is (spec 13): mode (single, sentinel, embedded), role, connected replicas, the
    # replicas a change waits for; and a warning when an acknowledged change could be lost. Set at startup.
    topology: dict[str, Any] = field(default_factory=dict)
    draining: bool = False  # set on SIGTERM: /readyz answers 503 while in-flight requests finish
    # Signs listing and audit cursors; derived from the configuration unless given, so every
    # replica and worker accepts the others' cursors (see store.CursorCodec).
    cursors: CursorCodec | None = field(default=None, repr=False)
    # config.trusted_proxies: behind one of these, failed token attempts are counted against the
    # client address its X-Forwarded-For names, not against the proxy (see client_address).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # One bulk import batch written at a time per replica: each is one Lua transaction of up to
    # IMPORT_BATCH records (~50 ms of Redis), and a client's concurrent imports would otherwise queue
    # in Redis past the command timeout; here they wait for each other, not on a socket timeout.
    _import_writes: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    usage: UsageStore | None = None  # last use on the records, unused_since, GET /v1/keys/{id}/usage (spec 10)
    usage_flush_seconds: float = 10.0  # how far behind real use the usage figures may be
    # Credit balances (spec 12): written in a change's transaction, read for the record's answer.
    rates: RateStore | None = None

    def __post_init__(self) -> None:
        if self.cursors is None:
            material = [self.store.prefix, *sorted(t.hash for t in self.verifier.tokens)]
            self.cursors = CursorCodec.derived(*material)

    @property
    def _cursors(self) -> CursorCodec:
        assert self.cursors is not None
        return self.cursors

    async def authenticate(self, request: web.Request) -> Principal | Denial:
        token = bearer_token(request.headers.getall("Authorization", ()), MAX_ADMIN_TOKEN_LENGTH, VISIBLE_ASCII)
        if token is NoBearer.MISSING:
            return Denial("missing_token")
        if token is NoBearer.REPEATED:
            return Denial("invalid_request", REPEATED_DETAIL)
        if not isinstance(token, str):
            return Denial("invalid_token")
        outcome = await self.verifier.verify(token, client_address(request, self.trusted_proxies))
        if isinstance(outcome, Throttled):
            why = (
                "Too many admin token verifications are in progress"
                if outcome.busy
                else "Too many failed admin token attempts from this address"
            )
            detail = f"{why}; retry in {outcome.retry_after} s"
            return Denial("too_many_requests", detail, headers={"Retry-After": str(outcome.retry_after)})
        return outcome if outcome is not None else Denial("invalid_token")

    def _audit(self, request: web.Request, principal: Principal, action: str, key_id: str,
               request_id: str, reason: str | None = None, **detail: Any) -> AuditEntry:  # fmt: skip
        return AuditEntry(
            actor=principal.name,
            action=action,
            key_id=key_id,
            remote=request.remote,
            reason=reason,
            request_id=request_id,
            detail=detail or None,
        )

    async def _body(self, request: web.Request, *, empty_ok: bool) -> dict[str, Any]:
        return bodies.parse_json_object(await request.read(), empty_ok=empty_ok)

    @staticmethod
    def _key_id(request: web.Request) -> str:
        key_id = request.match_info["key_id"]
        if not bodies.valid_key_id(key_id):
            raise bodies.BadInput("the key id must look like key_ followed by 20 hex digits")
        return key_id

    def _not_found(self, request_id: str) -> web.Response:
        return errors.render(Denial("key_not_found", "No key has this id", status=404), request_id)

    # endpoints --------------------------------------------------------------

    @staticmethod
    def _new_record(spec: bodies.CreateKey, now: float) -> tuple[KeyRecord, str | None]:
        """The record a create or an import makes, and the plaintext of a generated key."""
        plaintext: str | None = None
        if spec.key is not None:
            key_hash, start = keys.digest(spec.key), keys.start_of(spec.key)
        elif spec.key_sha256 is not None:
            key_hash, start = spec.key_sha256, None
        else:
            plaintext = keys.generate(spec.prefix or keys.DEFAULT_PREFIX)
            key_hash, start = keys.digest(plaintext), keys.start_of(plaintext)
        record = KeyRecord(
            id=keys.new_id(),
            hash=key_hash,
            name=spec.name,
            owner=spec.owner,
            scopes=spec.scopes,
            meta=spec.meta,
            start=start,
            prefix=spec.prefix or (keys.DEFAULT_PREFIX if plaintext else None),
            created_at=now,
            expires_at=spec.expires_at,
            imported=spec.is_import,
        )
        if spec.ratelimits or spec.credits is not None:
            credit_policy = None
            if spec.credits is not None:
                amount, interval = spec.credits.refill or (None, None)
                credit_policy = CreditPolicy(record.id, amount, interval)
            record = replace(record, ratelimits=spec.ratelimits, credits=credit_policy)
        return record, plaintext

    @requires("developer")
    async def create(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        spec = bodies.create(await self._body(request, empty_ok=True), time.time())
        created = await self.create_key(Caller(principal, request.remote, request_id), spec)
        if created is None:
            return errors.render(Denial("key_exists", status=409), request_id)
        record, plaintext = created
        body = await self.shown(record)
        if plaintext is not None:
            body["key"] = plaintext
        return json_response(body, request_id, status=201)

    @requires("developer")
    async def import_keys(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        """Bulk import (spec 13): NDJSON in, a line per record, each the body `POST /v1/keys`
        takes for an import (`key` or `key_sha256`, with name, owner, scopes, meta, expires_at);
        NDJSON out, one result per non-blank line, in order: `{"line", "result": "imported", "id"}`,
        `{"line", "result": "exists"}` or `{"line", "result": "rejected", "code", "detail"}`.
        Records are written IMPORT_BATCH at a time, each batch one transaction and one confirmed
        announcement; the results of a batch are sent once it is in force everywhere. At most
        IMPORT_MAX_LINES lines a request and IMPORT_MAX_LINE bytes a line: past either, a last
        line `{"error": {...}}` ends the answer (the lines before it stand)."""
        response: web.StreamResponse | None = None
        line_no = 0
        pending: list[tuple[int, bytes]] = []
        stop: Denial | None = None
        while stop is None:
            try:
                raw = await request.content.readline()
            except ValueError:  # longer than the reader's limit
                raw, stop = b"", Denial("invalid_request", f"line {line_no + 1}: longer than {IMPORT_MAX_LINE} bytes")
            if raw:
                line_no += 1
                if len(raw) > IMPORT_MAX_LINE:
                    stop = Denial("invalid_request", f"line {line_no}: longer than {IMPORT_MAX_LINE} bytes")
                elif line_no > IMPORT_MAX_LINES:
                    stop = Denial("invalid_request", f"at most {IMPORT_MAX_LINES} lines a request")
                elif raw.strip():
                    pending.append((line_no, raw))
            if pending and (len(pending) >= IMPORT_BATCH or not raw or stop is not None):
                try:
                    results = await self._import_batch(request, principal, request_id, pending)
                except (RedisError, OSError, TimeoutError, NotDurable) as exc:
                    if response is None:
                        raise  # nothing sent yet: the answer is 503 store_unavailable (`requires`)
                    self.metrics.redis_errors.labels("admin").inc()
                    log.warning("admin import: redis failed: %s", type(exc).__name__, extra={"request_id": request_id})
                    stop = Denial("store_unavailable", "The key table failed; the lines answered before stand")
                    break
                pending = []
                if response is None:
                    response = _ndjson_response(request_id)
                    await response.prepare(request)
                await response.write(b"".join(orjson.dumps(r) + b"\n" for r in results))
            if not raw:
                break
        if response is None:
            if stop is not None:
                return errors.render(stop, request_id)
            response = _ndjson_response(request_id)
            await response.prepare(request)
        if stop is not None:
            error = orjson.loads(errors.rendered(stop, request_id)[2])
            await response.write(orjson.dumps(error) + b"\n")
        await response.write_eof()
        return response

    async def _import_batch(
        self, request: web.Request, principal: Principal, request_id: str, lines: list[tuple[int, bytes]]
    ) -> list[dict[str, Any]]:
        now = time.time()
        results: dict[int, dict[str, Any]] = {}
        records: list[tuple[int, KeyRecord]] = []
        for line_no, raw in lines:
            try:
                spec = bodies.create(bodies.parse_json_object(raw, empty_ok=False), now)
                if not spec.is_import:
                    raise bodies.BadInput("key, key_sha256: each line imports a key: give one of them")
                if spec.credits is not None:  # a balance is written per key, not in a batch's script
                    raise bodies.BadInput("credits: not in a bulk import; set them with PATCH /v1/keys/{id}")
            except bodies.BadInput as exc:
                results[line_no] = {
                    "line": line_no,
                    "result": "rejected",
                    "code": "invalid_request",
                    "detail": str(exc),
                }
                continue
            records.append((line_no, self._new_record(spec, now)[0]))
        if records:
            audit = [self._audit(request, principal, "import", r.id, request_id) for _, r in records]
            async with self._import_writes, self.propagator.announce() as announcement:
                added = await self.store.insert_many([r for _, r in records], audit, announcement)
                self.metrics.admin_changes.labels("import").inc(sum(added))
                await announcement.confirmed()
            for (line_no, record), new in zip(records, added, strict=True):
                results[line_no] = (
                    {"line": line_no, "result": "imported", "id": record.id}
                    if new
                    else {"line": line_no, "result": "exists"}
                )
        return [results[line_no] for line_no, _ in lines]

    @requires("viewer")
    async def list_keys(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        query = bodies.list_query(request.query)
        # A cursor is good for the query it was issued for: the same owner and enabled filter.
        filters: list[object] = [query.owner, query.enabled]
        if query.unused_since_text is not None:
            filters.append(query.unused_since_text)  # and the unused_since filter, when given
        context = orjson.dumps(filters).decode()
        try:
            position = self._cursors.keys_position(query.cursor, context) if query.cursor else 0
        except BadCursor:
            raise bodies.BadInput("cursor: must be a cursor this API returned for the same query") from None
        keep = None
        if query.unused_since is not None and self.usage is None:
            # Never "every key is unused": an operator revoking unused keys would revoke keys in use.
            return errors.render(Denial("not_found", "Usage is not counted here: unused_since needs it"), request_id)
        if query.unused_since is not None and self.usage is not None:
            usage, since = self.usage, query.unused_since

            async def keep(ids: list[str]) -> list[bool]:
                return [not used for used in await usage.used_since(ids, since)]

        records, next_position = await self.store.page(
            owner=query.owner, enabled=query.enabled, cursor=position, limit=query.limit, keep=keep
        )
        last = await self._last_use(records)
        next_cursor = self._cursors.keys(next_position, context) if next_position is not None else None
        # Each record is encoded on its own, so one that cannot be (stored by an older version with
        # other bounds) is listed by its id instead of failing the whole page.
        listed = b",".join(_encoded(record, last) for record in records)
        payload = b'{"keys":[' + listed + b'],"next_cursor":' + orjson.dumps(next_cursor) + b"}"
        return web.Response(
            body=payload,
            content_type="application/json",
            headers={"X-Request-Id": request_id, "Cache-Control": "no-store"},
        )

    @requires("viewer")
    async def show(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        record = await self.store.record_by_id(self._key_id(request))
        if record is None:
            return self._not_found(request_id)
        if isinstance(record, KeyRecord) and record.credits is not None:
            body = await self.shown(record)
            body.update(((await self._last_use([record])) or {}).get(record.id, {}))
            return json_response(body, request_id)
        return web.Response(
            body=_encoded(record, await self._last_use([record])),
            content_type="application/json",
            headers={"X-Request-Id": request_id, "Cache-Control": "no-store"},
        )

    async def _last_use(self, records: list[KeyRecord | Unreadable]) -> dict[str, dict[str, Any]] | None:
        """`last_used_at` and `last_used_ip` for each record (spec 10), from the usage figures."""
        if self.usage is None:
            return None
        ids = [r.id for r in records if isinstance(r, KeyRecord)]
        found = await self.usage.last_use(ids)
        return {key_id: last_use_fields(found.get(key_id)) for key_id in ids}

    @requires("viewer")
    async def status(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        """GET /v1/status: this replica's coherence, the live replicas, Redis, recent propagations."""
        return json_response(await self.status_report(Caller(principal, request.remote, request_id)), request_id)

    @requires("viewer")
    async def usage_report(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        """GET /v1/keys/{id}/usage?window=1h|24h|30d: counts per minute, hour or day by outcome, the
        distinct client addresses over the window, and the last use (spec 10)."""
        key_id = self._key_id(request)
        unknown = sorted(set(request.query) - {"window"})
        if unknown:
            raise bodies.BadInput(f"{unknown[0]}: unknown parameter (allowed: window)")
        window = request.query.get("window", "24h")
        if window not in WINDOWS:
            raise bodies.BadInput("window: must be one of 1h, 24h, 30d")
        if self.usage is None:
            return errors.render(Denial("not_found", "Usage is not counted here"), request_id)
        if await self.store.record_by_id(key_id) is None:
            return self._not_found(request_id)
        body = await self.usage.window(key_id, next(w for w in WINDOWS if w == window))
        last = (await self.usage.last_use([key_id])).get(key_id)
        body.update(last_use_fields(last))
        body["last_used_route"] = last.route if last is not None else None
        body["flush_seconds"] = self.usage_flush_seconds
        return json_response(body, request_id)

    @requires("developer")
    async def disable(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        key_id = self._key_id(request)
        why = bodies.reason(await self._body(request, empty_ok=True))
        changed = await self.disable_key(Caller(principal, request.remote, request_id), key_id, why)
        return self._changed(changed, request_id)

    @requires("developer")
    async def enable(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        key_id = self._key_id(request)
        bodies.reason(await self._body(request, empty_ok=True))
        changed = await self.enable_key(Caller(principal, request.remote, request_id), key_id)
        return self._changed(changed, request_id)

    @requires("admin")
    async def revoke(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        key_id = self._key_id(request)
        why = bodies.reason(await self._body(request, empty_ok=True))
        changed = await self.revoke_key(Caller(principal, request.remote, request_id), key_id, why)
        return self._changed(changed, request_id)

    @requires("developer")
    async def rotate(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        key_id = self._key_id(request)
        grace = bodies.grace_seconds(await self._body(request, empty_ok=True))
        rotated = await self.rotate_key(Caller(principal, request.remote, request_id), key_id, grace)
        if rotated is None:
            return self._not_found(request_id)
        body = rotated.new.public()
        body["key"] = rotated.plaintext
        body["rotated_from"] = {"id": rotated.old.id, "expires_at": keys.rfc3339(rotated.old.expires_at)}
        body["propagation"] = rotated.propagation.public()
        return json_response(body, request_id, status=201)

    async def _change(
        self, key_id: str, change: Callable[[KeyRecord], KeyRecord], audits: list[AuditEntry], request_id: str
    ) -> web.Response:
        return self._changed(await self._apply(key_id, change, audits), request_id)

    def _changed(self, changed: Changed | None, request_id: str) -> web.Response:
        if changed is None:
            return self._not_found(request_id)
        body = changed.record.public()
        body["propagation"] = changed.propagation.public()
        return json_response(body, request_id)

    async def _apply(
        self, key_id: str, change: Callable[[KeyRecord], KeyRecord], audits: list[AuditEntry]
    ) -> Changed | None:
        """The change written, announced and confirmed; None when no key has this id."""
        async with self.propagator.announce() as announcement:
            outcome = await self.store.update(key_id, change, audits, announcement)
            if outcome is None:
                return None
            before, after, _ = outcome
            if after is not before:  # counted only when something was written
                self.metrics.admin_changes.labels(audits[0].action).inc()
            else:
                # A repeat wrote nothing; announce anyway, so the answer still
                # means that no replica's cache holds the key.
                await self.store.announce(announcement, [(after.hash, after.version)])
            propagation = await announcement.confirmed()
        return Changed(after, propagation)

    # actions: the service layer the JSON handlers above and the console call ----------------

    def _audit_by(self, caller: Caller, action: str, key_id: str, reason: str | None = None,
                  **detail: Any) -> AuditEntry:  # fmt: skip
        p = caller.principal
        return AuditEntry(actor=p.name, action=action, key_id=key_id, remote=caller.remote, reason=reason,
                          request_id=caller.request_id, detail=detail or None)  # fmt: skip

    async def create_key(self, caller: Caller, spec: bodies.CreateKey) -> tuple[KeyRecord, str | None] | None:
        """The new record and, for a generated key, its plaintext (once); None when the key exists."""
        caller.need("developer")
        record, plaintext = self._new_record(spec, time.time())
        action = "import" if spec.is_import else "create"
        audit = self._audit_by(caller, action, record.id)
        balance = spec.credits.remaining if spec.credits is not None else None
        rates = self.rates

        def credit_balance(effects: SideEffects) -> None:  # in the create's script: never a key without it
            assert rates is not None and balance is not None
            rates.queue_set_credits(effects, record.id, balance)

        also = credit_balance if balance is not None else None
        async with self.propagator.announce() as announcement:
            if not await self.store.insert(record, [audit], announcement, also):
                return None
            self.metrics.admin_changes.labels(action).inc()
            # A replica where a client tried an imported key before may cache "unknown key".
            await announcement.confirmed()
        return record, plaintext

    async def disable_key(self, caller: Caller, key_id: str, why: str | None) -> Changed | None:
        caller.need("developer")
        name = caller.principal.name

        def change(r: KeyRecord) -> KeyRecord:
            if r.revoked or not r.enabled:
                return r  # idempotent: already refused everywhere
            return r.bump(enabled=False, disabled_at=time.time(), disabled_by=name, disabled_reason=why)

        return await self._apply(key_id, change, [self._audit_by(caller, "disable", key_id, why)])

    async def enable_key(self, caller: Caller, key_id: str) -> Changed | None:
        caller.need("developer")
        allow = self.keys_config.allow_reenable

        def change(r: KeyRecord) -> KeyRecord:
            if r.revoked:
                raise Refused("key_revoked", "A revoked key can never be enabled again")
            if r.enabled:
                return r
            if not allow:
                raise Refused("reenable_not_allowed")
            return r.bump(enabled=True, disabled_at=None, disabled_by=None, disabled_reason=None)

        return await self._apply(key_id, change, [self._audit_by(caller, "enable", key_id)])

    async def revoke_key(self, caller: Caller, key_id: str, why: str | None) -> Changed | None:
        caller.need("admin")
        name = caller.principal.name

        def change(r: KeyRecord) -> KeyRecord:
            if r.revoked:
                return r
            now = time.time()
            return r.bump(enabled=False, revoked=True, revoked_at=now, revoked_by=name,
                          disabled_at=r.disabled_at or now, disabled_by=r.disabled_by or name,
                          disabled_reason=why if why is not None else r.disabled_reason)  # fmt: skip

        return await self._apply(key_id, change, [self._audit_by(caller, "revoke", key_id, why)])

    async def rotate_key(self, caller: Caller, key_id: str, grace: int) -> Rotated | None:
        caller.need("developer")
        now = time.time()
        new_id = keys.new_id()
        plaintext: str = ""
        original_expiry: float | None = None

        def change(r: KeyRecord) -> KeyRecord:
            nonlocal original_expiry
            if r.revoked:
                raise Refused("key_revoked", "A revoked key cannot be rotated")
            if not r.enabled:
                raise Refused("key_disabled", "A disabled key cannot be rotated; enable it first")
            if r.rotated_to is not None:
                raise Refused("key_rotated")
            original_expiry = r.expires_at
            ends = now + grace
            expires = ends if r.expires_at is None else min(r.expires_at, ends)
            return r.bump(expires_at=expires, rotated_to=new_id)

        def successor(old: KeyRecord) -> KeyRecord:
            nonlocal plaintext
            plaintext = keys.generate(old.prefix or keys.DEFAULT_PREFIX)
            return KeyRecord(
                id=new_id, hash=keys.digest(plaintext), name=old.name, owner=old.owner,
                scopes=old.scopes, meta=old.meta, start=keys.start_of(plaintext),
                prefix=old.prefix or keys.DEFAULT_PREFIX, created_at=now,
                expires_at=original_expiry, ratelimits=old.ratelimits, credits=old.credits,
            )  # fmt: skip

        audits = [
            self._audit_by(caller, "rotate", key_id, new_key_id=new_id, grace_seconds=grace),
            self._audit_by(caller, "create", new_id, rotated_from=key_id),
        ]
        async with self.propagator.announce() as announcement:
            outcome = await self.store.update(key_id, change, audits, announcement, also_insert=successor)
            if outcome is None:
                return None
            self.metrics.admin_changes.labels("rotate").inc()
            propagation = await announcement.confirmed()
        _, after, inserted = outcome
        assert inserted is not None
        return Rotated(inserted, after, plaintext, propagation)

    async def key_record(self, caller: Caller, key_id: str) -> KeyRecord | Unreadable | None:
        caller.need("viewer")
        return await self.store.record_by_id(key_id)

    @property
    def _rates(self) -> RateStore:
        if self.rates is None:
            raise RuntimeError("the admin API was built without the rate-limit store")
        return self.rates

    async def shown(self, record: KeyRecord) -> dict[str, Any]:
        """The record's public view, with its credit balance read from Redis (spec 12)."""
        body = record.public()
        if record.credits is not None:
            (remaining,) = await self._rates.remaining([record.credits.pool])
            body["credits"] = record.credits.public(remaining)
        return body

    @requires("developer")
    async def update(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        """PATCH /v1/keys/{id} (spec 12): name, meta, scopes, expires_at, ratelimits, credits (set the
        balance, add to it, change the refill, or null to remove them). Written, audited and announced
        like every change, and answered once every live replica has evicted the key, so the next
        request anywhere sees the new limits; a credit balance is in Redis, in force at once."""
        key_id = self._key_id(request)
        spec = bodies.update(await self._body(request, empty_ok=False), time.time())
        changed = await self.update_key(Caller(principal, request.remote, request_id), key_id, spec)
        if changed is None:
            return self._not_found(request_id)
        body = await self.shown(changed.record)
        body["propagation"] = changed.propagation.public()
        return json_response(body, request_id)

    async def update_key(self, caller: Caller, key_id: str, spec: bodies.UpdateKey) -> Changed | None:
        """The PATCH action (the JSON API's and the console's): None when no key has this id."""
        caller.need("developer")
        rates = self._rates

        def change(r: KeyRecord) -> KeyRecord:
            if r.revoked:
                raise Refused("key_revoked", "A revoked key cannot be changed")
            if r.rotated_to and "expires_at" in spec.fields:  # its grace period is its end (spec 8)
                raise Refused("key_rotated", "A rotated key expires at the end of its grace period; it cannot change")
            fields = dict(spec.fields)
            if spec.credits_given:
                credit = spec.credits
                if credit is None:
                    fields["credits"] = None
                else:
                    if r.credits is None and credit.remaining is None and credit.add is None and credit.refill is None:
                        # "stop the refill" of a key with no credits would meter it at a balance of 0
                        raise bodies.BadInput("credits: this key has none; give remaining, add or a refill to start")
                    policy = r.credits or CreditPolicy(r.id)
                    if credit.refill_given:
                        amount, interval = credit.refill or (None, None)
                        policy = replace(policy, refill_amount=amount, refill_interval=interval)
                    fields["credits"] = policy
            return r.bump(**fields)  # always written: a credits-only change is announced and audited too

        def also(pipe: SideEffects, before: KeyRecord, after: KeyRecord) -> None:
            credit = spec.credits
            if not spec.credits_given:
                return
            if credit is None or after.credits is None:
                if before.credits is not None and not before.rotated_to:  # else its successor's balance too
                    rates.queue_drop_credits(pipe, before.credits.pool)
                return
            pool = after.credits.pool
            if credit.remaining is not None:
                rates.queue_set_credits(pipe, pool, credit.remaining)
            elif credit.add is not None:
                rates.queue_add_credits(pipe, pool, credit.add, MAX_CREDITS)
            elif before.credits is None:  # credits given for the first time without a balance: 0, or a refill's
                rates.queue_set_credits(pipe, pool, after.credits.refill_amount or 0)

        detail: dict[str, Any] = {"fields": sorted([*spec.fields, *(["credits"] if spec.credits_given else [])])}
        if spec.credits is not None and spec.credits.remaining is not None:
            detail["credits_set"] = spec.credits.remaining
        if spec.credits is not None and spec.credits.add is not None:
            detail["credits_added"] = spec.credits.add
        audit = self._audit_by(caller, "update", key_id, **detail)
        async with self.propagator.announce() as announcement:
            outcome = await self.store.update(key_id, change, [audit], announcement, also=also)
            if outcome is None:
                return None
            self.metrics.admin_changes.labels("update").inc()
            propagation = await announcement.confirmed()
        return Changed(outcome[1], propagation)

    async def status_report(self, caller: Caller) -> dict[str, Any]:
        """This replica, the live set, Redis and the latest propagations (GET /v1/status, the
        console's status page)."""
        caller.need("viewer")
        registry = self.propagator.registry
        redis_ms, live = await registry.live()
        info = await self.store.redis.info("replication")
        topology = {k: v for k, v in self.topology.items() if k != "warning"}
        report: dict[str, Any] = {
            "replica": {
                "id": registry.replica_id,
                "coherent": self.coherence.coherent,
                "lease_remaining_ms": round(max(0.0, self.coherence.remaining()) * 1000),
                "incoherent_for_seconds": round(self.coherence.broken_for(), 1),
            },
            "live_replicas": [
                {"id": rid, "joined_at": keys.rfc3339(epoch / 1e6), "self": rid == registry.replica_id}
                for rid, epoch in sorted(live.items())
            ],
            "redis": {
                **topology,
                "role": str(info.get("role", "unknown")),
                "persistence": self.persistence,
                "time": keys.rfc3339(redis_ms / 1000),
            },
            "propagation": self.propagator.figures(),
        }
        if "warning" in self.topology:
            report["warning"] = self.topology["warning"]
        return report

    async def audit_page(self, caller: Caller, query: bodies.AuditQuery) -> tuple[list[dict[str, Any]], str | None]:
        """Audit entries newest first and the next page's cursor (BadInput for a foreign cursor)."""
        caller.need("admin")
        context = query.key_id or ""
        try:
            after = self._cursors.audit_id(query.cursor, context) if query.cursor else None
        except BadCursor:
            raise bodies.BadInput("cursor: must be a cursor this API returned for the same query") from None
        entries, last_id = await self.store.audit(key_id=query.key_id, cursor=after, limit=query.limit)
        return entries, self._cursors.audit(last_id, context) if last_id is not None else None

    @requires("admin")
    async def audit(self, request: web.Request, principal: Principal, request_id: str) -> web.StreamResponse:
        query = bodies.audit_query(request.query)
        entries, next_cursor = await self.audit_page(Caller(principal, request.remote, request_id), query)
        return json_response({"entries": entries, "next_cursor": next_cursor}, request_id)

    # probes ---------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return json_response({"status": "ok"}, errors.request_id_from(request.headers.get("X-Request-Id")))

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        request_id = errors.request_id_from(request.headers.get("X-Request-Id"))
        if self.draining:
            return errors.render(Denial("not_ready", "The gateway is shutting down"), request_id)
        try:  # bounded: a probe must get its answer, not wait out redis-py's reconnect backoff
            ok = await asyncio.wait_for(self.store.ping(), READY_PING_SECONDS)
        except Exception:
            ok = False
        if not ok:
            return errors.render(Denial("not_ready", "Redis does not answer"), request_id)
        if not self.coherence.coherent:
            detail = "The invalidation subscription is not live; every key is read from Redis until it is"
            return errors.render(Denial("not_ready", detail), request_id)
        body: dict[str, Any] = {
            "status": "ready",
            "redis": "ok",
            "subscription": "live",
            "persistence": self.persistence,
        }
        if self.topology:
            body["topology"] = {k: v for k, v in self.topology.items() if k != "warning"}
        if self.persistence == "off":
            body["warning"] = "Redis persistence is off: an acknowledged disable can be lost if Redis restarts"
        if "warning" in self.topology:
            body["warning"] = self.topology["warning"]
        return json_response(body, request_id)

    async def metrics_text(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def client_address(
    request: web.Request, trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> str | None:
    """Whom a failed token attempt is counted against: the peer, or, when the peer is a trusted
    proxy, the right-most address of X-Forwarded-For that is not one (what a client can forge is
    to the left of what the trusted proxies appended)."""
    peer = request.remote
    if not trusted_proxies or peer is None or not trusted_peer(peer, trusted_proxies):
        return peer
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
    for hop in reversed(hops):
        if not trusted_peer(hop, trusted_proxies):
            return hop or peer
    return peer


def _encoded(record: KeyRecord | Unreadable, last_use: dict[str, dict[str, Any]] | None = None) -> bytes:
    try:
        public = record.public()
        if last_use is not None and record.id in last_use:
            public.update(last_use[record.id])
        return orjson.dumps(public)
    except orjson.JSONEncodeError:
        return orjson.dumps(Unreadable(record.id).public())


def routes(api: AdminApi) -> list[web.RouteDef]:
    def bound(fn: Callable[[AdminApi, web.Request], Awaitable[web.StreamResponse]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await fn(api, request)

        return handler

    return [
        web.post("/v1/keys", bound(AdminApi.create)),
        web.post("/v1/keys/import", bound(AdminApi.import_keys)),
        web.get("/v1/keys", bound(AdminApi.list_keys), allow_head=False),
        web.get("/v1/keys/{key_id}", bound(AdminApi.show), allow_head=False),
        web.get("/v1/keys/{key_id}/usage", bound(AdminApi.usage_report), allow_head=False),
        web.get("/v1/status", bound(AdminApi.status), allow_head=False),
        web.patch("/v1/keys/{key_id}", bound(AdminApi.update)),
        web.post("/v1/keys/{key_id}/disable", bound(AdminApi.disable)),
        web.post("/v1/keys/{key_id}/enable", bound(AdminApi.enable)),
        web.post("/v1/keys/{key_id}/revoke", bound(AdminApi.revoke)),
        web.post("/v1/keys/{key_id}/rotate", bound(AdminApi.rotate)),
        web.get("/v1/audit", bound(AdminApi.audit), allow_head=False),
        web.get("/healthz", api.healthz),
        web.get("/readyz", api.readyz),
        web.get("/metrics", api.metrics_text),
    ]
