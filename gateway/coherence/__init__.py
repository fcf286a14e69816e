"""Cache coherence across replicas (spec 8): how a change reaches every replica's cache in time.

Owns: `channel` (the pub/sub message codec), `subscriber` (one replica's invalidation
subscription, which drives keytable/lease.py's trust state), `replicas` (the live set),
`propagation` (the writer's side: a change's answer waits for every live replica's ack or a
lapsed lease).

May import: keytable, routing and the base. Not h1, the proxy or anything above.
"""
