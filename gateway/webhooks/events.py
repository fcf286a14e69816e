"""Which audit entries are which key events, and the payload each carries. Pure.

Every change to a key is an entry in the audit stream (keytable/store.py), written in the change's
own transaction; `from_audit` turns one into an event, or None for an entry that is no event.

| audit action | actor | event |
|---|---|---|
| create, import | any | key.created (`detail.rotated_from` names the rotated key for a rotation's new key) |
| disable | `policy:<name>` | key.auto_disabled (`data.policy` is the name) |
| disable | anyone else | key.disabled |
| enable | any | key.enabled |
| revoke | any | key.revoked |
| rotate | any | key.rotated (`detail.new_key_id`, `detail.grace_seconds`) |

`expiring_soon` makes key.expiring_soon from a record. A payload is built field by field from what
is safe to send: a key's id, name, owner, state and expiry, never its hash or plaintext, its scopes
or meta.

May import: keytable.record, config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.keytable.record import KeyRecord, rfc3339

MAX_BODY_BYTES: Final = 64 * 1024  # a payload larger than this (it cannot be with the admin API's bounds) is dropped
POLICY_ACTOR: Final = "policy:"

_ACTIONS: Final = {
    "create": "key.created",
    "import": "key.created",
    "disable": "key.disabled",
    "enable": "key.enabled",
    "revoke": "key.revoked",
    "rotate": "key.rotated",
}
# The state a change leaves its key in, where the change decides it.
_STATE_AFTER: Final = {"key.disabled": "disabled", "key.auto_disabled": "disabled", "key.revoked": "revoked"}


@dataclass(frozen=True, slots=True)
class Event:
    msg_id: str  # webhook-id: the same for every attempt and every endpoint
    type: str
    at: float  # when it happened (seconds since the epoch): retries go on until at + the retry horizon
    body: bytes  # the JSON payload, signed as it is (empty when oversized)
    oversized: bool = False  # the payload is over MAX_BODY_BYTES: not sent, dropped and counted


def kind(action: str | None, actor: str | None) -> str | None:
    """The event type of an audit entry, or None when the entry is no event (e.g. `policy_match`)."""
    event = _ACTIONS.get(action or "")
    if event == "key.disabled" and (actor or "").startswith(POLICY_ACTOR):
        return "key.auto_disabled"
    return event


def _key(key_id: str, record: KeyRecord | None, state: str | None) -> dict[str, Any]:
    return {
        "id": key_id,
        "name": record.name if record is not None else None,
        "owner": record.owner if record is not None else None,
        "state": state,
        "expires_at": rfc3339(record.expires_at) if record is not None else None,
    }


def _state(event: str, record: KeyRecord | None, at: float) -> str | None:
    fixed = _STATE_AFTER.get(event)
    if fixed is not None:
        return fixed
    if record is None:
        return None
    if event == "key.enabled":
        return "expired" if record.expires_at is not None and at >= record.expires_at else "active"
    return record.state(at)


def _encoded(payload: dict[str, Any]) -> bytes | None:
    body = orjson.dumps(payload)
    if len(body) > MAX_BODY_BYTES:
        payload["data"].pop("detail", None)
        body = orjson.dumps(payload)
    return body if len(body) <= MAX_BODY_BYTES else None


def from_audit(entry: dict[str, Any], at: float, record: KeyRecord | None) -> Event | None:
    """The event of one audit entry (as store.audit_entry decodes it; `at` from its stream id), read
    with the key's record as it is now (for its name and owner); None when the entry is no event."""
    event = kind(entry.get("action"), entry.get("actor"))
    key_id = entry.get("key_id")
    if event is None or not isinstance(key_id, str):
        return None
    actor = entry.get("actor")
    data: dict[str, Any] = {"key": _key(key_id, record, _state(event, record, at)), "actor": actor,
                            "reason": entry.get("reason")}  # fmt: skip
    if event == "key.auto_disabled" and isinstance(actor, str):
        data["policy"] = actor[len(POLICY_ACTOR) :]
    detail = entry.get("detail")
    if isinstance(detail, dict) and detail:
        data["detail"] = detail
    payload = {"type": event, "timestamp": entry.get("at") or rfc3339(at), "data": data}
    body = _encoded(payload)
    return Event("msg_" + str(entry["id"]), event, at, body or b"", oversized=body is None)


def expiring_soon(record: KeyRecord, now: float) -> Event:
    """key.expiring_soon for a record whose expires_at is near; its id is the same for one key and
    one expiry (a second check, or a second replica, makes the same message)."""
    assert record.expires_at is not None
    data = {"key": _key(record.id, record, record.state(now)), "actor": None, "reason": None}
    payload = {"type": "key.expiring_soon", "timestamp": rfc3339(now), "data": data}
    body = _encoded(payload)
    msg_id = f"msg_exp_{record.id}_{int(record.expires_at * 1000)}"
    return Event(msg_id, "key.expiring_soon", now, body or b"", oversized=body is None)
