"""Admin API credentials (spec 7): `gwadm_<id>_<secret>` tokens checked against argon2id hashes.

The `<id>` selects the one configured hash to verify, so a token whose id is not
configured is refused without argon2 work. argon2id costs a few hundred
milliseconds of CPU on purpose; it runs in a worker thread, never on the event
loop, one verification at a time *per id* (and one for the legacy entries), so
wrong tokens for one id or for the legacy entries never queue in front of a
valid token of another id. A verified token is recognised afterwards by its
SHA-256 in memory; a wrong one is remembered too (bounded), so repeating it
costs nothing.

Legacy entries (no `id`, from before the token shape): a token that does not
select a configured id is verified against them, one by one, as before. Once
every entry carries an id, such a token is refused without argon2 work.

Failed attempts are throttled per client address (IPv6 per /64) and per target
(the token id, the legacy entries, or neither): after `max_failures` failures in
`window_seconds` the address gets 429 with `Retry-After` for that target,
before any argon2 work. Verifications still running count against the budget,
so a burst of concurrent guesses cannot pass it either. A token already
verified passes without being throttled: it costs nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.config import ROLES, AdminToken

ROLE_RANK: Final = {role: rank for rank, role in enumerate(ROLES)}
TOKEN_PREFIX: Final = "gwadm_"  # noqa: S105 (the shape, not a secret)
# gwadm_<id>_<secret>: the id as the config allows it (config._check_token_id), a secret of
# URL-safe characters (the generated one is 43).
TOKEN_ID: Final = re.compile(r"[a-z0-9]{4,32}")
TOKEN_SHAPE: Final = re.compile(r"gwadm_([a-z0-9]{4,32})_([A-Za-z0-9_-]{16,512})")
# The longest bearer token the admin API reads (a shaped one is at most 551; legacy ones, any shape).
MAX_ADMIN_TOKEN_LENGTH: Final = 1024
MAX_FAILURES: Final = 10
WINDOW_SECONDS: Final = 60.0
MAX_QUEUED_PER_TARGET: Final = 16  # verifications waiting or running for one id; more: 429, retry shortly
_MAX_THREADS: Final = 8
_REMEMBER_WRONG: Final = 1024
_REMEMBER_CLIENTS: Final = 10_000
_LEGACY: Final = "\0legacy"  # a target that is no token id (ids are [a-z0-9])
_NOWHERE: Final = "\0none"  # a token that selects nothing: refused without argon2


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str

    def may(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


@dataclass(frozen=True, slots=True)
class Throttled:
    """Refused before any argon2 work: too many failures from this address (or too many
    verifications in progress for this id). `retry_after` is whole seconds."""

    retry_after: int
    busy: bool = False  # too many verifications in progress for this id, not this address's failures


def token_id(token: str) -> str | None:
    """The `<id>` of a `gwadm_<id>_<secret>` token, None for any other shape."""
    match = TOKEN_SHAPE.fullmatch(token)
    return match[1] if match else None


def client_bucket(remote: str | None) -> str:
    """Whom failures are counted against: the address; for IPv6 its /64 (one host's usual share)."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class _Attempts:
    __slots__ = ("failures", "pending")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.pending = 0


class FailureThrottle:
    """Failures per (client, target) in a sliding window; bounded in memory (least recently used go)."""

    def __init__(self, max_failures: int, window_seconds: float, clock: Callable[[], float]) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Attempts] = OrderedDict()

    def _get(self, key: tuple[str, str]) -> _Attempts:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Attempts()
            while len(self._entries) > _REMEMBER_CLIENTS:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        horizon = self._clock() - self.window_seconds
        while entry.failures and entry.failures[0] <= horizon:
            entry.failures.popleft()
        return entry

    def retry_after(self, key: tuple[str, str]) -> int | None:
        """Seconds to wait when the budget is spent, else None."""
        entry = self._get(key)
        if len(entry.failures) + entry.pending < self.max_failures:
            return None
        if not entry.failures:
            return 1  # spent by verifications in progress: they end within a second or so
        # The oldest failure that has to expire for one more attempt to fit.
        index = max(0, len(entry.failures) + entry.pending - self.max_failures)
        wait = entry.failures[min(index, len(entry.failures) - 1)] + self.window_seconds - self._clock()
        return max(1, math.ceil(wait))

    def failed(self, key: tuple[str, str]) -> None:
        self._get(key).failures.append(self._clock())

    def begin(self, key: tuple[str, str]) -> None:
        self._get(key).pending += 1

    def end(self, key: tuple[str, str]) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.pending > 0:
            entry.pending -= 1


class TokenVerifier:
    def __init__(
        self,
        tokens: tuple[AdminToken, ...],
        *,
        max_failures: int = MAX_FAILURES,
        window_seconds: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tokens = tokens
        self._by_id = {t.id: t for t in tokens if t.id is not None}
        self._legacy = tuple(t for t in tokens if t.id is None)
        self._hasher = PasswordHasher()
        self._known: dict[str, Principal] = {}
        self._wrong: OrderedDict[str, None] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[Principal | None]] = {}
        targets = [*self._by_id, *([_LEGACY] if self._legacy else [])]
        self._gates = {target: asyncio.Semaphore(1) for target in targets}
        self._queued = dict.fromkeys(targets, 0)
        self._threads = max(1, min(len(targets), _MAX_THREADS))
        self._executor: ThreadPoolExecutor | None = None
        self.throttle = FailureThrottle(max_failures, window_seconds, clock)

    @property
    def tokens(self) -> tuple[AdminToken, ...]:
        return self._tokens

    def _target(self, token: str) -> str:
        tid = token_id(token)
        if tid is not None and tid in self._by_id:
            return tid
        return _LEGACY if self._legacy else _NOWHERE

    async def verify(self, token: str, client: str | None = None) -> Principal | Throttled | None:
        """The token's principal; None for a wrong token; Throttled before any argon2 work."""
        fingerprint = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        principal = self._known.get(fingerprint)
        if principal is not None:
            return principal
        target = self._target(token)
        key = (client_bucket(client), target)
        wait = self.throttle.retry_after(key)
        if wait is not None:
            return Throttled(wait)
        if target == _NOWHERE or fingerprint in self._wrong:
            self.throttle.failed(key)
            return None
        task = self._inflight.get(fingerprint)
        if task is None:
            if self._queued[target] >= MAX_QUEUED_PER_TARGET:
                return Throttled(1, busy=True)
            task = self._start(fingerprint, token, target, key)
        return await asyncio.shield(task)  # a wrong token's failure is counted when its verification ends

    def _start(self, fingerprint: str, token: str, target: str, key: tuple[str, str]) -> asyncio.Task[Principal | None]:
        """A verification that finishes (and is remembered) even if every caller goes away."""
        self._queued[target] += 1
        self.throttle.begin(key)
        task = asyncio.get_running_loop().create_task(self._verify(fingerprint, token, target))
        self._inflight[fingerprint] = task

        def done(t: asyncio.Task[Principal | None]) -> None:
            self._queued[target] -= 1
            # The failure is counted in the same step as the verification stops being pending: between
            # the two, another attempt would see the budget one short of spent.
            if not t.cancelled() and t.exception() is None and t.result() is None:
                self.throttle.failed(key)
            self.throttle.end(key)
            self._inflight.pop(fingerprint, None)

        task.add_done_callback(done)
        return task

    async def _verify(self, fingerprint: str, token: str, target: str) -> Principal | None:
        candidates = (self._by_id[target],) if target in self._by_id else self._legacy
        async with self._gates[target]:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="gateway-argon2")
            loop = asyncio.get_running_loop()
            principal = await loop.run_in_executor(self._executor, self._verify_slowly, token, candidates)
        if principal is not None:
            self._known[fingerprint] = principal
        else:
            self._wrong[fingerprint] = None
            if len(self._wrong) > _REMEMBER_WRONG:
                self._wrong.popitem(last=False)
        return principal

    def _verify_slowly(self, token: str, candidates: tuple[AdminToken, ...]) -> Principal | None:
        for candidate in candidates:
            try:
                self._hasher.verify(candidate.hash, token)
            except (VerificationError, InvalidHashError):
                continue
            return Principal(candidate.name, candidate.role)
        return None

    def close(self) -> None:
        """Let the worker threads go (they also go when the verifier is collected)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def hash_token(token: str) -> str:
    """An argon2id hash for the config (RFC 9106 low-memory parameters)."""
    return PasswordHasher().hash(token)
