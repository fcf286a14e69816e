"""The HTTP/1.1 engine of the data plane: the listener, the upstream client, header rules.

Owns: `server` (the proxy's listener and its `Request`, which keeps the connection's keep-alive
state), `client` (pooled upstream connections, exact framing, replay), `headers` (which header
lines cross the gateway in each direction, pure), `downstream` (the `Downstream` protocol: all the
client sees of the client side), and `compat` (the one module that imports aiohttp's internals).

May import: the base (config, errors, metrics, logs). Not keytable, routing or anything above:
the proxy passes plain values (the upstream path, the key's id and owner).
"""
