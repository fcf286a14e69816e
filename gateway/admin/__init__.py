"""The admin listener: key management, audit, probes and metrics (spec 7).

Owns: `app` (the aiohttp application), `api` (the handlers and routes), `auth` (admin tokens,
roles, the guess throttle), `bodies` (request bodies' validation), `middleware` (every error as
the one JSON error body). The package itself imports nothing, so the CLI can use `bodies` without
loading the server.

May import: the proxy, coherence, h1, keytable, routing and the base. Not runtime or cli.
"""
