"""The boundary of both listeners: anything that escapes a handler becomes a spec 5 body.

aiohttp's own HTTP errors (unknown admin path, body too large, bad method) are
rendered in the same shape; an unexpected exception is logged by type with its
traceback and answered 500 internal_error, never forwarded, never echoed.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import errors

log = logging.getLogger("gateway")

_BY_STATUS: dict[int, errors.ErrorCode] = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        request_id = errors.request_id_from(request.headers.get("X-Request-Id"))
        code = _BY_STATUS.get(exc.status, "internal_error" if exc.status >= 500 else "invalid_request")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return errors.render(errors.Denial(code, status=exc.status, headers=headers), request_id)
    except Exception as exc:
        return internal_error(request, exc)


def internal_error(request: web.BaseRequest, exc: Exception) -> web.Response:
    """Called from an `except` block: the traceback is logged, the answer names nothing of it."""
    request_id = errors.request_id_from(request.headers.get("X-Request-Id"))
    log.exception("unhandled %s", type(exc).__name__, extra={"request_id": request_id})
    return errors.render(errors.Denial("internal_error"), request_id)
