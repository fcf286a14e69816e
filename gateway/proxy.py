"""The proxy's request path, top to bottom (spec 5, 6).

    target -> route -> method -> credential -> key lookup -> decision -> forward

Every step before `forward` either passes or returns a Denial, which one
renderer turns into the JSON error. No path that returns a Denial forwards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from aiohttp import web

from . import errors
from .config import KeysConfig
from .credentials import bearer_from
from .errors import Denial
from .keys import KeyRecord, decide, digest
from .lookup import AuthUnavailable, KeyLookup
from .metrics import Metrics
from .routing import RouteTable, UnsafePath, split_target
from .upstream import Forwarder

access = logging.getLogger("gateway.access")


@dataclass
class Proxy:
    routes: RouteTable
    lookup: KeyLookup
    forwarder: Forwarder
    keys: KeysConfig
    metrics: Metrics

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = errors.request_id_from(request.headers.get("X-Request-Id"))
        try:
            target = split_target(request.raw_path)
        except UnsafePath as exc:
            return self._deny(request, Denial("invalid_request", str(exc)), request_id, "-")

        route = self.routes.match(target.path)
        if route is None:
            return self._deny(request, Denial("route_not_found"), request_id, "-")
        if route.methods is not None and request.method not in route.methods:
            allow = ", ".join(sorted(route.methods))
            return self._deny(request, Denial("method_not_allowed", headers={"Allow": allow}), request_id, route.name)

        record: KeyRecord | None = None
        if route.requires_key:
            credential = bearer_from(request.headers.getall("Authorization", ()))
            if isinstance(credential, Denial):
                return self._deny(request, credential, request_id, route.name)
            try:
                record = await self.lookup.find(digest(credential.token))
            except AuthUnavailable:
                return self._deny(request, Denial("auth_unavailable"), request_id, route.name)
            denial = decide(record, route, time.time(), self.keys.disabled_status)
            if denial is not None:
                return self._deny(request, denial, request_id, route.name)

        outcome = await self.forwarder.forward(request, route, target, record, request_id)
        if isinstance(outcome, Denial):
            return self._deny(request, outcome, request_id, route.name)
        self._record(request, request_id, route.name, "forwarded", outcome.status)
        return outcome

    def _deny(self, request: web.Request, denial: Denial, request_id: str, route: str) -> web.Response:
        response = errors.render(denial, request_id)
        self._record(request, request_id, route, denial.code, response.status)
        return response

    def _record(self, request: web.Request, request_id: str, route: str, code: str, status: int) -> None:
        # Route names and codes only: never the path, a header or the key.
        self.metrics.request(route, code)
        access.info("%s %s route=%s code=%s status=%d", request_id, request.method, route, code, status)
