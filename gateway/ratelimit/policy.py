"""What a request is limited by, and how a refusal says so (spec 12). Pure.

A key's record holds its own rate limits (`config.RateLimit`) and, when it has credits, a
`CreditPolicy`; a route holds default limits and a `cost`. `effective` merges them for one
request: the key's limits, then each route default whose name the key does not use. Each limit
counts under a `scope`: the key's own under its name, a route default under `route/<route>/<name>`
(so a default applies to each key on that route separately).

The 429 headers follow draft-ietf-httpapi-ratelimit-headers-10 (27 September 2025):
`RateLimit-Policy: "<name>";q=<limit>;w=<window seconds>` and
`RateLimit: "<name>";r=<remaining>;t=<seconds until the window resets>`, one list member per
limit that refused the request, with `Retry-After` the largest `t`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

from gateway.config import MAX_RATELIMIT, MAX_WINDOW_SECONDS, RateLimit, Route

MAX_CREDITS: Final = 10**15  # a balance, a refill amount, an addition (exact in a Lua double)
MAX_REFILL_INTERVAL: Final = 366 * 86_400
NO_REFILL_RETRY_AFTER: Final = 3600  # usage_exceeded without a refill due: credits come from an operator
_SPEC: Final = re.compile(r"([0-9]{1,10})/([0-9]{1,6})(s|m|h|d)?")
_UNIT: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400, None: 1}


@dataclass(frozen=True, slots=True)
class CreditPolicy:
    """A key that spends credits. The balance itself lives in Redis (ratelimit/store.py) under
    `pool`: the id of the key it was created for (a rotated key's successor shares it). With a
    refill, the balance is set to `refill_amount` each `refill_interval` seconds."""

    pool: str
    refill_amount: int | None = None
    refill_interval: int | None = None

    def public(self, remaining: int | None) -> dict[str, object]:
        refill = None
        if self.refill_amount is not None and self.refill_interval is not None:
            refill = {"amount": self.refill_amount, "interval": self.refill_interval}
        return {"remaining": remaining, "refill": refill}


@dataclass(frozen=True, slots=True)
class Applied:
    """One limit as it applies to one request: the limit and the counter it is kept under."""

    limit: RateLimit
    scope: str  # the limit's name for a key's own limit, route/<route>/<name> for a route default


def effective(key_limits: tuple[RateLimit, ...], route: Route) -> tuple[Applied, ...]:
    """The limits a request with this key on this route is checked against, all or nothing."""
    applied = [Applied(limit, limit.name) for limit in key_limits]
    names = {limit.name for limit in key_limits}
    for limit in route.ratelimits:
        if limit.name not in names:
            applied.append(Applied(limit, f"route/{route.name}/{limit.name}"))
    return tuple(applied)


def parse_spec(text: str, name: str = "default") -> RateLimit:
    """`100/60s`, `1000/1h`, `10/1` (seconds) as a rate limit named `name`; ValueError otherwise."""
    match = _SPEC.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r}: a rate limit is LIMIT/WINDOW, e.g. 100/60s, 1000/1h, 10000/1d")
    limit, window = int(match[1]), int(match[2]) * _UNIT[match[3]]
    if not 1 <= limit <= MAX_RATELIMIT:
        raise ValueError(f"{text!r}: the limit must be from 1 to {MAX_RATELIMIT}")
    if not 1 <= window <= MAX_WINDOW_SECONDS:
        raise ValueError(f"{text!r}: the window must be from 1 s to 1 day")
    return RateLimit(name, limit, window)


def seconds_until(ms: float) -> int:
    """A wait in whole seconds that is never short: a client that waits it finds the window reset."""
    return max(1, math.ceil(ms / 1000))


def refusal_headers(refused: list[tuple[RateLimit, int, float]]) -> dict[str, str]:
    """The 429 headers for the limits that refused a request: (limit, remaining, ms until reset)."""
    policy = ", ".join(f'"{limit.name}";q={limit.limit};w={limit.window_seconds}' for limit, _, _ in refused)
    state = ", ".join(f'"{limit.name}";r={left};t={seconds_until(ms)}' for limit, left, ms in refused)
    retry = max(seconds_until(ms) for _, _, ms in refused)
    return {"Retry-After": str(retry), "RateLimit-Policy": policy, "RateLimit": state}
