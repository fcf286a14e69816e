"""The admin listener: key management, audit, probes and metrics (spec 7).

Owns: `api` (the handlers and routes), `auth` (admin tokens, roles, the guess throttle), `bodies`
(request bodies' validation), `middleware` (every error as the one JSON error body).

May import: the proxy, coherence, h1, keytable, routing and the base. Not runtime or cli.
"""

from __future__ import annotations

from aiohttp import web

from gateway.admin.api import AdminApi, routes
from gateway.admin.middleware import error_middleware

MAX_BODY = 64 * 1024


def build_admin_app(api: AdminApi) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
    app.add_routes(routes(api))
    return app


__all__ = ["AdminApi", "build_admin_app"]
