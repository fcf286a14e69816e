"""Messages on the invalidation channel (spec 8), pure: encode, sign, decode, verify.

Wire form: `<mac>.<json>` where mac is the hex HMAC-SHA256 of the JSON under
`redis.channel_secret`, or empty when no secret is configured. With a secret,
a message without a valid MAC is rejected; anything that does not parse is
rejected. A rejection is a reason string for a metric, never an exception.

    evict: {"t": "e", "n": nonce, "o": origin replica, "k": [[sha256, version], ...]}
    ack:   {"t": "a", "n": nonce, "r": replica}
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Final

import orjson

from gateway.keytable.record import SHA256_HEX

_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_MESSAGE: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Evict:
    nonce: str
    origin: str
    keys: tuple[tuple[str, int], ...]  # (sha256, version)


@dataclass(frozen=True, slots=True)
class Ack:
    nonce: str
    replica: str


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str  # "malformed" | "unsigned" | "bad_signature"


class Codec:
    def __init__(self, secret: str | None) -> None:
        self._key = secret.encode("utf-8") if secret else None

    def _mac(self, payload: bytes) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest().encode()

    def _wrap(self, payload: bytes) -> bytes:
        return (self._mac(payload) if self._key else b"") + b"." + payload

    def evict(self, nonce: str, origin: str, keys: list[tuple[str, int]]) -> bytes:
        return self._wrap(orjson.dumps({"t": "e", "n": nonce, "o": origin, "k": keys}))

    def ack(self, nonce: str, replica: str) -> bytes:
        return self._wrap(orjson.dumps({"t": "a", "n": nonce, "r": replica}))

    def decode(self, raw: bytes) -> Evict | Ack | Rejected:
        if not isinstance(raw, bytes) or len(raw) > MAX_MESSAGE:
            return Rejected("malformed")
        mac, dot, payload = raw.partition(b".")
        if not dot:
            return Rejected("malformed")
        if self._key is not None:
            if not mac:
                return Rejected("unsigned")
            if not hmac.compare_digest(mac, self._mac(payload)):
                return Rejected("bad_signature")
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return Rejected("malformed")
        if not isinstance(body, dict):
            return Rejected("malformed")
        nonce = body.get("n")
        if not isinstance(nonce, str) or not _TOKEN.fullmatch(nonce):
            return Rejected("malformed")
        kind = body.get("t")
        if kind == "a":
            replica = body.get("r")
            if not isinstance(replica, str) or not _TOKEN.fullmatch(replica):
                return Rejected("malformed")
            return Ack(nonce, replica)
        if kind == "e":
            origin, keys = body.get("o"), body.get("k")
            if not isinstance(origin, str) or not _TOKEN.fullmatch(origin) or not isinstance(keys, list) or not keys:
                return Rejected("malformed")
            parsed: list[tuple[str, int]] = []
            for item in keys:
                if (
                    not isinstance(item, list)
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or not SHA256_HEX.fullmatch(item[0])
                    or not isinstance(item[1], int)
                    or isinstance(item[1], bool)
                ):
                    return Rejected("malformed")
                parsed.append((item[0], item[1]))
            return Evict(nonce, origin, tuple(parsed))
        return Rejected("malformed")
