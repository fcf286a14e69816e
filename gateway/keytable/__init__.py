"""The key table: what a key is, where it is stored, how a request's key is found.

Owns: `record` (KeyRecord, the allow/deny decision, digests and ids), `credentials` (bearer
parsing), `store` (the Redis layout: records, audit, cursors), `cache` (the replica's key cache),
`keyfilter` (the known-hash filter that refuses unknown keys without a read), `lookup` (cache,
then Redis, single flight), and `lease` (the cache's trust state and the lease arithmetic).

May import: routing and the base. Not h1, coherence or anything above (coherence drives `lease`,
the lookup only reads it).
"""
