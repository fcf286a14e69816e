"""The request path's part of usage counting: per key, in memory, no I/O.

`Counter.count` is called once per request whose key was found (from `Gate._record`, so the proxy
and the verifier alike): it adds one to the key's count for the outcome, remembers the last use
(time, client address, route) and adds the client address to the key's set for this interval.
The flusher takes what was counted (`take`) every `usage.flush_seconds` and writes it to Redis.

Bounds, per flush interval (the memory a client's traffic can make this hold):
- at most `max_keys` keys are counted; a request for another key is not counted per key (it is in
  `untracked`, which the flusher turns into a metric and a warning). Keys already counted in the
  interval go on being counted.
- at most `max_addresses` distinct addresses are remembered per key; a further new address is not
  added to the key's distinct-address count (`addresses_dropped`), its requests still are counted.
- a minute that ends while nothing takes the counts is kept as its own batch (counts stay in their
  minute); at most `_MAX_ROLLED` such batches wait, the oldest dropped past that (`batches_dropped`).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

from gateway.h1.headers import Network, trusted_peer
from gateway.h1.server import Request

_MAX_ROLLED = 120  # minutes of batches kept while no flush takes them (Redis down for two hours)


class Tally:
    """One key's figures in one interval."""

    __slots__ = ("addresses", "last_at", "last_ip", "last_route", "outcomes")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.addresses: set[str] = set()
        self.last_at = 0.0
        self.last_ip: str | None = None
        self.last_route = "-"


@dataclass(frozen=True, slots=True)
class Batch:
    """What was counted in one interval, within one minute (`minute`: epoch seconds // 60)."""

    minute: int
    tallies: dict[str, Tally]


@dataclass
class Counter:
    max_keys: int = 100_000
    max_addresses: int = 1_000
    trusted_proxies: tuple[Network, ...] = ()
    untracked: int = 0  # requests not counted per key (past max_keys), since the last take
    addresses_dropped: int = 0  # new addresses not remembered (past max_addresses), since the last take
    batches_dropped: int = 0  # minutes of counts dropped (past _MAX_ROLLED waiting), since the last take
    _tallies: dict[str, Tally] = field(default_factory=dict, init=False)
    _rolled: list[Batch] = field(default_factory=list, init=False)
    _minute: int = field(default=0, init=False)
    _minute_end: float = field(default=0.0, init=False)

    def count(self, key_id: str, outcome: str, request: Request, route: str) -> None:
        now = time.time()
        if now >= self._minute_end:
            self._roll(now)
        tally = self._tallies.get(key_id)
        if tally is None:
            if len(self._tallies) >= self.max_keys:
                self.untracked += 1
                return
            tally = self._tallies[key_id] = Tally()
        outcomes = tally.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        remote = request.remote if not request.trusted else self._client(request)
        tally.last_at = now
        tally.last_ip = remote
        tally.last_route = route
        if remote is not None:
            addresses = tally.addresses
            if remote not in addresses:
                if len(addresses) < self.max_addresses:
                    addresses.add(remote)
                else:
                    self.addresses_dropped += 1

    def _client(self, request: Request) -> str | None:
        """Behind a trusted proxy: the right-most X-Forwarded-For address that is not one (what a
        client can forge is to the left of what the trusted proxies appended); else the peer."""
        hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
        for hop in reversed(hops):
            if not trusted_peer(hop, self.trusted_proxies):
                try:  # only an address is remembered and written (never a client's free text)
                    return str(ipaddress.ip_address(hop.split("%", 1)[0]))
                except ValueError:
                    return request.remote
        return request.remote

    def _roll(self, now: float) -> None:
        """A new minute: what was counted in the last one becomes a batch of its own."""
        if self._tallies:
            self._rolled.append(Batch(self._minute, self._tallies))
            self._tallies = {}
            if len(self._rolled) > _MAX_ROLLED:
                del self._rolled[0]
                self.batches_dropped += 1
        self._minute = int(now // 60)
        self._minute_end = (self._minute + 1) * 60.0

    def take(self) -> list[Batch]:
        """Everything counted since the last take, oldest minute first; the counter starts afresh."""
        batches = self._rolled
        if self._tallies:
            batches.append(Batch(self._minute, self._tallies))
        self._rolled = []
        self._tallies = {}
        return batches

    def put_back(self, batches: list[Batch]) -> None:
        """Batches a failed write did not store: kept to be written with the next (bounded as above)."""
        self._rolled[:0] = batches
        while len(self._rolled) > _MAX_ROLLED:
            del self._rolled[0]
            self.batches_dropped += 1

    def tracked(self) -> int:
        return len(self._tallies)
