"""Policies (spec 10): rules over a key's usage in a window, judged on figures summed over every
replica, that disable the key or report it.

Where it runs: on the replica whose flush just wrote the key's counts, right after that flush, for
the keys it wrote. The figures it reads are every replica's (each adds to the same buckets), so the
replica whose write takes a figure over its threshold is the one that sees it first, at most one
flush interval after the traffic that crossed it. Several replicas can see a key over a threshold
at once: each first takes the policy's hold on the key (SET NX in Redis, `UsageStore.claim`), and
only the one that got it acts. The hold then stays for the policy's window: that is the "once per
key" (a re-enabled key is not disabled again by the same policy until a window has passed since the
match, so the figures that matched no longer count), and it spares the other replicas re-judging
a key already judged. No leader to elect and nothing to fail over: a replica that dies between its
hold and its action leaves a hold that lapses after `_CLAIM_MS`, and the next flush that writes the
key judges it again.

A disable is an operator's disable with another actor: the same transaction (record, audit entry
`disable` by `policy:<name>` with the rule and the value in its reason and detail) and the same
confirmed propagation (coherence/propagation.py) before it counts as done. A report, or any match
of a `dry_run` policy, changes nothing: a log line, the `gateway_policy_matches` metric and an audit
entry `policy_match`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter as PromCounter
from redis.exceptions import RedisError

from gateway.coherence.propagation import Propagator
from gateway.config import Policy
from gateway.keytable.record import KeyRecord
from gateway.keytable.store import AuditEntry, KeyStore
from gateway.metrics import Metrics
from gateway.usage.counter import Batch
from gateway.usage.store import UsageStore

log = logging.getLogger("gateway.policy")
_CLAIM_MS = 30_000  # a hold taken and not confirmed (the replica died acting) lapses after this
_MEASURE_CHUNK = 100  # keys read in one pipeline: its replies are parsed in one go on the event loop


def describe(policy: Policy) -> str:
    if policy.rule == "distinct_addresses":
        return "distinct client addresses"
    if policy.rule == "refusals":
        return f"{policy.code} refusals"
    return "requests"


def window_text(seconds: int) -> str:
    return f"{seconds // 3600}h" if seconds > 3600 else f"{seconds // 60}m"


def reason_for(policy: Policy, value: int) -> str:
    return (
        f"policy {policy.name}: {value} {describe(policy)} in {window_text(policy.window_seconds)}, "
        f"above {policy.above}"
    )


@dataclass
class PolicyEngine:
    usage: UsageStore
    keys: KeyStore
    propagator: Propagator
    metrics: Metrics
    replica_id: str
    policies: tuple[Policy, ...] = ()  # replaced whole by a SIGHUP reload
    matches: PromCounter = field(init=False)

    def __post_init__(self) -> None:
        self.matches = PromCounter(
            "gateway_policy_matches",
            "Keys that crossed a policy's threshold, by policy and outcome: disabled, reported, "
            "dry_run (reported what it would have done), already (the key was already refused)",
            ["policy", "outcome"],
            registry=self.metrics.registry,
        )

    async def evaluate(self, batches: Sequence[Batch], now: float | None = None) -> int:
        """Judge the keys these batches held against every policy; returns the matches acted on."""
        if not self.policies or not batches:
            return 0
        now = time.time() if now is None else now
        seen: dict[str, set[str]] = {}
        with_addresses: set[str] = set()
        for batch in batches:
            for key_id, tally in batch.tallies.items():
                seen.setdefault(key_id, set()).update(tally.outcomes)
                if tally.addresses:
                    with_addresses.add(key_id)
        acted = 0
        for policy in self.policies:
            # Only a key whose figure this flush raised can have crossed the threshold with it.
            if policy.rule == "refusals":
                ids = [k for k, outcomes in seen.items() if policy.code in outcomes]
            elif policy.rule == "distinct_addresses":
                ids = [k for k in seen if k in with_addresses]
            else:
                ids = list(seen)
            for i in range(0, len(ids), _MEASURE_CHUNK):
                chunk = ids[i : i + _MEASURE_CHUNK]
                values = await self.usage.measure(chunk, policy, now)
                for key_id, value in zip(chunk, values, strict=True):
                    if value > policy.above and await self._act(policy, key_id, value):
                        acted += 1
        return acted

    async def _act(self, policy: Policy, key_id: str, value: int) -> bool:
        if not await self.usage.claim(policy.name, key_id, _CLAIM_MS):
            return False  # another replica acts, or this policy matched the key within its window
        try:
            if policy.action == "disable" and not policy.dry_run:
                outcome = await self._disable(policy, key_id, value)
            else:
                await self._report(policy, key_id, value)
                outcome = "dry_run" if policy.dry_run else "reported"
        except (RedisError, OSError, TimeoutError):
            await self.usage.release(policy.name, key_id)  # judged again at the next flush
            raise
        await self.usage.hold(policy.name, key_id, policy.window_seconds * 1000)
        self.matches.labels(policy.name, outcome).inc()
        return True

    def _entry(self, policy: Policy, key_id: str, action: str, value: int) -> AuditEntry:
        detail: dict[str, object] = {
            "policy": policy.name,
            "rule": policy.rule,
            "value": value,
            "above": policy.above,
            "window_seconds": policy.window_seconds,
            "action": policy.action,
            "dry_run": policy.dry_run,
            "replica": self.replica_id,
        }
        if policy.code is not None:
            detail["code"] = policy.code
        return AuditEntry(
            actor=f"policy:{policy.name}", action=action, key_id=key_id, reason=reason_for(policy, value), detail=detail
        )

    async def _disable(self, policy: Policy, key_id: str, value: int) -> str:
        audit = self._entry(policy, key_id, "disable", value)
        reason = audit.reason

        def change(r: KeyRecord) -> KeyRecord:
            if r.revoked or not r.enabled:
                return r  # already refused everywhere: nothing to write
            return r.bump(enabled=False, disabled_at=time.time(), disabled_by=audit.actor, disabled_reason=reason)

        async with self.propagator.announce() as announcement:
            outcome = await self.keys.update(key_id, change, [audit], announcement)
            if outcome is None or outcome[1] is outcome[0]:
                log.info("policy %s: key %s already refused (%s)", policy.name, key_id, reason,
                         extra={"key_id": key_id, "policy": policy.name})  # fmt: skip
                return "already"
            propagation = await announcement.confirmed()
        log.warning(
            "policy %s disabled key %s: %s (replicas %d, confirmed %d, fenced %d, %.1f ms)",
            policy.name, key_id, reason, propagation.replicas, propagation.confirmed, propagation.fenced,
            propagation.ms, extra={"key_id": key_id, "policy": policy.name, "value": value},
        )  # fmt: skip
        return "disabled"

    async def _report(self, policy: Policy, key_id: str, value: int) -> None:
        await self.keys.append_audit([self._entry(policy, key_id, "policy_match", value)])
        would = "would disable" if policy.dry_run and policy.action == "disable" else "reports"
        log.warning("policy %s %s key %s: %s%s", policy.name, would, key_id, reason_for(policy, value),
                    " (dry run)" if policy.dry_run else "",
                    extra={"key_id": key_id, "policy": policy.name, "value": value})  # fmt: skip
