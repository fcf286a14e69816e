"""`gateway keys ...` and `gateway audit`: the operator CLI of spec 9, a client of the admin API.

    gateway keys create [--name N] [--owner O] [--scope S]... [--meta JSON] [--expires-at ISO] [--prefix P]
    gateway keys list [--owner O] [--enabled | --disabled] [--limit N] [--cursor C] [--unused-since 30d]
    gateway keys usage ID [--window 1h|24h|30d]
    gateway keys show|enable ID
    gateway keys disable|revoke ID [--reason TEXT]
    gateway keys rotate ID [--grace-seconds N]
    gateway keys update ID [--limit [NAME=]N/WINDOW]... [--on-store-error deny|allow] [--no-limits]
                           [--credits N | --add-credits N | --no-credits] [--refill N/INTERVAL | --no-refill]
                           [--name N] [--scope S]... [--meta JSON] [--expires-at ISO | --no-expiry]
    gateway keys import FILE [--format jsonl|csv] [--concurrency N] [--dry-run] [--no-progress]
    gateway audit [--key-id ID] [--limit N | --all] [--cursor C]

Every command takes `--admin-url` (default `$GATEWAY_ADMIN_URL`, else
http://127.0.0.1:8081), `--timeout SECONDS` (30, per request) and `--json`.
The admin token comes from the environment variable `GATEWAY_ADMIN_TOKEN`
only, never from a flag (flags end up in shell history and `ps`). Nothing
prints the token, and no key is printed except the plaintext of a key this
command just created or rotated (shown once: that is the point).

Output: a human table or `field: value` lines by default; with `--json`
exactly one JSON document on stdout: the API's answer (a record; for
`keys list` `{"keys": [...], "next_cursor": ...}` holding every key fetched;
for `audit` `{"entries": [...], "next_cursor": ...}`), or the import summary.
`keys list` follows the cursors to the end unless `--limit N` caps it (then
`next_cursor` says where to go on: `--cursor`). `audit` shows the newest 50
entries unless `--limit N` or `--all`.

Exit codes (errors are one line on stderr, `gateway: ...`, never a traceback):

    0  done
    1  the API refused the action (400, 409, other 4xx), shown with its code and detail;
       `keys import`: at least one record was rejected
    2  usage error: bad flags or values, a bad import file, GATEWAY_ADMIN_TOKEN not set
    3  the admin API cannot be reached or did not answer as one: connection refused, DNS,
       timeout, TLS, a non-JSON answer, an answer of another server (or of the gateway's
       proxy listener), or a 5xx
    4  authentication or authorization failed: 401 (missing/invalid token), 403 (role too low),
       429 too_many_requests (too many failed token attempts from this address: retry later)
    5  no key has this id (404 key_not_found)

A change whose propagation was not confirmed by every live replica within the
gateway's timeout still exits 0 (the change is committed) with a warning on
stderr; `--json` shows `propagation.confirmed < propagation.replicas`. Ctrl-C
exits 130; a closed stdout (`| head`) stops quietly with 1.

`keys import` sends the records to `POST /v1/keys/import` (the bulk import,
BULK_CHUNK records a request, `--concurrency` requests in flight); a gateway
without that endpoint (404) gets them one `POST /v1/keys` each instead. A
record already in the table (`exists`, or 409 `key_exists`) and a record
repeating a key named earlier in the file are
skipped, so an interrupted import can simply be run again. A record the API
would refuse is rejected with its line number and the API's message, never
the key. An error that is not about one record (auth, connection, 5xx) stops
the import: the summary so far is printed, then the error, with its exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

import orjson
from yarl import URL

from gateway.admin import bodies
from gateway.cli import keyfile
from gateway.cli.usage import usage_chart
from gateway.keytable.credentials import VISIBLE_ASCII
from gateway.keytable.record import KEY_ID
from gateway.ratelimit.policy import parse_spec

if TYPE_CHECKING:  # aiohttp is imported where a command calls the API: `gateway --help` stays quick
    import aiohttp

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
EXIT_AUTH: Final = 4
EXIT_NOT_FOUND: Final = 5

TOKEN_ENV: Final = "GATEWAY_ADMIN_TOKEN"  # noqa: S105 (the variable name)
URL_ENV: Final = "GATEWAY_ADMIN_URL"
DEFAULT_URL: Final = "http://127.0.0.1:8081"
LIST_PAGE: Final = 100  # the API's largest page for /v1/keys
AUDIT_PAGE: Final = 500  # and for /v1/audit
AUDIT_DEFAULT: Final = 50
_ADMIN_AUTH_CODES: Final = frozenset({"missing_token", "invalid_token", "insufficient_permissions"})
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]+")
CELL_WIDTH: Final = 40


class CliError(Exception):
    """A failure with its exit code; main prints `gateway: <message>` on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# pure: answers -> exit codes -------------------------------------------------------------------


def api_error(status: int, data: Any, where: str) -> CliError:
    """A non-success answer -> the CliError a script can rely on (see the exit-code table)."""
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    detail = error.get("detail") if isinstance(error, dict) else None
    if not isinstance(code, str):
        return CliError(
            EXIT_UNREACHABLE, f"{where} answered HTTP {status} without a gateway error: is it the admin API?"
        )
    text = f"{code}: {detail} (HTTP {status})" if isinstance(detail, str) and detail else f"{code} (HTTP {status})"
    if status == 429 and code == "too_many_requests":  # the admin token throttle (spec 7)
        return CliError(EXIT_AUTH, text)
    if status in (401, 403):
        if code in _ADMIN_AUTH_CODES:
            return CliError(EXIT_AUTH, text)
        return CliError(
            EXIT_UNREACHABLE, f"{where} answered {text}, a proxy answer: --admin-url must be the admin listener"
        )
    if status == 404:
        if code == "key_not_found":
            return CliError(EXIT_NOT_FOUND, text)
        return CliError(EXIT_UNREACHABLE, f"{where} answered {text}: is --admin-url the gateway's admin listener?")
    if status == 405 or status >= 500:
        return CliError(EXIT_UNREACHABLE, f"{where} answered {text}")
    return CliError(EXIT_REFUSED, text)


def admin_url(raw: str) -> URL:
    try:
        url = URL(raw)
    except (ValueError, TypeError):
        raise CliError(EXIT_USAGE, "--admin-url: not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise CliError(EXIT_USAGE, "--admin-url: must be an http:// or https:// URL with a host")
    return url


def admin_token(environ: Mapping[str, str]) -> str:
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise CliError(EXIT_USAGE, f"{TOKEN_ENV} is not set: export the admin token in it (it is never a flag)")
    if not VISIBLE_ASCII.fullmatch(token):  # what the admin API reads (keytable/credentials.py)
        raise CliError(
            EXIT_USAGE, f"{TOKEN_ENV}: holds characters an admin token cannot have (spaces or control characters)"
        )
    return token


def expiry(value: str) -> str:
    """--expires-at: an ISO 8601 date-time with a zone, or a date (midnight UTC) -> RFC 3339."""
    text = value.strip()
    try:
        if len(text) == 10:
            return date.fromisoformat(text).isoformat() + "T00:00:00Z"
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(EXIT_USAGE, "--expires-at: not an ISO 8601 date-time, e.g. 2027-01-31T12:00:00Z") from None
    if parsed.tzinfo is None:
        raise CliError(EXIT_USAGE, "--expires-at: give a time zone, e.g. 2027-01-31T12:00:00Z or +02:00")
    return parsed.isoformat()


def create_body(args: argparse.Namespace, now: float) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in ("name", "owner", "prefix"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.scope:
        body["scopes"] = list(args.scope)
    if args.meta is not None:
        body["meta"] = _meta_flag(args.meta)
    if args.expires_at is not None:
        body["expires_at"] = expiry(args.expires_at)
    try:
        bodies.create(body, now)  # the API's own rules, before anything is sent
    except bodies.BadInput as exc:
        raise CliError(EXIT_USAGE, f"invalid input: {exc}") from None
    return body


def _meta_flag(text: str) -> Any:
    """`--meta`: a JSON object as the API takes it (its own rules check it further)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise CliError(EXIT_USAGE, '--meta: not valid JSON (give an object, e.g. \'{"plan": "pro"}\')') from None


def update_body(args: argparse.Namespace, now: float) -> dict[str, Any]:
    """`keys update`: the PATCH body (spec 12) from the flags; only what a flag names changes.
    `--limit` replaces every limit of the key with those given (a name per limit: NAME=N/WINDOW,
    `default` when left out)."""
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name
    if args.scope:
        body["scopes"] = list(args.scope)
    if args.meta is not None:
        body["meta"] = _meta_flag(args.meta)
    if args.expires_at is not None:
        body["expires_at"] = expiry(args.expires_at)
    elif args.no_expiry:
        body["expires_at"] = None
    if args.limit:
        limits = []
        for text in args.limit:
            name, sep, spec = text.rpartition("=")
            try:
                limit = parse_spec(spec, name if sep else "default")
            except ValueError as exc:
                raise CliError(EXIT_USAGE, f"--limit: {exc}") from None
            limits.append({"name": limit.name, "limit": limit.limit, "window_seconds": limit.window_seconds,
                           "on_store_error": args.on_store_error})  # fmt: skip
        body["ratelimits"] = limits
    elif args.no_limits:
        body["ratelimits"] = None
    credits: dict[str, Any] = {}
    if args.credits is not None:
        credits["remaining"] = args.credits
    if args.add_credits is not None:
        credits["add"] = args.add_credits
    if args.refill is not None:
        try:
            refill = parse_spec(args.refill)
        except ValueError as exc:
            raise CliError(EXIT_USAGE, f"--refill: {exc} (AMOUNT/INTERVAL, e.g. 1000/1d)") from None
        credits["refill"] = {"amount": refill.limit, "interval": refill.window_seconds}
    elif args.no_refill:
        credits["refill"] = None
    if args.no_credits:
        if credits:
            raise CliError(EXIT_USAGE, "--no-credits: not with --credits, --add-credits or --refill")
        body["credits"] = None
    elif credits:
        body["credits"] = credits
    if not body:
        raise CliError(EXIT_USAGE, "nothing to change: give at least one flag (see gateway keys update --help)")
    try:
        bodies.update(body, now)  # the API's own rules, before anything is sent
    except bodies.BadInput as exc:
        raise CliError(EXIT_USAGE, f"invalid input: {exc}") from None
    return body


def key_id(value: str) -> str:
    if not KEY_ID.fullmatch(value):
        raise CliError(EXIT_USAGE, "not a key id: an id looks like key_ followed by 20 hex digits")
    return value


# pure: formatting ------------------------------------------------------------------------------


def cell(value: Any, width: int = CELL_WIDTH) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, dict):
        text = " ".join(f"{k}={v}" for k, v in value.items())
    else:
        text = str(value)
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= width else text[: width - 3] + "..."


def short_time(value: Any) -> str:
    """2026-11-23T10:00:00.123Z -> 2026-11-23T10:00:00Z."""
    if isinstance(value, str) and len(value) >= 19 and value.endswith("Z"):
        return value[:19] + "Z"
    return cell(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [headers, *rows]]
    return "\n".join(lines)


KEY_COLUMNS: Final = ("ID", "NAME", "OWNER", "STATE", "SCOPES", "CREATED")


def key_table(records: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            cell(r.get("id")),
            cell(r.get("name")),
            cell(r.get("owner")),
            cell(r.get("state")),
            cell(r.get("scopes")),
            short_time(r.get("created_at")),
        ]
        for r in records
    ]
    return table(KEY_COLUMNS, rows)


AUDIT_COLUMNS: Final = ("AT", "ACTOR", "ACTION", "KEY", "REASON", "REMOTE", "DETAIL")


def audit_table(entries: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            short_time(e.get("at")),
            cell(e.get("actor")),
            cell(e.get("action")),
            cell(e.get("key_id")),
            cell(e.get("reason")),
            cell(e.get("remote")),
            cell(e.get("detail"), 60),
        ]
        for e in entries
    ]
    return table(AUDIT_COLUMNS, rows)


RECORD_FIELDS: Final = (
    "id", "name", "owner", "state", "scopes", "meta", "start", "created_at", "expires_at", "enabled",
    "disabled_at", "disabled_by", "disabled_reason", "revoked", "revoked_at", "imported", "rotated_to",
)  # fmt: skip


def record_lines(record: dict[str, Any]) -> str:
    """`field: value` lines of one record, in the spec's order; unknown extra fields last."""
    names: list[str] = [n for n in RECORD_FIELDS if n in record]
    names += [n for n in record if n not in RECORD_FIELDS and n not in ("key", "propagation", "rotated_from")]
    width = max(len(n) for n in names) if names else 0
    out = []
    for name in names:
        value = record[name]
        if name == "meta":
            text = orjson.dumps(value).decode() if value else "-"
        elif name == "ratelimits" and isinstance(value, list):
            text = ", ".join(_limit_text(v) for v in value) or "-"
        elif name == "credits" and isinstance(value, dict):
            refill = value.get("refill")
            text = f"{value.get('remaining')} left"
            if isinstance(refill, dict):
                text += f", refilled to {refill.get('amount')} every {refill.get('interval')} s"
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        else:
            text = cell(value, 1000)
        out.append(f"{name + ':':<{width + 1}} {text}")
    return "\n".join(out)


def _limit_text(limit: Any) -> str:
    if not isinstance(limit, dict):
        return cell(limit)
    text = f"{limit.get('name')}={limit.get('limit')}/{limit.get('window_seconds')}s"
    return text + (" (allow on store error)" if limit.get("on_store_error") == "allow" else "")


def propagation_text(data: dict[str, Any]) -> str:
    p = data.get("propagation")
    if not isinstance(p, dict):
        return "propagation: not reported"
    return f"propagation: confirmed by {p.get('confirmed')}/{p.get('replicas')} replica(s) in {p.get('ms')} ms"


def propagation_incomplete(data: dict[str, Any]) -> bool:
    p = data.get("propagation")
    return isinstance(p, dict) and p.get("confirmed") != p.get("replicas")


def progress_text(done: int, total: int, imported: int, skipped: int, rejected: int, width: int = 30) -> str:
    filled = width if total == 0 else width * done // total
    percent = 100 if total == 0 else 100 * done // total
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}] {percent:3d}% {done}/{total} imported {imported} skipped {skipped} rejected {rejected}"


# I/O: the admin API client -----------------------------------------------------------------------


class Admin:
    """One aiohttp session (keep-alive pool) to the admin API; answers -> data or CliError."""

    def __init__(self, base: URL, token: str, session: aiohttp.ClientSession, timeout: float) -> None:
        self.base = base
        self.where = str(base.with_user(None).with_query(None).with_fragment(None)).rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.session = session
        self.timeout = timeout

    def url(self, path: str) -> URL:
        return URL(str(self.base).rstrip("/") + path)

    async def send(
        self, method: str, path: str, *, body: dict[str, Any] | None = None, query: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """The status and decoded JSON of one call; CliError(3) when no JSON answer comes."""
        headers = dict(self._headers)
        data: bytes | None = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        url = self.url(path)
        if query:
            url = url.with_query(query)
        status, raw = await self._exchange(method, url, data, headers)
        try:
            return status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise CliError(
                EXIT_UNREACHABLE,
                f"{self.where} answered HTTP {status} that is not JSON: is it the gateway's admin API?",
            ) from None

    async def _exchange(self, method: str, url: URL, data: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        """One request: its status and body, or CliError(3) when no answer comes."""
        import aiohttp  # loaded by connect() already

        try:
            async with self.session.request(method, url, data=data, headers=headers, allow_redirects=False) as r:
                return r.status, await r.read()
        except TimeoutError:
            raise CliError(EXIT_UNREACHABLE, f"{self.where}: no answer within {self.timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            why = exc.os_error.strerror or type(exc.os_error).__name__
            raise CliError(EXIT_UNREACHABLE, f"cannot connect to {self.where}: {why}") from None
        except aiohttp.ClientError as exc:
            raise CliError(EXIT_UNREACHABLE, f"{self.where}: {type(exc).__name__}: {exc}") from None

    async def bulk(self, path: str, bodies: Sequence[dict[str, Any]]) -> tuple[int, list[Any]]:
        """POST `bodies` as NDJSON; the status and the NDJSON lines of the answer (a JSON error
        body as one line; no lines for a 404 from a gateway without the endpoint)."""
        headers = dict(self._headers, **{"Content-Type": "application/x-ndjson"})
        data = b"".join(orjson.dumps(body) + b"\n" for body in bodies)
        status, raw = await self._exchange("POST", self.url(path), data, headers)
        if status == 404:  # POST /v1/keys/import names no key: a 404 means no such endpoint
            return status, []
        try:
            return status, [orjson.loads(line) for line in raw.splitlines() if line.strip()]
        except orjson.JSONDecodeError:
            raise CliError(
                EXIT_UNREACHABLE,
                f"{self.where} answered HTTP {status} that is not JSON: is it the gateway's admin API?",
            ) from None

    async def call(
        self,
        method: str,
        path: str,
        *,
        ok: int = 200,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
        expect: str = "id",
    ) -> dict[str, Any]:
        """A call that must succeed with `ok` and a JSON object holding `expect`."""
        status, data = await self.send(method, path, body=body, query=query)
        if status != ok:
            raise api_error(status, data, self.where)
        if not isinstance(data, dict) or expect not in data:
            raise CliError(EXIT_UNREACHABLE, f"{self.where} answered HTTP {status} but not as the admin API does")
        return data


@contextlib.asynccontextmanager
async def connect(args: argparse.Namespace, *, pool: int = 4) -> AsyncIterator[Admin]:
    base = admin_url(args.admin_url)
    token = admin_token(os.environ)
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=pool)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers={"User-Agent": "gateway-cli"}) as s:
        yield Admin(base, token, s, args.timeout)


def emit(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> None:
    if args.json:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        print(human())


def warn(message: str) -> None:
    print(f"gateway: {message}", file=sys.stderr)


# commands --------------------------------------------------------------------------------------


async def keys_create(args: argparse.Namespace) -> int:
    body = create_body(args, time.time())
    async with connect(args) as admin:
        data = await admin.call("POST", "/v1/keys", ok=201, body=body)
    emit(args, data, lambda: f"key: {data.get('key')}\n{record_lines(data)}")
    if not args.json:
        warn("the key is shown only this once: store it now")
    return EXIT_OK


async def keys_list(args: argparse.Namespace) -> int:
    query: dict[str, str] = {}
    if args.owner is not None:
        query["owner"] = args.owner
    if args.enabled is not None:
        query["enabled"] = "true" if args.enabled else "false"
    if args.unused_since is not None:
        query["unused_since"] = args.unused_since
    records: list[dict[str, Any]] = []
    cursor: str | None = args.cursor
    async with connect(args) as admin:
        while True:
            want = LIST_PAGE if args.limit is None else min(LIST_PAGE, args.limit - len(records))
            page_query = {**query, "limit": str(want), **({"cursor": cursor} if cursor else {})}
            data = await admin.call("GET", "/v1/keys", query=page_query, expect="keys")
            page = data["keys"]
            if not isinstance(page, list):
                raise CliError(EXIT_UNREACHABLE, f"{admin.where}: the key list is not a list")
            records.extend(page)
            cursor = data.get("next_cursor")
            if not cursor or (args.limit is not None and len(records) >= args.limit):
                break
    emit(args, {"keys": records, "next_cursor": cursor}, lambda: key_table(records))
    if cursor and not args.json:
        warn(f"{len(records)} key(s) shown; more follow: --cursor {cursor}")
    return EXIT_OK


async def keys_show(args: argparse.Namespace) -> int:
    async with connect(args) as admin:
        data = await admin.call("GET", f"/v1/keys/{key_id(args.id)}")
    emit(args, data, lambda: record_lines(data))
    return EXIT_OK


async def keys_usage(args: argparse.Namespace) -> int:
    async with connect(args) as admin:
        data = await admin.call("GET", f"/v1/keys/{key_id(args.id)}/usage", query={"window": args.window},
                                expect="key_id")  # fmt: skip
    emit(args, data, lambda: usage_chart(data))
    return EXIT_OK


def _unused_since(text: str) -> str:
    try:
        bodies.unused_since(text)
    except bodies.BadInput:
        raise argparse.ArgumentTypeError("a span such as 30d, 12h or 90m, or an RFC 3339 time with offset") from None
    return text


def _change(action: str, with_reason: bool) -> Callable[[argparse.Namespace], Coroutine[Any, Any, int]]:
    async def run(args: argparse.Namespace) -> int:
        body = {"reason": args.reason} if with_reason and args.reason is not None else {}
        async with connect(args) as admin:
            data = await admin.call("POST", f"/v1/keys/{key_id(args.id)}/{action}", body=body)
        emit(args, data, lambda: f"{data.get('id')}: {data.get('state')}\n{propagation_text(data)}")
        if propagation_incomplete(data):
            warn("not every live replica confirmed within the propagation timeout (see the gateway's metrics)")
        return EXIT_OK

    return run


async def keys_update(args: argparse.Namespace) -> int:
    body = update_body(args, time.time())
    async with connect(args) as admin:
        data = await admin.call("PATCH", f"/v1/keys/{key_id(args.id)}", body=body)
    emit(args, data, lambda: f"{record_lines(data)}\n{propagation_text(data)}")
    if propagation_incomplete(data):
        warn("not every live replica confirmed within the propagation timeout (see the gateway's metrics)")
    return EXIT_OK


async def keys_rotate(args: argparse.Namespace) -> int:
    if not 0 <= args.grace_seconds <= bodies.MAX_GRACE_SECONDS:
        raise CliError(EXIT_USAGE, f"--grace-seconds: must be from 0 to {bodies.MAX_GRACE_SECONDS}")
    async with connect(args) as admin:
        path = f"/v1/keys/{key_id(args.id)}/rotate"
        data = await admin.call("POST", path, ok=201, body={"grace_seconds": args.grace_seconds})

    def human() -> str:
        old = data.get("rotated_from") or {}
        return (
            f"key: {data.get('key')}\n{record_lines(data)}\n"
            f"old key {old.get('id')} expires at {old.get('expires_at')}\n{propagation_text(data)}"
        )

    emit(args, data, human)
    if not args.json:
        warn("the new key is shown only this once: store it now")
    if propagation_incomplete(data):
        warn("not every live replica confirmed within the propagation timeout (see the gateway's metrics)")
    return EXIT_OK


async def audit(args: argparse.Namespace) -> int:
    limit = None if args.all else (args.limit or AUDIT_DEFAULT)
    query: dict[str, str] = {"key_id": key_id(args.key_id)} if args.key_id else {}
    entries: list[dict[str, Any]] = []
    cursor: str | None = args.cursor
    async with connect(args) as admin:
        while True:
            want = AUDIT_PAGE if limit is None else min(AUDIT_PAGE, limit - len(entries))
            page_query = {**query, "limit": str(want), **({"cursor": cursor} if cursor else {})}
            data = await admin.call("GET", "/v1/audit", query=page_query, expect="entries")
            page = data["entries"]
            if not isinstance(page, list):
                raise CliError(EXIT_UNREACHABLE, f"{admin.where}: the audit entries are not a list")
            entries.extend(page)
            cursor = data.get("next_cursor")
            if not cursor or (limit is not None and len(entries) >= limit):
                break
    emit(args, {"entries": entries, "next_cursor": cursor}, lambda: audit_table(entries))
    if cursor and not args.json:
        warn(f"{len(entries)} entries shown, newest first; older ones follow: --cursor {cursor} (or --all)")
    return EXIT_OK


# import ----------------------------------------------------------------------------------------


class Progress:
    """A one-line `\\r` bar on stderr, redrawn at most 10 times a second; silent when off."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self._drawn = 0.0

    def update(self, tally: Tally, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._drawn < 0.1:
            return
        self._drawn = now
        text = progress_text(tally.done, self.total, tally.imported, tally.skipped_existing, len(tally.rejections))
        self.stream.write("\r" + text + ("\n" if final else ""))
        self.stream.flush()


@dataclass
class Tally:
    imported: int = 0
    skipped_existing: int = 0
    rejections: list[keyfile.Rejection] = field(default_factory=list)
    failure: CliError | None = None

    @property
    def done(self) -> int:
        return self.imported + self.skipped_existing + len(self.rejections)


def read_plan(path: str, fmt: str) -> keyfile.Plan:
    newline = "" if fmt == "csv" else None
    try:
        if path == "-":
            return keyfile.parse(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline=newline), fmt)
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            return keyfile.parse(f, fmt)
    except OSError as exc:
        raise CliError(EXIT_USAGE, f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CliError(EXIT_USAGE, f"{path}: not UTF-8 text (byte {exc.start} of a chunk)") from None
    except keyfile.FileError as exc:
        raise CliError(EXIT_USAGE, f"{path}: {exc}") from None


BULK_CHUNK = 1000  # records a bulk import request carries


async def _import_all(admin: Admin, entries: Sequence[keyfile.Entry], concurrency: int, progress: Progress) -> Tally:
    """Through the bulk endpoint, chunk by chunk; one POST per record where it does not exist."""
    tally = Tally()
    chunks: Iterator[Sequence[keyfile.Entry]] = iter(
        [entries[i : i + BULK_CHUNK] for i in range(0, len(entries), BULK_CHUNK)]
    )
    fallback = False

    async def worker() -> None:
        nonlocal fallback
        for chunk in chunks:  # shared: each worker takes the next chunk
            if tally.failure is not None or fallback:
                return
            try:
                status, results = await admin.bulk("/v1/keys/import", [entry.body for entry in chunk])
            except CliError as exc:
                tally.failure = tally.failure or exc
                return
            if status == 404:
                fallback = True  # an older gateway: the rest goes one record at a time
                return
            if status != 200:
                tally.failure = tally.failure or api_error(status, results[0] if results else None, admin.where)
                return
            by_line = {r.get("line"): r for r in results if isinstance(r, dict) and "line" in r}
            for n, entry in enumerate(chunk, start=1):
                result = by_line.get(n)
                kind = result.get("result") if result is not None else None
                if kind == "imported":
                    tally.imported += 1
                elif kind == "exists":
                    tally.skipped_existing += 1
                elif kind == "rejected" and result is not None:
                    tally.rejections.append(
                        keyfile.Rejection(entry.line, str(result.get("code")), str(result.get("detail") or ""))
                    )
                else:  # the answer ended early: its last line says why
                    error = next((r for r in results if isinstance(r, dict) and "error" in r), None)
                    tally.failure = tally.failure or (
                        api_error(400, error, admin.where)
                        if error is not None
                        else CliError(EXIT_UNREACHABLE, f"{admin.where} answered the import without every result")
                    )
                    return
            progress.update(tally)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, -(-len(entries) // BULK_CHUNK))):
            group.create_task(worker())
    if fallback and tally.failure is None:
        done = tally.imported + tally.skipped_existing + len(tally.rejections)
        rest = await _post_all(admin, entries[done:], concurrency, progress, tally)
        return rest
    return tally


async def _post_all(
    admin: Admin,
    entries: Sequence[keyfile.Entry],
    concurrency: int,
    progress: Progress,
    tally: Tally | None = None,
) -> Tally:
    tally = tally or Tally()
    pending: Iterator[keyfile.Entry] = iter(entries)

    async def worker() -> None:
        for entry in pending:  # shared: each worker takes the next record
            if tally.failure is not None:
                return
            try:
                status, data = await admin.send("POST", "/v1/keys", body=entry.body)
            except CliError as exc:
                tally.failure = tally.failure or exc
                return
            error = data.get("error") if isinstance(data, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            if status == 201 and isinstance(data, dict) and "id" in data:
                tally.imported += 1
            elif status == 409 and code == "key_exists":
                tally.skipped_existing += 1
            elif status == 400 and isinstance(error, dict) and isinstance(code, str):
                tally.rejections.append(keyfile.Rejection(entry.line, code, str(error.get("detail") or "")))
            else:
                tally.failure = tally.failure or (
                    api_error(status, data, admin.where)
                    if status != 201
                    else CliError(EXIT_UNREACHABLE, f"{admin.where} answered HTTP 201 but not as the admin API does")
                )
                return
            progress.update(tally)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(entries))):
            group.create_task(worker())
    return tally


def import_summary(
    path: str, fmt: str, plan: keyfile.Plan, tally: Tally | None, seconds: float, complete: bool
) -> dict[str, Any]:
    rejections = sorted([*plan.rejections, *(tally.rejections if tally else [])], key=lambda r: r.line)
    existing = tally.skipped_existing if tally else 0
    return {
        "file": path,
        "format": fmt,
        "dry_run": tally is None,
        "complete": complete,
        "records": plan.records,
        "valid": len(plan.entries) + len(plan.repeats),  # passed the checks here
        "imported": tally.imported if tally else 0,
        "skipped": existing + len(plan.repeats),
        "skipped_existing": existing,
        "skipped_repeated": len(plan.repeats),
        "rejected": len(rejections),
        "seconds": round(seconds, 3),
        "rejections": [r.public() for r in rejections],
        "repeats": [r.public() for r in plan.repeats],
    }


def import_text(s: dict[str, Any]) -> str:
    lines = [f"line {r['line']}: {r['code']}: {r['detail']}" for r in s["rejections"]]
    if s["dry_run"]:
        head = (
            f"dry run, nothing sent: {s['records']} record(s), {s['valid']} valid "
            f"({s['skipped_repeated']} repeating an earlier line), {s['rejected']} rejected"
        )
    else:
        head = (
            f"imported {s['imported']}, skipped {s['skipped']} ({s['skipped_existing']} already in the table, "
            f"{s['skipped_repeated']} repeating an earlier line), rejected {s['rejected']}; "
            f"{s['records']} record(s) in {s['seconds']:.1f} s"
        )
        if not s["complete"]:
            head = "stopped early: " + head
    return "\n".join([head, *lines])


async def keys_import(args: argparse.Namespace) -> int:
    if not 1 <= args.concurrency <= 256:
        raise CliError(EXIT_USAGE, "--concurrency: must be from 1 to 256")
    if args.file == "-" and args.format is None:
        raise CliError(EXIT_USAGE, "reading stdin (-) needs --format jsonl or --format csv")
    fmt = keyfile.detect_format(args.file, args.format)
    started = time.perf_counter()
    plan = read_plan(args.file, fmt)
    if args.dry_run:
        summary = import_summary(args.file, fmt, plan, None, time.perf_counter() - started, True)
        emit(args, summary, lambda: import_text(summary))
        return EXIT_REFUSED if summary["rejected"] else EXIT_OK
    progress = Progress(len(plan.entries), sys.stderr, sys.stderr.isatty() and not args.no_progress)
    async with connect(args, pool=args.concurrency) as admin:
        tally = await _import_all(admin, plan.entries, args.concurrency, progress)
    progress.update(tally, final=True)
    summary = import_summary(args.file, fmt, plan, tally, time.perf_counter() - started, tally.failure is None)
    emit(args, summary, lambda: import_text(summary))
    if tally.failure is not None:
        raise tally.failure
    return EXIT_REFUSED if summary["rejected"] else EXIT_OK


# argparse wiring -------------------------------------------------------------------------------


def _run(command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(command(args))
        except CliError as exc:
            warn(exc.message)
            return exc.code
        except keyfile.FileError as exc:
            warn(str(exc))
            return EXIT_USAGE
        except KeyboardInterrupt:
            warn("interrupted")
            return 130
        except BrokenPipeError:
            # stdout was closed early (`| head`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_REFUSED

    return func


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600")
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin-url",
        default=os.environ.get(URL_ENV) or DEFAULT_URL,
        help=f"the admin listener (default: ${URL_ENV}, else {DEFAULT_URL}); the token comes from ${TOKEN_ENV}",
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON (one document) instead of text")
    common.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS", help="per request (30)")
    return common


def register(sub: Any) -> None:
    """Add the `keys` and `audit` subcommands to the `gateway` parser's subparsers."""
    common = _common()
    keys_parser = sub.add_parser("keys", help="manage API keys through the admin API")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = keys_sub.add_parser("create", parents=[common], help="create a key; prints its plaintext once")
    create.add_argument("--name")
    create.add_argument("--owner")
    create.add_argument("--scope", action="append", default=[], help="a scope the key holds (repeatable)")
    create.add_argument("--meta", metavar="JSON", help="a JSON object kept with the key")
    create.add_argument("--expires-at", metavar="ISO8601", help="e.g. 2027-01-31T00:00:00Z (a date means 00:00Z)")
    create.add_argument("--prefix", help="the key's prefix (default gw_)")
    create.set_defaults(func=_run(keys_create))

    lst = keys_sub.add_parser("list", parents=[common], help="list keys (all of them, in creation order)")
    lst.add_argument("--owner")
    state = lst.add_mutually_exclusive_group()
    state.add_argument("--enabled", dest="enabled", action="store_true", default=None, help="enabled keys only")
    state.add_argument("--disabled", dest="enabled", action="store_false", help="disabled keys only (revoked ones too)")
    lst.add_argument("--limit", type=_positive, metavar="N", help="at most N keys (default: every key)")
    lst.add_argument("--cursor", help="start where an earlier --limit stopped (its next_cursor)")
    lst.add_argument("--unused-since", type=_unused_since, metavar="SPAN|TIME",
                     help="only keys not used since: 30d, 12h, 90m or an RFC 3339 time (never used too)")  # fmt: skip
    lst.set_defaults(func=_run(keys_list))

    use = keys_sub.add_parser("usage", parents=[common], help="a key's use: counts by outcome, addresses, last use")
    use.add_argument("id")
    use.add_argument("--window", choices=("1h", "24h", "30d"), default="24h", help="per minute, hour or day (24h)")
    use.set_defaults(func=_run(keys_usage))

    show = keys_sub.add_parser("show", parents=[common], help="one key's record")
    show.add_argument("id")
    show.set_defaults(func=_run(keys_show))

    for action, with_reason, text in (
        ("disable", True, "disable a key; answers once every replica dropped it"),
        ("enable", False, "re-enable a disabled key"),
        ("revoke", True, "revoke a key for good (admin role)"),
    ):
        p = keys_sub.add_parser(action, parents=[common], help=text)
        p.add_argument("id")
        if with_reason:
            p.add_argument("--reason", help="why (kept in the record and the audit log)")
        p.set_defaults(func=_run(_change(action, with_reason)))

    rotate = keys_sub.add_parser("rotate", parents=[common], help="issue a successor key; prints it once")
    rotate.add_argument("id")
    rotate.add_argument("--grace-seconds", type=int, default=0, metavar="N", help="old key works N more seconds (0)")
    rotate.set_defaults(func=_run(keys_rotate))

    upd = keys_sub.add_parser("update", parents=[common], help="change a key's limits, credits or fields")
    upd.add_argument("id")
    upd.add_argument("--limit", action="append", default=[], metavar="[NAME=]N/WINDOW",
                     help="a rate limit, e.g. 100/60s or hourly=1000/1h (repeatable; replaces the limits)")  # fmt: skip
    upd.add_argument("--on-store-error", choices=("deny", "allow"), default="deny",
                     help="the --limit's answer while Redis cannot be reached (deny)")  # fmt: skip
    upd.add_argument("--no-limits", action="store_true", help="remove every rate limit of the key")
    money = upd.add_mutually_exclusive_group()
    money.add_argument("--credits", type=int, metavar="N", help="set the credit balance to N")
    money.add_argument("--add-credits", type=int, metavar="N", help="add N credits (negative takes away)")
    upd.add_argument("--no-credits", action="store_true", help="remove the key's credits: no balance is checked")
    refill = upd.add_mutually_exclusive_group()
    refill.add_argument("--refill", metavar="N/INTERVAL", help="reset the balance to N each INTERVAL, e.g. 1000/1d")
    refill.add_argument("--no-refill", action="store_true", help="stop refilling the balance")
    upd.add_argument("--name")
    upd.add_argument("--scope", action="append", default=[], help="a scope (repeatable; replaces the key's scopes)")
    upd.add_argument("--meta", metavar="JSON", help="a JSON object kept with the key (replaces it)")
    expiry_group = upd.add_mutually_exclusive_group()
    expiry_group.add_argument("--expires-at", metavar="ISO8601", help="e.g. 2027-01-31T00:00:00Z")
    expiry_group.add_argument("--no-expiry", action="store_true", help="the key never expires")
    upd.set_defaults(func=_run(keys_update))

    imp = keys_sub.add_parser("import", parents=[common], help="import existing keys from a JSONL or CSV file")
    imp.add_argument("file", metavar="FILE", help="a .jsonl or .csv file, or - for stdin (with --format)")
    imp.add_argument("--format", choices=keyfile.FORMATS, help="jsonl or csv (default: from the file name)")
    imp.add_argument("--concurrency", type=int, default=16, metavar="N", help="requests in flight (16)")
    imp.add_argument("--dry-run", action="store_true", help="check the file only; send nothing")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal)")
    imp.set_defaults(func=_run(keys_import))

    aud = sub.add_parser("audit", parents=[common], help="the audit log, newest first (admin role)")
    aud.add_argument("--key-id", help="one key's entries only")
    many = aud.add_mutually_exclusive_group()
    many.add_argument("--limit", type=_positive, metavar="N", help=f"at most N entries ({AUDIT_DEFAULT})")
    many.add_argument("--all", action="store_true", help="every entry")
    aud.add_argument("--cursor", help="continue after an earlier answer's next_cursor")
    aud.set_defaults(func=_run(audit))
