"""Console sessions (spec 11): server-side records in Redis behind a random id.

The cookie holds a random id (256 bits); Redis holds the record under the id's SHA-256, so a
copy of Redis gives no usable cookie. A record names the admin token's entry (its name and a
fingerprint of its configured hash), never the token, so the role is read from the configuration
on every request: a token removed or re-hashed ends its sessions. A session ends when it has been
idle for `idle_timeout_seconds` (the Redis TTL, renewed on use), `absolute_timeout_seconds` after
sign-in (checked on every read, and the TTL never outlives it), on sign-out (the record is
deleted), and when its token signs in more than `max_sessions_per_token` times (oldest first).

Also here: values shown once (a new key's plaintext, a change's result), kept under the session
for at most ONCE_SECONDS and deleted by the read that shows them (GETDEL). They are sealed with a
key derived from the session id (the cookie, which Redis never holds): a new key's plaintext is
never in Redis, its AOF, its replicas or a snapshot in the clear, and another session cannot open it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import Redis

from gateway.config import AdminToken, ConsoleConfig

SESSION_ID: Final = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
ONCE_SECONDS: Final = 120


def fingerprint(token: AdminToken) -> str:
    """Names a configured token entry without holding its hash: changes when the hash changes."""
    return hashlib.sha256(f"{token.name}\0{token.hash}".encode()).hexdigest()[:32]


_ONCE_CONTEXT: Final = b"gateway console once"  # bound into the key and authenticated with the value


def _once_key(session_id: str) -> AESGCM:
    """The session's key for shown-once values: derived from the session id (256 random bits,
    held only in the browser's cookie; Redis keeps only its SHA-256, see _digest)."""
    return AESGCM(hashlib.sha256(_ONCE_CONTEXT + b"\0" + session_id.encode()).digest())


def seal(session_id: str, plain: bytes) -> bytes:
    """`plain` encrypted and authenticated (AES-256-GCM, `cryptography`) under the session id:
    a fresh 96-bit nonce, then the ciphertext and its tag."""
    nonce = secrets.token_bytes(12)
    return nonce + _once_key(session_id).encrypt(nonce, plain, _ONCE_CONTEXT)


def unseal(session_id: str, sealed: bytes) -> bytes | None:
    """What `seal` sealed under this session id; None when it was sealed under another or altered."""
    if len(sealed) < 12 + 16:
        return None
    try:
        return _once_key(session_id).decrypt(sealed[:12], sealed[12:], _ONCE_CONTEXT)
    except InvalidTag:
        return None


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    id: str = field(repr=False)
    token_name: str
    token_fp: str = field(repr=False)
    csrf: str = field(repr=False)
    created: float
    seen: float

    def csrf_ok(self, offered: str | None) -> bool:
        """Constant-time comparison of a form's CSRF token with this session's."""
        return isinstance(offered, str) and hmac.compare_digest(offered.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, redis: Redis, prefix: str, config: ConsoleConfig, clock: Callable[[], float] = time.time):
        self.redis = redis
        self.config = config
        self._prefix = prefix + "console:"
        self._clock = clock

    def _key(self, session_id: str) -> str:
        return self._prefix + "s:" + _digest(session_id)

    def _index(self, token_name: str) -> str:
        return self._prefix + "t:" + hashlib.sha256(token_name.encode()).hexdigest()[:32]

    def _ttl_ms(self, created: float, now: float) -> int:
        remaining = created + self.config.absolute_timeout_seconds - now
        return max(1, int(min(self.config.idle_timeout_seconds, remaining) * 1000))

    async def create(self, token: AdminToken) -> Session:
        """A new session (a new id every sign-in); the token's oldest sessions past the cap end."""
        now = self._clock()
        session = Session(
            secrets.token_urlsafe(32), token.name, fingerprint(token), secrets.token_urlsafe(32), now, now
        )
        digest = _digest(session.id)
        index = self._index(token.name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(session.id), self._encode(session), px=self._ttl_ms(now, now))
            pipe.zadd(index, {digest: now})
            pipe.zremrangebyscore(index, "-inf", now - self.config.absolute_timeout_seconds)
            pipe.pexpire(index, int(self.config.absolute_timeout_seconds * 1000))
            pipe.zrange(index, 0, -(self.config.max_sessions_per_token + 1))
            replies = await pipe.execute()
        surplus = [d.decode() if isinstance(d, bytes) else str(d) for d in replies[-1]]
        if surplus:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(*[self._prefix + "s:" + d for d in surplus])
                pipe.zrem(index, *surplus)
                await pipe.execute()
        return session

    async def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, its idle clock restarted; None when there is none."""
        if not session_id or not SESSION_ID.fullmatch(session_id):
            return None
        key = self._key(session_id)
        raw = await self.redis.get(key)
        if raw is None:
            return None
        data = orjson.loads(raw)
        now = self._clock()
        created, seen = float(data["created"]), float(data["seen"])
        if now - created >= self.config.absolute_timeout_seconds or now - seen >= self.config.idle_timeout_seconds:
            await self.delete(session_id)
            return None
        session = Session(session_id, data["token_name"], data["token_fp"], data["csrf"], created, now)
        await self.redis.set(key, self._encode(session), px=self._ttl_ms(created, now), xx=True)
        return session

    async def delete(self, session_id: str) -> None:
        if SESSION_ID.fullmatch(session_id):
            await self.redis.delete(self._key(session_id), self._key(session_id) + ":once")

    async def put_once(self, session: Session, value: dict[str, object]) -> None:
        """Kept for the next page of this session only (a redirect's target), at most ONCE_SECONDS."""
        sealed = seal(session.id, orjson.dumps(value))
        await self.redis.set(self._key(session.id) + ":once", sealed, ex=ONCE_SECONDS)

    async def pop_once(self, session: Session) -> dict[str, object] | None:
        raw = await self.redis.getdel(self._key(session.id) + ":once")
        opened = unseal(session.id, raw) if isinstance(raw, bytes) else None
        if opened is None:
            return None
        value = orjson.loads(opened)
        return value if isinstance(value, dict) else None

    @staticmethod
    def _encode(session: Session) -> bytes:
        return orjson.dumps(
            {
                "token_name": session.token_name,
                "token_fp": session.token_fp,
                "csrf": session.csrf,
                "created": session.created,
                "seen": session.seen,
            }
        )
