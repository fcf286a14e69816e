"""The verify listener's handler: the proxy's request path up to the decision, then an answer.

    question -> original request -> target -> route -> method -> credential -> key lookup
             -> decision -> rate limits and credits -> 200 with the key's identity, or the refusal

A refusal is the proxy's own answer (spec 5: status, JSON body, `WWW-Authenticate` on a 401); the
asking proxy passes it on to its client. Nothing is forwarded from here, and a question's body is
never read (the connection closes after the answer when one was sent).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from gateway.errors import Denial
from gateway.h1.headers import http_date
from gateway.h1.server import Request
from gateway.keytable.record import KeyRecord
from gateway.proxy import Exchange, Gate
from gateway.verify.original import as_sent_problem, original

log = logging.getLogger("gateway.verify")
_WARN_EVERY = 60.0  # seconds between two warnings about a misplaced trust
ERROR_BODY_HEADER = b"X-Gateway-Error-Body"  # a refusal's body again, for nginx (the listener's refusals too)
# Sent by the shipped nginx configuration: "header" asks for a refusal's body in ERROR_BODY_HEADER only.
# nginx keeps its connection to the verifier only after an answer without a body, so without it each
# refusal (a flood of bad keys) costs the gateway a new connection: about 4x the CPU of a pass.
REFUSAL_BODY_REQUEST = "X-Gateway-Refusal-Body"


def identity_head(record: KeyRecord | None, request_id: str) -> bytes:
    """The header lines of a 200: who the key is, and the request id. The three key headers are
    always sent, empty for a public route (nginx's `auth_request_set` then sets nothing upstream,
    and Caddy 2.6's `copy_headers` would otherwise send its placeholder's text). Every value is of
    a safe alphabet already (ids, owners and scopes are validated on the way in, request ids are
    ours or checked), so none can break a header line."""
    key_id = owner = scopes = b""
    if record is not None:
        key_id = record.id.encode()
        owner = (record.owner or "").encode()
        scopes = " ".join(record.scopes).encode()
    return b"X-Gateway-Key-Id: %b\r\nX-Gateway-Key-Owner: %b\r\nX-Gateway-Key-Scopes: %b\r\nX-Request-Id: %b\r\n" % (
        key_id,
        owner,
        scopes,
        request_id.encode(),
    )


@dataclass
class Verifier(Gate):
    """Answers another proxy's question about a request on the `mode: verify` routes."""

    path_prefix: str = ""  # verify.path_prefix: Envoy's ext_authz path_prefix, taken off a request line
    _warned: float = field(default=float("-inf"), init=False)

    def _refusal(self, request: Request, head: bytes, body: bytes) -> tuple[bytes, bytes]:
        """The proxy's refusal, and its body again in `X-Gateway-Error-Body`: nginx's auth_request
        cannot pass a subrequest's body on, so its configuration answers with this header's value
        (docs/verify-proxies.md), and asks for no body at all (`X-Gateway-Refusal-Body: header`)
        so that it keeps its connection. The body is ASCII JSON on one line, a few hundred bytes."""
        head += ERROR_BODY_HEADER + b": " + body + b"\r\n"
        return head, b"" if request.headers.get(REFUSAL_BODY_REQUEST) == "header" else body

    async def _handle(self, request: Request, exchange: Exchange) -> None:
        if request.body_exists:
            request.close_after()  # its body is not read: the connection cannot carry another question
        if not request.trusted and not self.path_prefix:
            self._untrusted()
        asked = original(
            request.method, request.raw_path, request.headers, trusted=request.trusted, path_prefix=self.path_prefix
        )
        if isinstance(asked, Denial):
            self._deny(exchange, asked)
            return
        problem = as_sent_problem(asked.target)
        if problem is not None:
            exchange.method = asked.method
            self._deny(exchange, Denial("invalid_request", problem))
            return
        admitted = self._admit(exchange, asked.method, asked.target)
        if admitted is None:
            return
        route, _target, key_hash = admitted
        record: KeyRecord | None = None
        if key_hash is not None:
            record = await self._decide(exchange, route, key_hash)
            if record is None or not await self._spend(exchange, route, record):
                return
        head = identity_head(record, exchange.request_id) + b"Date: " + http_date(time.time()) + b"\r\n"
        request.reply(200, "OK", head, b"")
        self._record(exchange, "verified", 200)

    def _untrusted(self) -> None:
        """A question from a peer outside trusted_proxies: refused 400, and said once a minute,
        since it is most often a proxy the operator forgot to list rather than an attack."""
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            log.warning(
                "verify: a question from a peer outside trusted_proxies refused; "
                "add the asking proxy's address to trusted_proxies"
            )
