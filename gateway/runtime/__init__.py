"""Running the gateway: one replica's assembly, process supervision, embedded Redis.

Owns: `replica` (builds a replica from the config: store, cache, coherence, proxy, listener,
admin app), `serve` (the process: Redis clients, listeners, signals, worker supervision),
`embedded` (a redis-server child for `serve` without one).

May import: admin, proxy, coherence, h1, keytable, routing and the base. Not cli.
"""
