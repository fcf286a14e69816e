"""Per-key usage (spec 10): counted on the request path, written to Redis in batches, read by the
admin API, and judged by the configured policies.

- counter.py: the request path's part. In memory only: no I/O, no await, a few dict operations.
- layout.py: the Redis names and bucket arithmetic (the only module that knows them).
- store.py: the batched write (one Lua script per chunk of keys, in one pipeline) and the reads.
- flusher.py: the replica's task that writes what the counter holds every `usage.flush_seconds`
  and once more when the replica stops, then runs the policies on the keys it wrote.
- policies.py: policy evaluation over figures summed across replicas, and its one action per key.

Layer: above gateway.coherence and gateway.keytable (a policy's disable takes the same confirmed
path as an operator's), below gateway.proxy (which calls the counter); it imports nothing above.
"""
