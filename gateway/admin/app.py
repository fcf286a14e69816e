"""The admin listener's aiohttp application: the routes of `api` and the OpenAPI document behind the
error middleware."""

from __future__ import annotations

from aiohttp import web

from gateway.admin import openapi
from gateway.admin.api import AdminApi, routes
from gateway.admin.middleware import error_middleware

MAX_BODY = 64 * 1024


def build_admin_app(api: AdminApi) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
    app.add_routes(routes(api))
    app.add_routes([web.get("/v1/openapi.json", openapi.serve, allow_head=False)])
    return app
