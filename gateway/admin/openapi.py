"""The admin API's OpenAPI 3.1 document (spec 7), served at `GET /v1/openapi.json`. Pure.

Kept true by tests/test_openapi.py: its paths and methods are the admin application's routes
(the console's `console.*` routes aside), and Schemathesis fuzzes the running API against it
(no 5xx; every documented 4xx answer is the spec 5 error body, which `Error` describes exactly).
"""

from __future__ import annotations

import functools
from typing import Any, Final, get_args

from aiohttp import web

from gateway import config, errors
from gateway.admin import bodies
from gateway.admin.api import IMPORT_MAX_LINE, IMPORT_MAX_LINES, json_response
from gateway.errors import ErrorCode
from gateway.keytable.credentials import MAX_TOKEN_LENGTH
from gateway.ratelimit.policy import MAX_CREDITS, MAX_REFILL_INTERVAL

JSON: Final = "application/json"
_CONTROL: Final = "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029"
# Names, owners and reasons: no control character, and not only white space (bodies._text).
_TEXT: Final = f"^[^{_CONTROL}]*[^\\s{_CONTROL}][^{_CONTROL}]*$"
_NO_CONTROL: Final = f"^[^{_CONTROL}]*$"
KEY_ID_PATTERN: Final = "^key_[0-9a-f]{20}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}},
        "content": {JSON: {"schema": schema}},
    }


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


_ERROR_WORDS: Final = {
    400: "invalid_request: the body, a parameter or a cursor breaks a rule (the detail names it)",
    401: "missing_token or invalid_token",
    403: "insufficient_permissions: the token's role is too low",
    404: "key_not_found (no key has this id) or not_found",
    405: "method_not_allowed",
    409: "key_exists, key_revoked, key_disabled, key_rotated or reenable_not_allowed",
    413: "payload_too_large: the body is over 64 KiB",
    429: "too_many_requests: too many failed token attempts from this address (see Retry-After)",
    500: "internal_error",
    503: "store_unavailable (Redis failed) or not_ready",
}
_AUTHED: Final = (400, 401, 403, 405, 413, 429, 500, 503)


def _operation(summary: str, responses: dict[str, Any], *, role: str | None, **more: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary + (f" (role: {role} or above)" if role else ""), **more}
    if role is None:
        op["security"] = []
    op["responses"] = {**responses, **_errors(*(_AUTHED if role else (405, 500)))}
    return op


def _key_param() -> dict[str, Any]:
    return {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": KEY_ID_PATTERN}}


def _change(summary: str, role: str, body: dict[str, Any] | None) -> dict[str, Any]:
    more: dict[str, Any] = {"parameters": [_key_param()]}
    if body is not None:
        more["requestBody"] = {"required": False, "content": {JSON: {"schema": body}}}
    return _operation(
        summary,
        {
            "200": _json(_ref("ChangedKey"), "The record after the change, once every live replica evicted the key"),
            **_errors(404, 409),
        },
        role=role,
        **more,
    )


def _ratelimits() -> dict[str, Any]:
    """A key's rate limits (spec 12), as config.ratelimit_problem accepts them."""
    item = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "limit", "window_seconds"],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
            "limit": {"type": "integer", "minimum": 1, "maximum": config.MAX_RATELIMIT},
            "window_seconds": {"type": "integer", "minimum": 1, "maximum": config.MAX_WINDOW_SECONDS},
            "on_store_error": {"type": "string", "enum": list(config.ON_STORE_ERRORS)},
        },
    }
    return {"type": "array", "maxItems": config.MAX_RATELIMITS, "items": item, "description": "Distinct names"}


def _credits(*, patch: bool) -> dict[str, Any]:
    """A key's credits (spec 12); on a PATCH `add` instead of `remaining`, never both."""
    whole = {"type": "integer", "minimum": 0, "maximum": MAX_CREDITS}
    properties: dict[str, Any] = {
        "remaining": whole,
        "refill": {
            "type": "object",
            "additionalProperties": False,
            "required": ["amount", "interval"],
            "properties": {
                "amount": {"type": "integer", "minimum": 1, "maximum": MAX_CREDITS},
                "interval": {"type": "integer", "minimum": 1, "maximum": MAX_REFILL_INTERVAL},
            },
        },
    }
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "minProperties": 1}
    if patch:
        properties["add"] = {"type": "integer", "minimum": -MAX_CREDITS, "maximum": MAX_CREDITS}
        schema["not"] = {"required": ["remaining", "add"]}
    else:
        schema["required"] = ["remaining"]
    schema["properties"] = properties
    return schema


def _create_fields(text: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "ratelimits": _ratelimits(),
        "credits": _credits(patch=False),
        "name": text,
        "owner": text,
        "scopes": {
            "type": "array",
            "maxItems": bodies.MAX_SCOPES,
            "items": {"type": "string", "pattern": "^[A-Za-z0-9_.:/*-]{1,128}$"},
        },
        "meta": {
            "type": "object",
            "description": f"At most {bodies.MAX_META_BYTES} bytes of JSON, {bodies.MAX_META_DEPTH} levels deep",
        },
        "expires_at": {"type": "string", "format": "date-time", "description": "In the future"},
        "prefix": {
            "type": "string",
            "pattern": "^[A-Za-z][A-Za-z0-9]{0,15}_$",
            "description": "Generated keys only",
        },
        "key": {
            "type": "string",
            "minLength": bodies.MIN_IMPORTED_KEY,
            "maxLength": MAX_TOKEN_LENGTH,
            "pattern": "^[A-Za-z0-9._~+/=-]+$",
            "writeOnly": True,
        },
        "key_sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
    }


def _schemas() -> dict[str, Any]:
    text = {"type": "string", "minLength": 1, "maxLength": bodies.MAX_TEXT, "pattern": _TEXT}
    time = _nullable({"type": "string", "format": "date-time"})
    return {
        "Error": {
            "type": "object",
            "description": "Every error the gateway answers itself (spec 5)",
            "required": ["meta", "error"],
            "additionalProperties": False,
            "properties": {
                "meta": {
                    "type": "object",
                    "required": ["requestId"],
                    "additionalProperties": False,
                    "properties": {"requestId": {"type": "string", "minLength": 1}},
                },
                "error": {
                    "type": "object",
                    "required": ["code", "title", "detail", "status", "type"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {"type": "string", "enum": list(get_args(ErrorCode))},
                        "title": {"type": "string", "minLength": 1},
                        "detail": {"type": "string", "minLength": 1},
                        "status": {"type": "integer", "minimum": 400, "maximum": 599},
                        "type": {"type": "string", "format": "uri"},
                    },
                },
            },
        },
        "Key": {
            "type": "object",
            "description": "A key's record as operators see it (no hash). A stored record that does not "
            "decode is shown by its id with state `unreadable`.",
            "required": ["id", "state"],
            "properties": {
                "id": {"type": "string", "pattern": KEY_ID_PATTERN},
                "name": _nullable({"type": "string"}),
                "owner": _nullable({"type": "string"}),
                "scopes": {"type": "array", "items": {"type": "string"}},
                "meta": {"type": "object"},
                "start": _nullable({"type": "string"}),
                "created_at": time,
                "expires_at": time,
                "enabled": {"type": "boolean"},
                "disabled_at": time,
                "disabled_by": _nullable({"type": "string"}),
                "disabled_reason": _nullable({"type": "string"}),
                "revoked": {"type": "boolean"},
                "revoked_at": time,
                "imported": {"type": "boolean"},
                "rotated_to": _nullable({"type": "string", "pattern": KEY_ID_PATTERN}),
                "state": {"type": "string", "enum": ["active", "disabled", "revoked", "expired", "unreadable"]},
                "unreadable": {"type": "boolean"},
                "detail": {"type": "string"},
                "last_used_at": time,
                "last_used_ip": _nullable({"type": "string"}),
            },
        },
        "Usage": {
            "type": "object",
            "description": "A key's usage over a window (spec 10), summed over every replica's flushes",
            "required": ["key_id", "window", "bucket_seconds", "from", "to", "totals", "distinct_addresses", "buckets"],
            "properties": {
                "key_id": {"type": "string", "pattern": KEY_ID_PATTERN},
                "window": {"type": "string", "enum": ["1h", "24h", "30d"]},
                "bucket_seconds": {"type": "integer", "minimum": 1},
                "from": {"type": "string", "format": "date-time"},
                "to": {"type": "string", "format": "date-time"},
                "totals": {
                    "type": "object",
                    "required": ["requests", "outcomes"],
                    "properties": {
                        "requests": {"type": "integer", "minimum": 0},
                        "outcomes": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                    },
                },
                "distinct_addresses": {"type": "integer", "minimum": 0},
                "buckets": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["start", "requests", "outcomes"],
                        "properties": {
                            "start": {"type": "string", "format": "date-time"},
                            "requests": {"type": "integer", "minimum": 0},
                            "outcomes": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                        },
                    },
                },
                "last_used_at": time,
                "last_used_ip": _nullable({"type": "string"}),
                "last_used_route": _nullable({"type": "string"}),
                "flush_seconds": {"type": "number", "minimum": 0},
            },
        },
        "Status": {
            "type": "object",
            "required": ["replica", "live_replicas", "redis", "propagation"],
            "properties": {
                "replica": {
                    "type": "object",
                    "required": ["id", "coherent", "lease_remaining_ms", "incoherent_for_seconds"],
                    "properties": {
                        "id": {"type": "string"},
                        "coherent": {"type": "boolean"},
                        "lease_remaining_ms": {"type": "integer", "minimum": 0},
                        "incoherent_for_seconds": {"type": "number", "minimum": 0},
                    },
                },
                "live_replicas": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "joined_at", "self"],
                        "properties": {"id": {"type": "string"}, "joined_at": time, "self": {"type": "boolean"}},
                    },
                },
                "redis": {
                    "type": "object",
                    "required": ["role", "persistence", "time"],
                    "properties": {
                        "role": {"type": "string"},
                        "persistence": {"type": "string", "enum": ["aof", "off", "unknown"]},
                        "time": {"type": "string", "format": "date-time"},
                        "mode": {"type": "string", "enum": ["embedded", "single", "sentinel"]},
                        "replicas": _nullable({"type": "integer", "minimum": 0}),
                        "min_replicas_acked": {"type": "integer", "minimum": 0},
                    },
                },
                "propagation": {
                    "type": "object",
                    "required": ["changes", "p50_ms", "p99_ms", "max_ms", "fenced"],
                    "properties": {
                        "changes": {"type": "integer", "minimum": 0},
                        "p50_ms": _nullable({"type": "number", "minimum": 0}),
                        "p99_ms": _nullable({"type": "number", "minimum": 0}),
                        "max_ms": _nullable({"type": "number", "minimum": 0}),
                        "fenced": {"type": "integer", "minimum": 0},
                    },
                },
                "warning": {"type": "string"},
            },
        },
        "Propagation": {
            "type": "object",
            "description": "How the change reached the live replicas (spec 8)",
            "required": ["replicas", "confirmed", "fenced", "ms"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "confirmed": {"type": "integer", "minimum": 0},
                "fenced": {"type": "integer", "minimum": 0},
                "ms": {"type": "number", "minimum": 0},
            },
        },
        "ChangedKey": {
            "allOf": [
                _ref("Key"),
                {"type": "object", "required": ["propagation"], "properties": {"propagation": _ref("Propagation")}},
            ],
        },
        "CreatedKey": {
            "allOf": [
                _ref("Key"),
                {
                    "type": "object",
                    "properties": {
                        "key": {"type": "string", "description": "The plaintext, in this answer only (generated keys)"}
                    },
                },
            ],
        },
        "RotatedKey": {
            "allOf": [
                _ref("Key"),
                {
                    "type": "object",
                    "required": ["key", "rotated_from", "propagation"],
                    "properties": {
                        "key": {"type": "string", "description": "The new key's plaintext, in this answer only"},
                        "rotated_from": {
                            "type": "object",
                            "required": ["id", "expires_at"],
                            "properties": {"id": {"type": "string"}, "expires_at": time},
                        },
                        "propagation": _ref("Propagation"),
                    },
                },
            ]
        },
        "CreateKey": {
            "type": "object",
            "description": "Create a key (the gateway generates it) or import one (`key` or `key_sha256`)",
            "additionalProperties": False,
            "properties": {  # null is the same as absent for every field
                name: _nullable(schema) for name, schema in _create_fields(text).items()
            },
        },
        "UpdateKey": {
            "type": "object",
            "description": "The fields to change (at least one); null clears expires_at, ratelimits, credits",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "name": text,
                "meta": {"type": "object"},
                "scopes": _create_fields(text)["scopes"],
                "expires_at": _nullable({"type": "string", "format": "date-time", "description": "In the future"}),
                "ratelimits": _nullable(_ratelimits()),
                "credits": _nullable(_credits(patch=True)),
            },
        },
        "Reason": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "reason": _nullable({"type": "string", "maxLength": bodies.MAX_TEXT, "pattern": _NO_CONTROL})
            },
        },
        "Rotate": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"grace_seconds": {"type": "integer", "minimum": 0, "maximum": bodies.MAX_GRACE_SECONDS}},
        },
        "KeyPage": {
            "type": "object",
            "required": ["keys", "next_cursor"],
            "properties": {
                "keys": {"type": "array", "items": _ref("Key")},
                "next_cursor": _nullable({"type": "string"}),
            },
        },
        "AuditEntry": {
            "type": "object",
            "required": ["id", "at", "actor", "action", "key_id"],
            "properties": {
                "id": {"type": "string"},
                "at": time,
                "actor": _nullable({"type": "string"}),
                "action": _nullable({"type": "string"}),
                "key_id": _nullable({"type": "string"}),
                "reason": _nullable({"type": "string"}),
                "remote": _nullable({"type": "string"}),
                "request_id": _nullable({"type": "string"}),
                "detail": {},
            },
        },
        "AuditPage": {
            "type": "object",
            "required": ["entries", "next_cursor"],
            "properties": {
                "entries": {"type": "array", "items": _ref("AuditEntry")},
                "next_cursor": _nullable({"type": "string"}),
            },
        },
    }


@functools.cache
def document() -> dict[str, Any]:
    limit = {"type": "string", "pattern": "^[0-9]{1,6}$"}
    cursor = {
        "name": "cursor",
        "in": "query",
        "schema": {"type": "string"},
        "description": "next_cursor of the previous page of the same query",
    }
    responses = {
        f"E{status}": {
            "description": words,
            "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}},
            "content": {JSON: {"schema": _ref("Error")}},
        }
        for status, words in _ERROR_WORDS.items()
    }
    paths: dict[str, Any] = {
        "/v1/keys": {
            "post": _operation(
                "Create or import a key",
                {"201": _json(_ref("CreatedKey"), "The new record; `key` once for a generated key"), **_errors(409)},
                role="developer",
                requestBody={"required": False, "content": {JSON: {"schema": _ref("CreateKey")}}},
            ),
            "get": _operation(
                "List keys in creation order, paginated",
                {"200": _json(_ref("KeyPage"), "A page of keys"), **_errors(404)},
                role="viewer",
                parameters=[
                    {"name": "owner", "in": "query", "schema": {"type": "string", "maxLength": bodies.MAX_TEXT}},
                    {"name": "enabled", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}},
                    {
                        "name": "unused_since",
                        "in": "query",
                        "schema": {"type": "string", "maxLength": 64},
                        "description": "Only keys not used since then (spec 10): a span back from now (30d, 12h, "
                        "90m) or an RFC 3339 time with its offset",
                    },
                    cursor,
                    {"name": "limit", "in": "query", "schema": limit, "description": "1 to 100 (default 20)"},
                ],
            ),
        },
        "/v1/keys/import": {
            "post": _operation(
                "Bulk import (spec 13): NDJSON in, one result line per record out",
                {
                    "200": {
                        "description": 'One JSON result per non-blank line, in order; a last `{"error"}` line '
                        "ends an answer cut short",
                        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                    }
                },
                role="developer",
                requestBody={
                    "required": True,
                    "description": f"At most {IMPORT_MAX_LINES} lines of at most "
                    f"{IMPORT_MAX_LINE} bytes, each a CreateKey body with `key` or `key_sha256`",
                    "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                },
            ),
        },
        "/v1/keys/{key_id}": {
            "get": _operation(
                "One key's record",
                {"200": _json(_ref("Key"), "The record"), **_errors(404)},
                role="viewer",
                parameters=[_key_param()],
            ),
            "patch": _operation(
                "Change a key's name, meta, scopes, expiry, rate limits or credits (spec 12); answered once "
                "every live replica evicted it",
                {"200": _json(_ref("ChangedKey"), "The changed record and its propagation"), **_errors(404, 409)},
                role="developer",
                parameters=[_key_param()],
                requestBody={"required": True, "content": {JSON: {"schema": _ref("UpdateKey")}}},
            ),
        },
        "/v1/keys/{key_id}/usage": {
            "get": _operation(
                "One key's usage (spec 10): counts per minute (1h), hour (24h) or day (30d) by outcome, the "
                "distinct client addresses over the window and the last use; as of the replicas' last flush",
                {"200": _json(_ref("Usage"), "The key's usage over the window"), **_errors(404)},
                role="viewer",
                parameters=[
                    _key_param(),
                    {"name": "window", "in": "query", "schema": {"type": "string", "enum": ["1h", "24h", "30d"]}},
                ],
            ),
        },
        "/v1/keys/{key_id}/disable": {"post": _change("Disable a key (idempotent)", "developer", _ref("Reason"))},
        "/v1/keys/{key_id}/enable": {"post": _change("Enable a disabled key", "developer", _ref("Reason"))},
        "/v1/keys/{key_id}/revoke": {"post": _change("Revoke a key for ever", "admin", _ref("Reason"))},
        "/v1/keys/{key_id}/rotate": {
            "post": _operation(
                "A new key with the same fields; the old one expires after the grace period",
                {"201": _json(_ref("RotatedKey"), "The new record with its plaintext once"), **_errors(404, 409)},
                role="developer",
                parameters=[_key_param()],
                requestBody={"required": False, "content": {JSON: {"schema": _ref("Rotate")}}},
            ),
        },
        "/v1/audit": {
            "get": _operation(
                "The audit log, newest first",
                {"200": _json(_ref("AuditPage"), "A page of entries")},
                role="admin",
                parameters=[
                    {
                        "name": "key_id",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^(key_[0-9a-f]{20})?$"},
                        "description": "Only this key's entries (empty: every key's)",
                    },
                    cursor,
                    {"name": "limit", "in": "query", "schema": limit, "description": "1 to 500 (default 50)"},
                ],
            ),
        },
        "/v1/status": {
            "get": _operation(
                "This replica's coherence and lease, the live replicas, Redis (role, topology, persistence) "
                "and how long the latest changes made here took to be confirmed everywhere",
                {"200": _json(_ref("Status"), "The status")},
                role="viewer",
            ),
        },
        "/v1/openapi.json": {
            "get": _operation(
                "This document", {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {}}}}}, role=None
            )
        },
        "/healthz": {
            "get": _operation(
                "The process is alive",
                {"200": _json({"type": "object", "required": ["status"]}, "ok")},
                role=None,
            )
        },
        "/readyz": {
            "get": _operation(
                "Ready to serve: Redis answers and the invalidation subscription is live",
                {"200": _json({"type": "object", "required": ["status"]}, "ready"), **_errors(503)},
                role=None,
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                role=None,
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gateway admin API",
            "version": "1",
            "description": "Key management, audit and probes on the admin listener (spec 7). Every error is "
            "the spec 5 body (`Error`). The operator console at `/` is HTML and not described here.",
        },
        "security": [{"adminToken": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin token, gwadm_<id>_<secret>; its role is viewer, developer or admin",
                }
            },
            "headers": {"RequestId": {"schema": {"type": "string"}, "description": "The request's id"}},
            "schemas": _schemas(),
            "responses": responses,
        },
    }


async def serve(request: web.Request) -> web.StreamResponse:
    """`GET /v1/openapi.json`: the document, without a token (it describes, it reveals nothing)."""
    request_id = errors.request_id_from(request.headers.get("X-Request-Id"))
    response = json_response(document(), request_id)
    response.headers["Cache-Control"] = "no-cache"
    return response
