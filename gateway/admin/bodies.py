"""Admin API input, checked before anything touches Redis. Pure.

Each parser takes the decoded JSON (or query) and returns a typed request or
raises BadInput naming the field, the rule and never echoing a key.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from gateway.config import SCOPE_RULE, RateLimit, ratelimits_problem
from gateway.keytable.credentials import B64TOKEN, MAX_TOKEN_LENGTH
from gateway.keytable.record import KEY_ID, PREFIX_RULE, SHA256_HEX
from gateway.ratelimit.policy import MAX_CREDITS, MAX_REFILL_INTERVAL

MAX_TEXT: Final = 200  # names, owners and reasons (spec 7)
MAX_META_BYTES: Final = 4 * 1024  # meta, encoded as compact JSON (spec 7)
MAX_META_DEPTH: Final = 8  # meta itself is level 1: {"a": {"b": 1}} is 2 levels deep
MAX_SCOPES: Final = 100
MAX_GRACE_SECONDS: Final = 30 * 86400
MIN_IMPORTED_KEY: Final = 16
# C0, DEL, C1 and the Unicode line and paragraph separators: nothing that breaks a log line or a table.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_DIGITS: Final = re.compile(r"[0-9]{1,6}")  # ASCII only: str.isdigit() also takes superscripts


class BadInput(ValueError):
    """400 invalid_request; the message names the field and the rule."""


@dataclass(frozen=True, slots=True)
class CreateKey:
    name: str | None = None
    owner: str | None = None
    scopes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    expires_at: float | None = None
    prefix: str | None = None
    key: str | None = field(default=None, repr=False)  # import by plaintext
    key_sha256: str | None = None  # import by digest
    ratelimits: tuple[RateLimit, ...] = ()
    credits: Credits | None = None  # spec 12: `credits: {remaining, refill: {amount, interval}}`

    @property
    def is_import(self) -> bool:
        return self.key is not None or self.key_sha256 is not None


@dataclass(frozen=True, slots=True)
class Credits:
    """`credits` in a create or a PATCH: set the balance (`remaining`), or `add` to it (a PATCH only;
    negative takes away, never below 0), and the refill (`refill_given`: the body named `refill`;
    `refill` None then means no refill)."""

    remaining: int | None = None
    add: int | None = None
    refill: tuple[int, int] | None = None  # (amount, interval seconds)
    refill_given: bool = False


@dataclass(frozen=True, slots=True)
class UpdateKey:
    """A PATCH: the record fields it sets (name, meta, scopes, expires_at, ratelimits), and what it
    does to the credits: `credits_given` with `credits` None removes them."""

    fields: dict[str, Any]
    credits: Credits | None = None
    credits_given: bool = False


@dataclass(frozen=True, slots=True)
class ListQuery:
    owner: str | None
    enabled: bool | None
    cursor: str | None
    limit: int
    unused_since: float | None = None  # epoch seconds: only keys not used since then (gateway/usage)
    unused_since_text: str | None = None  # as given, for the cursor's context


@dataclass(frozen=True, slots=True)
class AuditQuery:
    key_id: str | None
    cursor: str | None
    limit: int


def parse_json_object(raw: bytes, *, empty_ok: bool) -> dict[str, Any]:
    if not raw.strip():
        if empty_ok:
            return {}
        raise BadInput("the request body must be a JSON object")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadInput("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadInput("the request body must be a JSON object")
    return value


def _only(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadInput(f"unknown field(s): {', '.join(unknown)[:200]} (allowed: {', '.join(sorted(allowed))})")


def _text(body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadInput(f"{name}: is required")
        return None
    if not isinstance(value, str):
        raise BadInput(f"{name}: must be a string")
    if not value.strip() or len(value) > MAX_TEXT or _CONTROL.search(value):
        raise BadInput(f"{name}: must be 1-{MAX_TEXT} characters without control characters")
    return value


def meta_depth(value: object, most: int) -> int:
    """How many levels of objects and arrays `value` nests (a scalar is 0), counted without
    recursion and stopping as soon as the count passes `most` (so a hostile value costs little)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        if deepest > most:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def _meta(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInput("meta: must be a JSON object")
    # Depth first: orjson refuses to encode past 254 levels, and every listing page encodes meta.
    if meta_depth(value, MAX_META_DEPTH) > MAX_META_DEPTH:
        raise BadInput(f"meta: must be at most {MAX_META_DEPTH} levels deep (meta itself is level 1)")
    if len(orjson.dumps(value)) > MAX_META_BYTES:
        raise BadInput(f"meta: must be at most {MAX_META_BYTES} bytes of JSON")
    return value


def timestamp(value: object, name: str) -> float | None:
    """An RFC 3339 date-time with an offset, as seconds since the epoch."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput(f"{name}: must be an RFC 3339 date-time string, e.g. 2027-01-31T12:00:00Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadInput(f"{name}: must be an RFC 3339 date-time, e.g. 2027-01-31T12:00:00Z") from None
    if parsed.tzinfo is None or "T" not in value.upper():
        raise BadInput(f"{name}: must be an RFC 3339 date-time with a time zone, e.g. 2027-01-31T12:00:00Z")
    try:  # in UTC too a year of 4 digits, as it is shown back (record.rfc3339)
        parsed.astimezone(UTC)
    except OverflowError:
        raise BadInput(f"{name}: must be a date-time between the years 1 and 9999 in UTC") from None
    return parsed.timestamp()


def _scopes(value: object) -> tuple[str, ...]:
    scopes = [] if value is None else value
    if not isinstance(scopes, list) or len(scopes) > MAX_SCOPES:
        raise BadInput(f"scopes: must be a list of at most {MAX_SCOPES} scope names")
    for scope in scopes:
        if not isinstance(scope, str) or not SCOPE_RULE.fullmatch(scope):
            raise BadInput("scopes: each must be a scope name (letters, digits, _ . : / * -)")
    return tuple(scopes)


def ratelimits(value: object) -> tuple[RateLimit, ...]:
    if value is None:
        return ()
    got = ratelimits_problem(value)
    if isinstance(got, str):
        raise BadInput(f"ratelimits: {got}")
    return got


def _whole(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadInput(f"{name}: must be a whole number from {low} to {high}")
    return value


def credits(value: object, *, patch: bool) -> Credits | None:
    """`{remaining, refill: {amount, interval}}` (on a PATCH also `{add}` instead of `remaining`)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadInput("credits: must be an object {remaining, refill: {amount, interval}}")
    allowed = {"remaining", "refill", "add"} if patch else {"remaining", "refill"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise BadInput(f"credits: unknown field(s) {', '.join(unknown)[:100]} (allowed: {', '.join(sorted(allowed))})")
    if "remaining" in value and "add" in value:
        raise BadInput("credits: give remaining (set the balance) or add (change it), not both")
    if not value:
        raise BadInput("credits: give remaining, add or refill (or null to remove the credits)")
    remaining = value.get("remaining")
    if remaining is not None:
        remaining = _whole(remaining, "credits.remaining", 0, MAX_CREDITS)
    elif not patch:
        raise BadInput("credits.remaining: is required")
    add = value.get("add")
    if add is not None:
        add = _whole(add, "credits.add", -MAX_CREDITS, MAX_CREDITS)
    refill: tuple[int, int] | None = None
    raw_refill = value.get("refill")
    if raw_refill is not None:
        if not isinstance(raw_refill, dict) or set(raw_refill) != {"amount", "interval"}:
            raise BadInput("credits.refill: must be an object {amount, interval} (interval in seconds)")
        refill = (
            _whole(raw_refill["amount"], "credits.refill.amount", 1, MAX_CREDITS),
            _whole(raw_refill["interval"], "credits.refill.interval", 1, MAX_REFILL_INTERVAL),
        )
    return Credits(remaining, add, refill, "refill" in value)


def update(body: Mapping[str, Any], now: float) -> UpdateKey:
    """PATCH /v1/keys/{id}: only the fields named change; null clears expires_at, ratelimits, credits."""
    _only(body, {"name", "meta", "scopes", "expires_at", "ratelimits", "credits"})
    if not body:
        raise BadInput("the body must name at least one field to change")
    fields: dict[str, Any] = {}
    if "name" in body:
        fields["name"] = _text(body, "name")
    if "meta" in body:
        fields["meta"] = _meta(body["meta"])
    if "scopes" in body:
        fields["scopes"] = _scopes(body["scopes"])
    if "expires_at" in body:
        expires_at = timestamp(body["expires_at"], "expires_at")
        if expires_at is not None and expires_at <= now:
            raise BadInput("expires_at: must be in the future")
        fields["expires_at"] = expires_at
    if "ratelimits" in body:
        fields["ratelimits"] = ratelimits(body["ratelimits"])
    return UpdateKey(fields, credits(body.get("credits"), patch=True), "credits" in body)


def create(body: Mapping[str, Any], now: float) -> CreateKey:
    _only(body, {"name", "owner", "scopes", "meta", "expires_at", "prefix", "key", "key_sha256", "ratelimits",
                 "credits"})  # fmt: skip
    scopes = _scopes(body.get("scopes"))
    meta = _meta(body.get("meta"))
    expires_at = timestamp(body.get("expires_at"), "expires_at")
    if expires_at is not None and expires_at <= now:
        raise BadInput("expires_at: must be in the future")
    prefix = body.get("prefix")
    if prefix is not None and (not isinstance(prefix, str) or not PREFIX_RULE.fullmatch(prefix)):
        raise BadInput("prefix: must be a letter, up to 15 letters or digits, then '_' (e.g. 'gw_')")
    key = body.get("key")
    key_sha256 = body.get("key_sha256")
    if key is not None and key_sha256 is not None:
        raise BadInput("key, key_sha256: give one or the other, not both")
    if key is not None:
        # Never echo the key back, not even in the error.
        if (
            not isinstance(key, str)
            or not (MIN_IMPORTED_KEY <= len(key) <= MAX_TOKEN_LENGTH)
            or not B64TOKEN.fullmatch(key)
        ):
            raise BadInput(
                f"key: must be a string of {MIN_IMPORTED_KEY}-{MAX_TOKEN_LENGTH} characters "
                "that a client can send as a bearer token (A-Z a-z 0-9 - . _ ~ + / =)"
            )
    if key_sha256 is not None:
        if not isinstance(key_sha256, str) or not SHA256_HEX.fullmatch(key_sha256.lower()):
            raise BadInput("key_sha256: must be 64 hexadecimal characters (the SHA-256 of the key)")
        key_sha256 = key_sha256.lower()
    if prefix is not None and (key is not None or key_sha256 is not None):
        raise BadInput("prefix: applies to generated keys only, not to an import")
    return CreateKey(
        name=_text(body, "name"),
        owner=_text(body, "owner"),
        scopes=scopes,
        meta=meta,
        expires_at=expires_at,
        prefix=prefix,
        key=key,
        key_sha256=key_sha256,
        ratelimits=ratelimits(body.get("ratelimits")),
        credits=credits(body.get("credits"), patch=False),
    )


def reason(body: Mapping[str, Any]) -> str | None:
    _only(body, {"reason"})
    value = body.get("reason")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or _CONTROL.search(value):
        raise BadInput(f"reason: must be a string of at most {MAX_TEXT} characters without control characters")
    return value


def grace_seconds(body: Mapping[str, Any]) -> int:
    _only(body, {"grace_seconds"})
    value = body.get("grace_seconds", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GRACE_SECONDS:
        raise BadInput(f"grace_seconds: must be a whole number from 0 to {MAX_GRACE_SECONDS}")
    return value


def _limit(query: Mapping[str, str], default: int, most: int) -> int:
    raw = query.get("limit")
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= most:
        raise BadInput(f"limit: must be a whole number from 1 to {most}")
    return int(raw)


def list_query(query: Mapping[str, str]) -> ListQuery:
    _only(query, {"owner", "enabled", "cursor", "limit", "unused_since"})
    enabled_raw = query.get("enabled")
    enabled: bool | None = None
    if enabled_raw is not None:
        if enabled_raw not in ("true", "false"):
            raise BadInput("enabled: must be true or false")
        enabled = enabled_raw == "true"
    owner = _text(query, "owner") if query.get("owner") else None
    since_text = query.get("unused_since") or None
    since = unused_since(since_text) if since_text is not None else None
    return ListQuery(owner, enabled, query.get("cursor") or None, _limit(query, 20, 100), since, since_text)


_AGO = re.compile(r"([0-9]{1,5})([mhd])")
_AGO_SECONDS: Final = {"m": 60, "h": 3600, "d": 86400}


def unused_since(text: str) -> float:
    """`unused_since=`: a span back from now (`30d`, `12h`, `90m`) or an RFC 3339 time, as epoch seconds."""
    ago = _AGO.fullmatch(text)
    if ago is not None:
        return time.time() - int(ago[1]) * _AGO_SECONDS[ago[2]]
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00")) if len(text) <= 40 else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise BadInput("unused_since: must be a span such as 30d, 12h or 90m, or an RFC 3339 time with its offset")
    return at.timestamp()


def audit_query(query: Mapping[str, str]) -> AuditQuery:
    _only(query, {"key_id", "cursor", "limit"})
    key_id = query.get("key_id") or None
    if key_id is not None and not KEY_ID.fullmatch(key_id):
        raise BadInput("key_id: must be a key id (key_...)")
    # The cursor is checked (signature, bounds) by the handler's CursorCodec.
    return AuditQuery(key_id, query.get("cursor") or None, _limit(query, 50, 500))


def valid_key_id(value: str) -> bool:
    return KEY_ID.fullmatch(value) is not None
