"""The cache's trust: whether this replica may answer from its cache now (spec 8).

`Coherence` holds the trust state the coherence subscriber (gateway/coherence/subscriber.py)
drives and the lookup (gateway/keytable/lookup.py) reads on every request: a subscription session
that is live, a lease extended by each lease probe heard on the subscription (from its send time), and the live-set
membership's end. The lease arithmetic lives here too, so the writer's side
(gateway/coherence/propagation.py: how long a change's answer waits for a replica that never acked)
and the reader's side (the proxy's in-flight margin) compute from the same constants.

Pure: a clock is passed in; nothing here does I/O. Imports nothing of the gateway's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

# A clock may run this much slower or faster than another's (monotonic clocks on NTP-disciplined
# hosts differ by parts per million; 1% is a wide margin that still costs only 10 ms a second).
CLOCK_RATE_MARGIN: Final = 0.01
# A request that passed its cache check just before the trust ended still has to reach its first
# byte to the upstream: the answer of a change waits this much longer than the lease (and trust ends
# this much before the live-set membership can expire).
IN_FLIGHT_MARGIN: Final = 0.075


def lease_lapsed_by(written_at: float, lease_seconds: float) -> float:
    """When (on the clock that read `written_at`, taken after the change's write returned) every
    lease granted for a probe that Redis processed before the write has certainly run out, and
    every request admitted under it has reached the upstream."""
    return written_at + lease_seconds * (1 + CLOCK_RATE_MARGIN) + IN_FLIGHT_MARGIN


def membership_trusted_until(sent_at: float, ttl_seconds: float) -> float:
    """The end of trust granted by a join or heartbeat sent at `sent_at` (this replica's
    monotonic clock): before the member can expire in Redis (whose clock starts the TTL later,
    when it runs the command), with the same margins as the lease."""
    return sent_at + ttl_seconds * (1 - CLOCK_RATE_MARGIN) - IN_FLIGHT_MARGIN


class Coherence:
    """Whether this replica may trust its cache now, and since when it may not.

    `coherent` is read on every request: one monotonic clock read and a comparison with the
    moment trust ends, which is the earliest of the lease's end and the membership's end while
    the subscription session is live, and minus infinity otherwise.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, lease_seconds: float = 1.0) -> None:
        self._clock = self.clock = clock
        self.lease_seconds = lease_seconds
        self.session = False  # the subscription session is live (subscribed, joined, cache cleared)
        self.lease_until = -math.inf
        self.member_until = math.inf  # no registry (unit tests): the lease alone bounds the trust
        self._until = -math.inf
        self.broken_at: float = clock()

    @property
    def coherent(self) -> bool:
        return self._clock() < self._until

    def _recompute(self) -> None:
        self._until = min(self.lease_until, self.member_until) if self.session else -math.inf

    def restored(self, lease_from: float | None = None, member_until: float | None = None) -> None:
        """A new session: subscribed (the SUBSCRIBE sent at `lease_from` was answered), joined."""
        self.session = True
        self.lease_until = (self._clock() if lease_from is None else lease_from) + self.lease_seconds
        if member_until is not None:
            self.member_until = member_until
        self._recompute()

    def renew(self, sent_at: float) -> None:
        """A lease probe published at `sent_at` was heard on the subscription connection."""
        until = sent_at + self.lease_seconds
        if until > self.lease_until:
            self.lease_until = until
            self._recompute()

    def membership(self, until: float) -> None:
        """A join or heartbeat succeeded: the member cannot expire before `until`."""
        self.member_until = until
        self._recompute()

    def lost(self) -> None:
        if self.session:
            now = self._clock()
            self.broken_at = min(now, self._until)  # a lease that lapsed earlier broke the trust then
            self.session = False
            self.lease_until = -math.inf
            self._recompute()

    def broken_for(self) -> float:
        now = self._clock()
        if now < self._until:
            return 0.0
        return now - (self._until if self.session else self.broken_at)

    def remaining(self) -> float:
        """Seconds of trust left (0 when the cache is not trusted); for the metrics gauge."""
        return max(0.0, self._until - self._clock()) if self.session else 0.0
