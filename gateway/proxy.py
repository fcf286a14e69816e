"""The proxy's request path, top to bottom (spec 5, 6).

    target -> route -> method -> credential -> key lookup -> decision -> rate limits and credits -> forward

Every step before `forward` either passes or returns a Denial, which one
renderer turns into the JSON error. No path that returns a Denial forwards.
`Gate` holds the steps up to the decision, which gateway/verify/ shares: its
verifier runs the same path on another proxy's question and answers instead
of forwarding.
A request is one `Exchange`, made when it arrives and filled in as it goes down
the path; it ends in `_record`: one metric increment and one access-log record.
It runs on gateway/h1/server.py's listener and forwards through gateway/h1/client.py, which
sees the request only as a `Downstream` (gateway/h1/downstream.py) and plain values.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from gateway import errors
from gateway.config import METHODS, KeysConfig, Route
from gateway.errors import Denial, ErrorCode
from gateway.h1.client import Forwarder
from gateway.h1.headers import http_date
from gateway.h1.server import Request
from gateway.keytable.credentials import bearer_from
from gateway.keytable.lease import IN_FLIGHT_MARGIN
from gateway.keytable.lookup import AuthUnavailable, KeyLookup
from gateway.keytable.record import KeyRecord, decide, digest
from gateway.metrics import Metrics
from gateway.ratelimit.limiter import Limiter
from gateway.routing import RouteTable, Target, UnsafePath, encode, split_target, upstream_path
from gateway.usage.counter import Counter

access = logging.getLogger("gateway.access")
log = logging.getLogger("gateway")
_USER_AGENT_MAX = 256
_DECISIONS = 3  # a key decision made stale while its upstream connection opened is taken again, this often
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"
_UNLISTED = frozenset({"CONNECT", "TRACE"})  # refused unless a route's `methods` names them


# An access-log record's `code`: a spec 5 code, or how a request that was not refused ended.
Outcome = ErrorCode | Literal["forwarded", "verified", "client_closed", "cancelled"]


@dataclass(slots=True)
class Exchange:
    """One request on its way through the proxy, made once when it arrives: what its answer,
    its metric and its access-log record are made of, filled in as each step learns it."""

    request: Request | None  # None: the listener refused it and nothing of it is known (`refused`)
    request_id: str  # the client's X-Request-Id when well-formed, else a new one: decided once
    started: float  # perf_counter() when it arrived
    method: str | None = None  # the method decided on: the request's, or the one a verify question names
    path: str | None = None  # the normalised path, without its query, once the target parsed
    route: str = "-"  # the matching route's name
    record: KeyRecord | None = None  # the key's record, once looked up
    upstream: float | None = None  # seconds from the (last) key decision to the upstream's answer
    remote: str | None = None  # the client's address, for a request the listener refused


@dataclass
class Gate:
    """A listener's handler up to the key decision: the boundary every request passes (`handle`),
    the steps before the decision (`_admit`, `_decide`), and the one way a refusal is answered and
    recorded (`_deny`). `Proxy` forwards what passes; gateway/verify's `Verifier` answers 200."""

    routes: RouteTable  # replaced whole by a SIGHUP reload; a request uses the table it started with
    lookup: KeyLookup
    keys: KeysConfig
    metrics: Metrics
    inflight: int = field(default=0, init=False)
    usage: Counter | None = field(default=None, kw_only=True)  # per-key usage (gateway/usage/), in memory
    limiter: Limiter | None = field(default=None, kw_only=True)  # spec 12; None: no limits are checked

    async def handle(self, request: Request) -> None:
        self.inflight += 1
        exchange = Exchange(request, errors.request_id_from(request.headers.get("X-Request-Id")), time.perf_counter())
        try:
            await self._handle(request, exchange)
        except Exception as exc:
            # The boundary: an unexpected exception is logged by type with its traceback and
            # answered 500 internal_error (when nothing was sent yet), never forwarded, never echoed.
            log.exception("unhandled %s", type(exc).__name__, extra={"request_id": exchange.request_id})
            if not request.responded:
                # Recorded as it always was: its id and duration, no route or key (the route label is "-").
                self._deny(Exchange(request, exchange.request_id, exchange.started), Denial("internal_error"))
            else:
                request.close_after()
        finally:
            self.inflight -= 1

    async def _handle(self, request: Request, exchange: Exchange) -> None:
        raise NotImplementedError

    def _admit(self, exchange: Exchange, method: str, raw_target: str) -> tuple[Route, Target, str | None] | None:
        """target -> route -> method -> credential: the route, the parsed target and the key's digest
        (None on a public route); None when the request was refused (and answered)."""
        request = exchange.request
        assert request is not None
        exchange.method = method
        try:
            target = split_target(raw_target)
        except UnsafePath as exc:
            self._deny(exchange, Denial("invalid_request", str(exc)))
            return None
        exchange.path = target.path

        route = self.routes.match(target.path)
        if route is None:
            self._deny(exchange, Denial("route_not_found"))
            return None
        exchange.route = route.name
        allowed = route.methods
        if method not in allowed if allowed is not None else method in _UNLISTED:
            # CONNECT and TRACE only where a route lists them (spec 6): a tunnel or an echo of the
            # request (its Authorization included) is never what "all methods" means.
            allow = ", ".join(sorted(allowed if allowed is not None else METHODS - _UNLISTED))
            self._deny(exchange, Denial("method_not_allowed", headers={"Allow": allow}))
            return None
        if not route.requires_key:
            return route, target, None
        credential = bearer_from(request.headers.getall("Authorization", ()))
        if isinstance(credential, Denial):
            self._deny(exchange, credential)
            return None
        return route, target, digest(credential.token)

    async def _decide(self, exchange: Exchange, route: Route, key_hash: str) -> KeyRecord | None:
        """key lookup -> decision: the key's record when it may pass on `route` now; None when the
        request was refused (and answered)."""
        try:
            record = exchange.record = await self.lookup.find(key_hash)
        except AuthUnavailable:
            self._deny(exchange, Denial("auth_unavailable"))
            return None
        refusal = decide(record, route, time.time(), self.keys.disabled_status)
        if refusal is not None:
            self._deny(exchange, refusal)
            return None
        return record

    async def _spend(self, exchange: Exchange, route: Route, record: KeyRecord) -> bool:
        """rate limits and credits (gateway/ratelimit/), once per request after its key decision: True
        when it may pass (its share taken); False when it was refused (and answered), taking nothing."""
        if self.limiter is None or not (record.ratelimits or route.ratelimits or record.credits):
            return True
        denial = await self.limiter.check(route, record.id, record.ratelimits, record.credits)
        if denial is not None:
            self._deny(exchange, denial)
            return False
        return True

    def refused(self, request_id: str, remote: str | None, code: ErrorCode = "invalid_request") -> None:
        """A request the listener refused before any handler saw it (400 invalid_request, 408
        request_timeout, 431 headers_too_large): counted and logged like any other, with nothing
        of what was refused."""
        self._record(Exchange(None, request_id, time.perf_counter(), remote=remote), code, errors.KINDS[code].status)

    def _deny(self, exchange: Exchange, denial: Denial) -> None:
        request = exchange.request
        assert request is not None  # a request the listener refused is answered there (`refused`)
        status, reason, head, body = errors.wire(denial, exchange.request_id)
        head, body = self._refusal(request, head + b"Date: " + http_date(time.time()) + b"\r\n", body)
        request.reply(status, reason, head, body)
        self._record(exchange, denial.code, status)

    def _refusal(self, request: Request, head: bytes, body: bytes) -> tuple[bytes, bytes]:
        """A refusal's header lines and body as this listener sends them (the verifier adds to them)."""
        return head, body

    def _record(self, exchange: Exchange, code: Outcome, status: int) -> None:
        # Metric labels are route names and codes only: never the path, a header or the key.
        self.metrics.request(exchange.route, code)
        if self.usage is not None and exchange.record is not None and exchange.request is not None:
            self.usage.count(exchange.record.id, code, exchange.request, exchange.route)
        if not access.isEnabledFor(logging.INFO):
            return
        # The log line names the key by its id, never the key; the path is the normalised
        # one without its query (queries carry tokens more often than paths do).
        request, record, upstream = exchange.request, exchange.record, exchange.upstream
        access.info(
            "request",
            extra={
                "request_id": exchange.request_id,
                "method": exchange.method or (request.method if request is not None else None),
                "path": exchange.path,
                "route": exchange.route,
                "code": code,
                "status": status,
                "key_id": record.id if record is not None else None,
                "upstream_ms": round(upstream * 1000, 3) if upstream is not None else None,
                "duration_ms": round((time.perf_counter() - exchange.started) * 1000, 3),
                "remote": request.remote if request is not None else exchange.remote,
                "user_agent": ((request.headers.get("User-Agent") or "")[:_USER_AGENT_MAX] or None)
                if request is not None
                else None,
            },
        )


@dataclass
class Proxy(Gate):
    """The proxy listener's handler: what passes is forwarded to its route's upstream."""

    forwarder: Forwarder = field(kw_only=True)

    async def _handle(self, request: Request, exchange: Exchange) -> None:
        admitted = self._admit(exchange, request.method, request.raw_path)
        if admitted is None:
            return
        route, target, key_hash = admitted
        if request.body_exists:
            if request.body_length is not None and request.body_length > route.max_body_bytes:
                request.close_after()  # its body is not read: the connection cannot carry another request
                self._deny(exchange, Denial("body_too_large"))
                return
            request.limit_body(route.max_body_bytes)  # a chunked body: the listener counts it as it comes

        record: KeyRecord | None = None
        admit: Callable[[], bool] | None = None

        # What the upstream is asked for: the route's rewrite of the normalised path, with the query.
        path = encode(upstream_path(route, target.path))
        if target.query:
            path += "?" + target.query
        sent = time.perf_counter()
        try:
            for attempt in range(_DECISIONS):
                if key_hash is not None:
                    record = await self._decide(exchange, route, key_hash)
                    if record is None or (attempt == 0 and not await self._spend(exchange, route, record)):
                        return
                    admit = self._fresh_decision()
                    sent = time.perf_counter()
                outcome = await self.forwarder.forward(
                    request,
                    route,
                    path,
                    exchange.request_id,
                    key_id=record.id if record is not None else None,
                    key_owner=record.owner if record is not None else None,
                    admit=admit,
                )
                if outcome is not None:
                    break
            else:  # stale every time: a key table changing faster than we connect upstream
                self._deny(exchange, Denial("auth_unavailable"))
                return
        except ConnectionError:
            # The client went away before its answer could start: nothing to send, nothing to
            # log as an error. Recorded as nginx does, 499.
            exchange.upstream = time.perf_counter() - sent
            self._record(exchange, "client_closed", CLIENT_CLOSED)
            request.close_after()
            return
        except asyncio.CancelledError:
            # Cut by the shutdown (the drain's deadline passed): leave a trace, then let it end.
            exchange.upstream = time.perf_counter() - sent
            self._record(exchange, "cancelled", CLIENT_CLOSED)
            raise
        exchange.upstream = upstream = time.perf_counter() - sent
        self.metrics.upstream(route.name, upstream)
        if isinstance(outcome, Denial):
            self._deny(exchange, outcome)
            return
        self._record(exchange, "forwarded", outcome)

    def _fresh_decision(self) -> Callable[[], bool]:
        """Whether a key decision taken now may still put a request's first byte upstream: only if no
        eviction happened since (a change this replica acked) and it is younger than half the margin
        a change's answer leaves for a request between its cache check and its first byte upstream
        (keytable/lease.py, IN_FLIGHT_MARGIN). Asked only after a wait for a new upstream connection."""
        cache = self.lookup.cache
        generation = cache.generation
        until = time.monotonic() + IN_FLIGHT_MARGIN / 2
        return lambda: cache.generation == generation and time.monotonic() < until
