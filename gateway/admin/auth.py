"""Admin API credentials: argon2id hashes from the config, verified once per token.

argon2id costs tens of milliseconds on purpose, so each token is verified
against the configured hashes once per process (in a worker thread, at most two
at a time so a flood of wrong tokens cannot starve the event loop; concurrent
calls with the same token share one verification) and then recognised by its
SHA-256 in memory. A wrong token is remembered too, in a bounded set, so
repeating it costs nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.config import ROLES, AdminToken

ROLE_RANK: Final = {role: rank for rank, role in enumerate(ROLES)}
_REMEMBER_WRONG: Final = 1024


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str

    def may(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


class TokenVerifier:
    def __init__(self, tokens: tuple[AdminToken, ...]) -> None:
        self._tokens = tokens
        self._hasher = PasswordHasher()
        self._known: dict[str, Principal] = {}
        self._wrong: OrderedDict[str, None] = OrderedDict()
        self._gate = asyncio.Semaphore(2)
        self._inflight: dict[str, asyncio.Future[Principal | None]] = {}

    async def verify(self, token: str) -> Principal | None:
        fingerprint = hashlib.sha256(token.encode("utf-8")).hexdigest()
        principal = self._known.get(fingerprint)
        if principal is not None or fingerprint in self._wrong:
            return principal
        inflight = self._inflight.get(fingerprint)
        if inflight is not None:
            return await asyncio.shield(inflight)
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._inflight[fingerprint] = future
        try:
            async with self._gate:
                principal = await asyncio.get_running_loop().run_in_executor(None, self._verify_slowly, token)
            if principal is not None:
                self._known[fingerprint] = principal
            else:
                self._wrong[fingerprint] = None
                if len(self._wrong) > _REMEMBER_WRONG:
                    self._wrong.popitem(last=False)
            future.set_result(principal)
            return principal
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._inflight[fingerprint]

    def _verify_slowly(self, token: str) -> Principal | None:
        for candidate in self._tokens:
            try:
                self._hasher.verify(candidate.hash, token)
            except (VerificationError, InvalidHashError):
                continue
            return Principal(candidate.name, candidate.role)
        return None


def hash_token(token: str) -> str:
    """An argon2id hash for the config (RFC 9106 low-memory parameters)."""
    return PasswordHasher().hash(token)
