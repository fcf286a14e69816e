"""The operator console's pages and forms (spec 11), mounted on the admin listener at `/`.

Every page is rendered server-side (Jinja2, autoescaping on) and every flow is a plain HTML
form; static/console.js only adds a copy button and turns the confirmation pages into dialogs.
Every change goes through the admin API's actions (`AdminApi.create_key`, `disable_key`, ...)
with a `Caller` built from the session, and those actions check the role themselves, so the
console can do nothing the JSON API would refuse. The session's role is read from the
configured token on every request (see sessions.py). A POST needs the session's CSRF token
(compared in constant time) and, when the browser sends one, an Origin naming this host.
Every answer carries a Content-Security-Policy without 'unsafe-inline', X-Frame-Options DENY,
Referrer-Policy no-referrer and Cache-Control no-store.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlencode, urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import web
from redis.exceptions import RedisError

from gateway import errors
from gateway.admin import bodies
from gateway.admin.api import NOT_DURABLE_DETAIL, AdminApi, Caller, Changed, Forbidden, client_address
from gateway.admin.auth import MAX_ADMIN_TOKEN_LENGTH, Principal, Throttled
from gateway.config import AdminToken, ConsoleConfig
from gateway.console.sessions import Session, Sessions, fingerprint
from gateway.keytable.record import KEY_ID, KeyRecord
from gateway.keytable.store import BadCursor, NotDurable, Refused, Unreadable
from gateway.ratelimit.policy import parse_spec

log = logging.getLogger("gateway.console")

HERE: Final = Path(__file__).parent
COOKIE: Final = "gw_console"
SIGNIN_COOKIE: Final = "gw_console_signin"  # double-submit token of the sign-in form (no session yet)
PAGE_SIZE: Final = 20
SEARCH_BUDGET: Final = 2000  # records one search request reads at most; then it offers "more"
WINDOWS: Final = ("1h", "24h", "30d")
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
STATES: Final = ("active", "disabled", "revoked", "expired")
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


class UsageReader(Protocol):
    """Per-key usage (spec 10), when the gateway counts it: the key page shows it when one is given."""

    async def usage(self, key_id: str, window: str) -> Mapping[str, Any]: ...


class _NoSuchKey(Exception):
    """No key has the id a change named: 404 key_not_found."""


@dataclass(frozen=True, slots=True)
class Signed:
    session: Session
    principal: Principal
    caller: Caller


Page = Callable[["Console", web.Request, Signed], Awaitable[web.StreamResponse]]


def _secure(response: web.StreamResponse) -> web.StreamResponse:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


_NOT_CONSOLE: Final = ("/v1/", "/healthz", "/readyz", "/metrics")  # the JSON API's paths: their own headers


async def _secure_every_answer(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer on a console path gets the security headers, not only the rendered pages: the
    303s after a change or a sign-out, static files, and the middleware's 404s and 405s."""
    if request.path.startswith(_NOT_CONSOLE):
        return
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


class Console:
    def __init__(self, api: AdminApi, sessions: Sessions, config: ConsoleConfig, usage: UsageReader | None = None):
        self.api = api
        self.sessions = sessions
        self.config = config
        self.usage = usage

    # sessions and the checks every page makes ---------------------------------------------

    def _token(self, name: str, token_fp: str) -> AdminToken | None:
        for token in self.api.verifier.tokens:
            if token.name == name and hmac.compare_digest(fingerprint(token), token_fp):
                return token
        return None

    async def _signed(self, request: web.Request) -> Signed | None:
        session = await self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            return None
        token = self._token(session.token_name, session.token_fp)
        if token is None:  # the token was removed or re-hashed: its sessions end
            await self.sessions.delete(session.id)
            return None
        principal = Principal(token.name, token.role)
        request_id = errors.request_id_from(request.headers.get("X-Request-Id"))
        return Signed(session, principal, Caller(principal, request.remote, request_id))

    def _cookie(self, response: web.StreamResponse, request: web.Request, name: str, value: str, **kw: Any) -> None:
        response.set_cookie(
            name,
            value,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.config.secure_cookies or request.secure,
            **kw,
        )

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        """A browser's POST from another origin (another site, or another port of this host) is refused:
        by Sec-Fetch-Site when the browser sends it, else by Origin (which is "null" under the
        no-referrer policy these pages set, so it cannot be the only check)."""
        fetch_site = request.headers.get("Sec-Fetch-Site")
        if fetch_site is not None:
            return fetch_site in ("same-origin", "none")
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return True  # not a browser that says; the CSRF token still has to match
        return urlsplit(origin).netloc == request.host

    def render(
        self, request: web.Request, template: str, signed: Signed | None, status: int = 200, **context: Any
    ) -> web.StreamResponse:
        principal = signed.principal if signed else None
        context.update(
            me=principal,
            csrf=signed.session.csrf if signed else None,
            may=(lambda role: principal is not None and principal.may(role)),
        )
        response = aiohttp_jinja2.render_template(template, request, context, status=status)
        return _secure(response)

    def error(
        self,
        request: web.Request,
        signed: Signed | None,
        code: errors.ErrorCode,
        detail: str | None = None,
        status: int | None = None,
    ) -> web.StreamResponse:
        kind = errors.KINDS[code]
        status = status or kind.status
        request_id = signed.caller.request_id if signed else errors.new_request_id()
        return self.render(
            request,
            "error.html",
            signed,
            status=status,
            code=code,
            title=kind.title,
            detail=detail or kind.detail,
            request_id=request_id,
        )

    # page wrappers ---------------------------------------------------------------------

    def page(
        self, fn: Page, role: str = "viewer", *, change: bool = False
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Signed in, the role, for a change the CSRF token and origin; then `fn`, its failures as pages."""

        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                signed = await self._signed(request)
                if signed is None:
                    if change:
                        return self.error(request, None, "csrf_rejected", "Your session has ended; sign in again")
                    return _secure(_see_other("/sign-in"))
                if change:
                    form = await request.post()
                    if not self._same_origin(request) or not signed.session.csrf_ok(_field(form, "csrf")):
                        log.warning(
                            "console: a form without its CSRF token or from another origin was refused",
                            extra={"request_id": signed.caller.request_id},
                        )
                        return self.error(request, signed, "csrf_rejected")
                if not signed.principal.may(role):
                    return self.error(
                        request, signed, "insufficient_permissions", f"This page requires the {role} role"
                    )
                try:
                    return await fn(self, request, signed)
                except Forbidden as exc:
                    return self.error(
                        request, signed, "insufficient_permissions", f"This action requires the {exc.role} role"
                    )
                except bodies.BadInput as exc:
                    return self.error(request, signed, "invalid_request", str(exc))
                except Refused as exc:
                    return self.error(request, signed, exc.code, exc.detail, status=409)
                except _NoSuchKey:
                    return self.error(request, signed, "key_not_found", "No key has this id", status=404)
            except NotDurable as exc:
                self.api.metrics.redis_errors.labels("admin_durability").inc()
                log.warning("console: %s within the timeout (redis.min_replicas_acked)", exc)
                return self.error(request, None, "store_unavailable", NOT_DURABLE_DETAIL)
            except (RedisError, OSError, TimeoutError) as exc:
                self.api.metrics.redis_errors.labels("admin").inc()
                log.warning("console: redis failed: %s", type(exc).__name__)
                return self.error(request, None, "store_unavailable")

        return handler

    # sign-in and sign-out ------------------------------------------------------------------

    async def sign_in_form(self, request: web.Request) -> web.StreamResponse:
        return self._sign_in_page(request)

    def _sign_in_page(
        self,
        request: web.Request,
        problem: str | None = None,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        nonce = secrets.token_urlsafe(24)
        response = self.render(request, "sign_in.html", None, status=status, nonce=nonce, problem=problem)
        response.headers.update(headers or {})
        self._cookie(response, request, SIGNIN_COOKIE, nonce, max_age=3600)
        return response

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        try:
            form = await request.post()
            nonce = request.cookies.get(SIGNIN_COOKIE, "")
            offered = _field(form, "nonce") or ""
            if not self._same_origin(request) or not nonce or not hmac.compare_digest(offered.encode(), nonce.encode()):
                return self._sign_in_page(request, "The sign-in form expired or came from another site; try again", 403)
            token = _field(form, "token") or ""
            token = token.strip()
            if not token or len(token) > MAX_ADMIN_TOKEN_LENGTH:
                return self._sign_in_page(request, "That admin token is not valid", 401)
            outcome = await self.api.verifier.verify(token, client_address(request, self.api.trusted_proxies))
            if isinstance(outcome, Throttled):
                return self._sign_in_page(
                    request,
                    f"Too many failed sign-in attempts; retry in {outcome.retry_after} s",
                    429,
                    headers={"Retry-After": str(outcome.retry_after)},
                )
            entry = next((t for t in self.api.verifier.tokens if outcome and t.name == outcome.name), None)
            if outcome is None or entry is None:
                return self._sign_in_page(request, "That admin token is not valid", 401)
            old = request.cookies.get(COOKIE)
            if old:
                await self.sessions.delete(old)
            session = await self.sessions.create(entry)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("console: redis failed at sign-in: %s", type(exc).__name__)
            return self.error(request, None, "store_unavailable")
        log.info("console: %s signed in", entry.name)
        response = _secure(_see_other("/keys"))
        self._cookie(response, request, COOKIE, session.id)
        response.del_cookie(SIGNIN_COOKIE, path="/")
        return response

    async def sign_out(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        await self.sessions.delete(signed.session.id)
        response = _see_other("/sign-in")
        response.del_cookie(COOKIE, path="/")
        return response

    async def root(self, request: web.Request) -> web.StreamResponse:
        return _secure(_see_other("/keys"))

    # keys --------------------------------------------------------------------------------

    async def keys(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        q = (request.query.get("q") or "").strip()[: bodies.MAX_TEXT]
        state = request.query.get("state") or ""
        if state and state not in STATES:
            raise bodies.BadInput(f"state: must be one of {', '.join(STATES)}")
        unused = request.query.get("unused_since") or ""
        if unused and not _DATE.fullmatch(unused):
            raise bodies.BadInput("unused_since: must be a date, YYYY-MM-DD")
        context = f"console\0{q}\0{state}\0{unused}"
        cursor = request.query.get("cursor")
        position = 0
        if cursor:
            try:
                position = self.api._cursors.keys_position(cursor, context)
            except BadCursor:
                raise bodies.BadInput("cursor: must be a cursor this console returned for the same search") from None
        rows, next_position = await self._search(q, state, unused, position)
        next_url = None
        if next_position is not None:
            params = {k: v for k, v in (("q", q), ("state", state), ("unused_since", unused)) if v}
            params["cursor"] = self.api._cursors.keys(next_position, context)
            next_url = "/keys?" + urlencode(params)
        return self.render(
            request,
            "keys.html",
            signed,
            rows=rows,
            q=q,
            state=state,
            unused=unused,
            states=STATES,
            next_url=next_url,
            usage=self.usage is not None,
        )

    async def _search(self, q: str, state: str, unused: str, position: int) -> tuple[list[dict[str, Any]], int | None]:
        """Matches of `q` (an id exactly; else part of the name or owner, or the start of `start`),
        in creation order, PAGE_SIZE a page, reading at most SEARCH_BUDGET records a request."""
        if KEY_ID.fullmatch(q):
            found = await self.api.store.record_by_id(q)
            hits = await self._rows([found]) if found is not None else []
            return [r for r in hits if _wanted(r, "", state, unused)], None
        enabled = None if not state else state in ("active", "expired")
        rows: list[dict[str, Any]] = []
        read = 0
        next_position: int | None = position
        while next_position is not None and len(rows) < PAGE_SIZE and read < SEARCH_BUDGET:
            batch = PAGE_SIZE if not (q or state or unused) else 100
            records, next_position = await self.api.store.page(
                owner=None, enabled=enabled, cursor=next_position, limit=batch
            )
            read += len(records)
            rows.extend(r for r in await self._rows(records) if _wanted(r, q, state, unused))
        return rows, next_position

    async def _rows(self, records: list[KeyRecord | Unreadable]) -> list[dict[str, Any]]:
        """The records as the pages show them, with their last use when usage is counted (the
        "unused since" filter and the "Last used" column read it)."""
        last = await self.api._last_use(records) or {}
        return [_row(record) | last.get(record.id, {}) for record in records]

    async def key(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        key_id = _key_id(request)
        record = await self.api.key_record(signed.caller, key_id)
        if record is None:
            return self.error(request, signed, "key_not_found", "No key has this id", status=404)
        done = await self.sessions.pop_once(signed.session)
        if done is not None and done.get("key_id") != key_id:
            done = None
        trail: list[dict[str, Any]] = []
        if signed.principal.may("admin"):
            trail, _ = await self.api.audit_page(signed.caller, bodies.AuditQuery(key_id, None, 20))
        usage = None
        window = request.query.get("window") or "24h"
        if window not in WINDOWS:
            raise bodies.BadInput(f"window: must be one of {', '.join(WINDOWS)}")
        if self.usage is not None:
            usage = _chart(await self.usage.usage(key_id, window))
        (row,) = await self._rows([record])
        await self._with_balance(record, row)
        return self.render(
            request,
            "key.html",
            signed,
            k=row,
            done=done,
            trail=trail,
            usage=usage,
            window=window,
            windows=WINDOWS,
            may_enable=self._may_enable(row),
            may_rotate=row["state"] == "active" and not row.get("rotated_to"),
        )

    def _may_enable(self, row: Mapping[str, Any]) -> bool:
        return row["state"] == "disabled" and self.api.keys_config.allow_reenable

    async def _record(self, request: web.Request, signed: Signed) -> dict[str, Any] | None:
        record = await self.api.key_record(signed.caller, _key_id(request))
        if record is None:
            return None
        return await self._with_balance(record, _row(record))

    async def _with_balance(self, record: KeyRecord | Unreadable, row: dict[str, Any]) -> dict[str, Any]:
        """`row` with the key's credits as the API shows them: their balance, read from Redis (spec 12)."""
        if isinstance(record, KeyRecord) and record.credits is not None:
            row["credits"] = (await self.api.shown(record))["credits"]
        return row

    async def confirm(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        """The confirmation pages of disable, revoke and rotate (the dialogs' fallback without JavaScript)."""
        action = request.match_info["action"]
        role = {"disable": "developer", "revoke": "admin", "rotate": "developer", "limits": "developer"}.get(action)
        if role is None:
            return self.error(request, signed, "not_found", status=404)
        signed.caller.need(role)
        row = await self._record(request, signed)
        if row is None:
            return self.error(request, signed, "key_not_found", "No key has this id", status=404)
        return self.render(request, f"confirm_{action}.html", signed, k=row)

    async def _done(
        self, signed: Signed, key_id: str, action: str, changed: Changed | None, **extra: object
    ) -> web.StreamResponse:
        if changed is None:
            raise _NoSuchKey
        await self.sessions.put_once(
            signed.session, {"key_id": key_id, "action": action, "propagation": changed.propagation.public(), **extra}
        )
        return _see_other(f"/keys/{key_id}")

    async def disable(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        key_id = _key_id(request)
        form = await request.post()
        reason = (_field(form, "reason") or "").strip() or None
        why = bodies.reason({"reason": reason})
        return await self._done(signed, key_id, "disabled", await self.api.disable_key(signed.caller, key_id, why))

    async def enable(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        key_id = _key_id(request)
        return await self._done(signed, key_id, "enabled", await self.api.enable_key(signed.caller, key_id))

    async def revoke(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        key_id = _key_id(request)
        form = await request.post()
        signed.caller.need("admin")
        row = await self._record(request, signed)
        if row is None:
            return self.error(request, signed, "key_not_found", "No key has this id", status=404)
        typed = _field(form, "confirm_name") or ""
        expected = row.get("name") or row["id"]
        if not hmac.compare_digest(typed.encode(), expected.encode()):
            raise bodies.BadInput("confirm_name: type the key's name exactly (its id when it has no name) to revoke it")
        why = bodies.reason({"reason": (_field(form, "reason") or "").strip() or None})
        return await self._done(signed, key_id, "revoked", await self.api.revoke_key(signed.caller, key_id, why))

    async def limits(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        """Set a key's rate limits and change its credits (spec 12): the PATCH action, as a form."""
        key_id = _key_id(request)
        form = await request.post()
        row = await self._record(request, signed)
        if row is None:
            return self.error(request, signed, "key_not_found", "No key has this id", status=404)
        known = {limit["name"]: limit for limit in row.get("ratelimits") or []}
        body: dict[str, Any] = {"ratelimits": _limits_field(_field(form, "limits") or "", known)}
        action = _field(form, "credits_action") or "keep"
        amount = (_field(form, "credits_amount") or "").strip()
        refill = (_field(form, "refill") or "").strip()
        if action in ("set", "add"):
            if not re.fullmatch(r"-?[0-9]{1,16}", amount):
                raise bodies.BadInput("credits: give the amount as a whole number")
            credits: dict[str, Any] = {"remaining" if action == "set" else "add": int(amount)}
            if refill:
                credits["refill"] = _refill_field(refill)
            body["credits"] = credits
        elif action == "remove":
            body["credits"] = None
        elif action != "keep":
            raise bodies.BadInput("credits_action: must be keep, set, add or remove")
        spec = bodies.update(body, time.time())
        return await self._done(signed, key_id, "updated", await self.api.update_key(signed.caller, key_id, spec))

    async def rotate(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        key_id = _key_id(request)
        form = await request.post()
        raw = (_field(form, "grace_seconds") or "0").strip()
        if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
            raise bodies.BadInput(f"grace_seconds: must be a whole number from 0 to {bodies.MAX_GRACE_SECONDS}")
        grace = bodies.grace_seconds({"grace_seconds": int(raw)})
        rotated = await self.api.rotate_key(signed.caller, key_id, grace)
        if rotated is None:
            return self.error(request, signed, "key_not_found", "No key has this id", status=404)
        await self.sessions.put_once(
            signed.session, {"key_id": rotated.new.id, "secret": rotated.plaintext, "rotated_from": key_id}
        )
        return _see_other(f"/keys/{rotated.new.id}/secret")

    async def new_key(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        signed.caller.need("developer")
        return self.render(request, "new_key.html", signed)

    async def create(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        form = await request.post()
        body: dict[str, Any] = {}
        for name in ("name", "owner"):
            value = (_field(form, name) or "").strip()
            if value:
                body[name] = value
        scopes = (_field(form, "scopes") or "").replace(",", " ").split()
        if scopes:
            body["scopes"] = scopes
        expires = (_field(form, "expires_at") or "").strip()
        if expires:
            if not _DATE.fullmatch(expires):
                raise bodies.BadInput("expires_at: must be a date, YYYY-MM-DD")
            body["expires_at"] = expires + "T00:00:00Z"
        spec = bodies.create(body, time.time())
        created = await self.api.create_key(signed.caller, spec)
        assert created is not None  # a generated key never exists already
        record, plaintext = created
        await self.sessions.put_once(signed.session, {"key_id": record.id, "secret": plaintext})
        return _see_other(f"/keys/{record.id}/secret")

    async def secret(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        """The plaintext of a key just created or rotated: shown by the first GET after it, never again."""
        key_id = _key_id(request)
        once = await self.sessions.pop_once(signed.session)
        plaintext = once.get("secret") if once and once.get("key_id") == key_id else None
        record = await self.api.key_record(signed.caller, key_id)
        if record is None:
            return self.error(request, signed, "key_not_found", "No key has this id", status=404)
        return self.render(
            request,
            "secret.html",
            signed,
            k=_row(record),
            secret=plaintext,
            rotated_from=once.get("rotated_from") if plaintext and once else None,
        )

    # audit and status -------------------------------------------------------------------

    async def audit(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        key_id = (request.query.get("key_id") or "").strip()
        query = bodies.audit_query(
            {k: v for k, v in (("key_id", key_id), ("cursor", request.query.get("cursor"))) if v} | {"limit": "50"}
        )
        entries, next_cursor = await self.api.audit_page(signed.caller, query)
        next_url = None
        if next_cursor:
            next_url = "/audit?" + urlencode({k: v for k, v in (("key_id", key_id), ("cursor", next_cursor)) if v})
        return self.render(request, "audit.html", signed, entries=entries, key_id=key_id, next_url=next_url)

    async def status(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        report = await self.api.status_report(signed.caller)  # what GET /v1/status answers
        replica, redis = report["replica"], report["redis"]
        replicas = [{"id": r["id"], "since": r["joined_at"], "self": r["self"]} for r in report["live_replicas"]]
        topology = {k: redis[k] for k in ("mode", "replicas", "min_replicas_acked") if k in redis}
        if "warning" in report:
            topology["warning"] = report["warning"]
        return self.render(
            request,
            "status.html",
            signed,
            replicas=replicas,
            redis_time=redis["time"],
            redis_role=redis["role"],
            topology=topology,
            persistence=redis["persistence"],
            coherent=replica["coherent"],
            lease_ms=replica["lease_remaining_ms"],
            broken_s=replica["incoherent_for_seconds"],
            replica_id=replica["id"],
            propagation=report["propagation"],
        )


def _limits_field(text: str, known: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The limits form field: `[NAME=]LIMIT/WINDOW` items separated by commas or lines (100/60s,
    hourly=1000/1h). A limit keeps the on_store_error it had under the same name; new ones deny."""
    items = [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]
    if len(items) > 10:
        raise bodies.BadInput("limits: at most 10")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items, start=1):
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = ("limit" if len(items) == 1 else f"limit{i}"), item
        try:
            limit = parse_spec(spec, name.strip())
        except ValueError as exc:
            raise bodies.BadInput(f"limits: {exc}") from None
        on_error = (known.get(limit.name) or {}).get("on_store_error", "deny")
        out.append({"name": limit.name, "limit": limit.limit, "window_seconds": limit.window_seconds,
                    "on_store_error": on_error})  # fmt: skip
    return out


def _refill_field(text: str) -> dict[str, int]:
    """`AMOUNT/INTERVAL` (10/1h): the credits refilled to AMOUNT every INTERVAL."""
    try:
        spec = parse_spec(text, "refill")
    except ValueError:
        raise bodies.BadInput("refill: AMOUNT/INTERVAL, e.g. 1000/1d") from None
    return {"amount": spec.limit, "interval": spec.window_seconds}


def _field(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _key_id(request: web.Request) -> str:
    key_id = request.match_info["key_id"]
    if not bodies.valid_key_id(key_id):
        raise bodies.BadInput("the key id must look like key_ followed by 20 hex digits")
    return key_id


def _row(record: KeyRecord | Unreadable) -> dict[str, Any]:
    row = record.public()
    row.setdefault("state", "unreadable")
    return row


def _wanted(row: Mapping[str, Any], q: str, state: str, unused: str) -> bool:
    if state and row.get("state") != state:
        return False
    if unused and "last_used_at" in row:
        last = row.get("last_used_at")
        if last is not None and str(last)[:10] >= unused:
            return False
    if not q:
        return True
    needle = q.casefold()
    return (
        row.get("id") == q
        or needle in str(row.get("name") or "").casefold()
        or needle in str(row.get("owner") or "").casefold()
        or str(row.get("start") or "").startswith(q)
    )


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _chart(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Bars for an SVG (no inline style: the CSP forbids it): each bucket's total, scaled to 100."""
    buckets = usage.get("buckets") or []
    totals: list[tuple[str, int]] = []
    for bucket in buckets if isinstance(buckets, list) else []:
        if not isinstance(bucket, Mapping):
            continue
        requests = bucket.get("requests")  # gateway/usage/store.py's window(): requests and outcomes
        counts = bucket.get("outcomes") or bucket.get("counts") or {}
        total = (
            requests
            if isinstance(requests, int)
            else sum(v for v in counts.values() if isinstance(v, int))
            if isinstance(counts, Mapping)
            else 0
        )
        totals.append((str(bucket.get("start") or bucket.get("at") or ""), total))
    peak = max((t for _, t in totals), default=0) or 1
    width = 600 / max(1, len(totals))
    bars = [
        {
            "x": round(i * width, 2),
            "w": round(max(1.0, width - 1), 2),
            "h": round(100 * t / peak, 2),
            "y": round(100 - 100 * t / peak, 2),
            "label": f"{start}: {t}",
        }
        for i, (start, t) in enumerate(totals)
    ]
    return {"bars": bars, "total": sum(t for _, t in totals), "peak": peak if totals else 0, "raw": usage}


def mount(app: web.Application, api: AdminApi, config: ConsoleConfig, usage: UsageReader | None = None) -> Console:
    """Add the console's routes (named `console.*`) and its templates to the admin application."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("gateway.console", "templates"),
        autoescape=True,
    )
    console = Console(api, Sessions(api.store.redis, api.store.prefix, config), config, usage)
    app.on_response_prepare.append(_secure_every_answer)
    p = console.page
    app.add_routes(
        [
            web.get("/", console.root, name="console.root", allow_head=False),
            web.get("/sign-in", console.sign_in_form, name="console.sign_in_form", allow_head=False),
            web.post("/sign-in", console.sign_in, name="console.sign_in"),
            web.post("/sign-out", p(Console.sign_out, change=True), name="console.sign_out"),
            web.get("/keys", p(Console.keys), name="console.keys", allow_head=False),
            web.post("/keys", p(Console.create, "developer", change=True), name="console.create"),
            web.get("/keys/new", p(Console.new_key, "developer"), name="console.new_key", allow_head=False),
            web.get("/keys/{key_id}", p(Console.key), name="console.key", allow_head=False),
            web.get("/keys/{key_id}/secret", p(Console.secret, "developer"), name="console.secret", allow_head=False),
            web.get("/keys/{key_id}/{action}", p(Console.confirm), name="console.confirm", allow_head=False),
            web.post("/keys/{key_id}/disable", p(Console.disable, "developer", change=True), name="console.disable"),
            web.post("/keys/{key_id}/enable", p(Console.enable, "developer", change=True), name="console.enable"),
            web.post("/keys/{key_id}/revoke", p(Console.revoke, "admin", change=True), name="console.revoke"),
            web.post("/keys/{key_id}/rotate", p(Console.rotate, "developer", change=True), name="console.rotate"),
            web.post("/keys/{key_id}/limits", p(Console.limits, "developer", change=True), name="console.limits"),
            web.get("/audit", p(Console.audit, "admin"), name="console.audit", allow_head=False),
            web.get("/status", p(Console.status), name="console.status", allow_head=False),
            web.static("/static", HERE / "static", name="console.static"),
        ]
    )
    return console
