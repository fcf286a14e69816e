"""API keys (spec 4): generation, hashing, the record, and the allow/deny decision. Pure."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Final

import orjson

from gateway.config import RateLimit, Route
from gateway.errors import Denial
from gateway.ratelimit.policy import CreditPolicy

DEFAULT_PREFIX: Final = "gw_"
PREFIX_RULE: Final = re.compile(r"[A-Za-z][A-Za-z0-9]{0,15}_")
RANDOM_BYTES: Final = 24  # 192 bits; the spec asks for at least 128
START_LENGTH: Final = 4  # characters of randomness shown after the prefix in `start`
SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")  # a key's digest, as stored and as announced
KEY_ID: Final = re.compile(r"key_[0-9a-f]{20}")  # what new_id makes


def digest(key: str) -> str:
    """SHA-256 hex of a key: keys are random, so a fast digest is the right store."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate(prefix: str = DEFAULT_PREFIX) -> str:
    return prefix + secrets.token_urlsafe(RANDOM_BYTES)


def new_id() -> str:
    return "key_" + secrets.token_hex(10)


def start_of(key: str) -> str:
    """The first characters of a key, for recognition: its prefix and a few more."""
    head, sep, _ = key.partition("_")
    if sep and len(head) < 17:
        return key[: len(head) + 1 + START_LENGTH]
    return key[:START_LENGTH]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    hash: str = field(repr=False)
    name: str | None = None
    owner: str | None = None
    scopes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    start: str | None = None
    prefix: str | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    enabled: bool = True
    disabled_at: float | None = None
    disabled_by: str | None = None
    disabled_reason: str | None = None
    revoked: bool = False
    revoked_at: float | None = None
    revoked_by: str | None = None
    imported: bool = False
    rotated_to: str | None = None
    version: int = 1
    ratelimits: tuple[RateLimit, ...] = ()  # spec 12: checked by gateway/ratelimit/ after the decision
    credits: CreditPolicy | None = None  # the balance itself is in Redis (ratelimit/store.py)

    def to_json(self) -> bytes:
        """The stored form. A field at its default is left out (from_json, here and in earlier
        versions, restores it): a typical record is about half the size (docs/scale.md)."""
        return orjson.dumps({k: v for k, v in asdict(self).items() if k in _ALWAYS_STORED or v != _DEFAULTS[k]})

    @classmethod
    def from_json(cls, data: bytes | str) -> KeyRecord:
        raw = orjson.loads(data)
        raw["scopes"] = tuple(raw.get("scopes") or ())
        raw["ratelimits"] = tuple(RateLimit(**limit) for limit in raw.get("ratelimits") or ())
        if raw.get("credits") is not None:
            raw["credits"] = CreditPolicy(**raw["credits"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def public(self) -> dict[str, Any]:
        """The operator's view (spec 4): no hash, times as RFC 3339."""
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "scopes": list(self.scopes),
            "meta": self.meta,
            "start": self.start,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "enabled": self.enabled,
            "disabled_at": rfc3339(self.disabled_at),
            "disabled_by": self.disabled_by,
            "disabled_reason": self.disabled_reason,
            "revoked": self.revoked,
            "revoked_at": rfc3339(self.revoked_at),
            "imported": self.imported,
            "rotated_to": self.rotated_to,
            "state": self.state(time.time()),
            "ratelimits": [asdict(limit) for limit in self.ratelimits],
            "credits": self.credits.public(None) if self.credits is not None else None,
        }

    def state(self, now: float) -> str:
        if self.revoked:
            return "revoked"
        if not self.enabled:
            return "disabled"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def bump(self, **changes: Any) -> KeyRecord:
        return replace(self, version=self.version + 1, **changes)


_DEFAULTS: Final[dict[str, Any]] = {
    f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(KeyRecord)
}
_ALWAYS_STORED: Final = frozenset({"id", "hash", "created_at", "version"})


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def decide(record: KeyRecord | None, route: Route, now: float, disabled_status: int) -> Denial | None:
    """Whether a looked-up key may use a route: None to forward, else the Denial."""
    if record is None:
        return Denial("key_not_found")
    if record.revoked:
        return Denial("key_revoked", status=disabled_status)
    if not record.enabled:
        return Denial("key_disabled", status=disabled_status)
    if record.expires_at is not None and now >= record.expires_at:
        return Denial("key_expired")
    missing = [s for s in route.scopes if s not in record.scopes]
    if missing:
        return Denial(
            "insufficient_permissions", "The API key lacks a scope this route requires: " + ", ".join(missing)
        )
    return None
