"""Webhooks (spec 10): key events, signed as Standard Webhooks specifies, delivered at least once.

Owns: `events` (which audit entries are which events, and the payload each carries), `signing`
(the Standard Webhooks signature), `schedule` (when an attempt that failed is tried again, and when
an event is given up), `queue` (the delivery queue's layout in Redis and its atomic steps), `source`
(the one reader of the key table's audit stream), `service` (the per-replica loops: intake,
delivery, the expiry check).

May import: keytable (the store and records), config, metrics, logs. Not admin, proxy, coherence,
verify, runtime or cli: the runtime starts and stops `service.Webhooks`; the admin API does not
know webhooks exist (events come from the audit stream every change already writes).
"""
