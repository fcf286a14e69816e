"""When a failed attempt is tried again, and when an event is given up. Pure.

Exponential backoff with jitter, capped: the delay before attempt n+1 is drawn uniformly from
[d/2, d] where d = min(initial * 2^(n-1), max_interval) ("equal jitter": replicas and endpoints
that failed together spread out, and no delay is shorter than half its step). Attempts go on until
`horizon` seconds after the event; the last one is placed at the horizon itself, so an event is
tried for at least that long (24 h at least, config.py), and only then dropped.

May import: nothing of the gateway.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Schedule:
    initial: float  # seconds: the step before the first retry
    max_interval: float  # seconds: no step is longer
    horizon: float  # seconds after the event: the last attempt is due then, and none after it

    def step(self, attempt: int) -> float:
        """The delay's upper bound after `attempt` (1-based) failed, before jitter."""
        exponent = min(attempt - 1, 64)  # 2**64 * anything dwarfs any cap: no overflow
        return float(min(self.initial * 2.0**exponent, self.max_interval))

    def next_due(self, attempt: int, first: float, now: float, rng: random.Random | None = None) -> float | None:
        """When attempt `attempt + 1` is due (seconds, the clock of `first` and `now`), or None
        to give the event up: `first` is when the event happened, `now` when `attempt` failed."""
        deadline = first + self.horizon
        if now >= deadline:
            return None
        step = self.step(attempt)
        delay = (rng or random).uniform(step / 2, step)
        return min(now + delay, deadline)
