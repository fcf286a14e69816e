"""Rate limits and credits that hold across every replica (spec 12).

Owns: `policy` (what a key or route asks for: credits, limit specs such as `100/60s`, the
effective limits of a request, the 429 headers; pure), `store` (the Redis layout of window
counters and credit balances, the atomic Lua scripts, and the batching of one event-loop turn's
calls into one round trip), and `limiter` (the per-replica decision: leased slices of a window's
budget spent locally, per-request Redis for small limits and credits, `on_store_error`).

May import: the base (config, errors, metrics) and redis. Nothing above: the key table's record
holds a `CreditPolicy` from here, the proxy and the verifier ask the `Limiter`, the admin API
writes credit balances through `store`.
"""
