"""The request path's typed vocabulary and its one per-request record (gateway/proxy.py's `Exchange`).

The proxy is driven here without sockets: a listener `Request` on a connection that keeps what is
sent, a key already in the cache, and a stand-in for the upstream client.
"""

from __future__ import annotations

import logging
from typing import Any, get_args

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import config as config_mod
from gateway.errors import KINDS, Denial, ErrorCode
from gateway.h1.compat import EMPTY_PAYLOAD, RawRequestMessage
from gateway.h1.server import Request
from gateway.keytable.cache import MISS, KeyCache, Miss
from gateway.keytable.lease import Coherence
from gateway.keytable.lookup import KeyLookup
from gateway.keytable.record import KeyRecord, digest
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.routing import RouteTable

TOKEN = "gw_" + "exch4nge" * 5
CONFIG = """
listen: {host: 127.0.0.1, port: 0}
admin:
  listen: {host: 127.0.0.1, port: 0}
  tokens: []
redis: {url: "redis://127.0.0.1:1/0"}
routes:
  - {name: api, path_prefix: /api, upstream: "http://127.0.0.1:1"}
"""


# --- the vocabulary ----------------------------------------------------------------------------


def test_the_error_code_type_names_exactly_the_codes_of_the_error_table() -> None:
    assert set(get_args(ErrorCode)) == set(KINDS)
    assert len(get_args(ErrorCode)) == len(set(get_args(ErrorCode)))


def test_a_cache_miss_is_an_enum_sentinel_apart_from_a_cached_unknown_key() -> None:
    now = [0.0]
    cache = KeyCache(ttl_seconds=10, negative_ttl_seconds=10, max_entries=10, clock=lambda: now[0])
    assert cache.get("h") is MISS and MISS is Miss.MISS
    assert cache.peek_stale("h", 100) is MISS
    assert cache.put("h", None, cache.generation)
    assert cache.get("h") is None  # a cached "unknown key", not a miss
    record = KeyRecord(id="key_1", hash="h2")
    assert cache.put("h2", record, cache.generation)
    assert cache.get("h2") is record
    now[0] = 11.0
    assert cache.get("h2") is MISS  # expired
    assert MISS is not None and not isinstance(MISS, KeyRecord)


# --- the Exchange --------------------------------------------------------------------------------


class _Conn:
    remote = "192.0.2.7"
    trusted = False
    closing = False
    transport = None

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def limit_body(self, payload: object, max_bytes: int) -> None:
        pass


class _Upstream:
    def __init__(self, answer: int | Denial | Exception) -> None:
        self.answer = answer
        self.request_ids: list[str] = []

    async def forward(self, request: Request, route: object, path: str, request_id: str, **_: object) -> int | Denial:
        self.request_ids.append(request_id)
        if isinstance(self.answer, Exception):
            raise self.answer
        if isinstance(self.answer, int):
            request.reply(self.answer, "OK", b"", b"ok")
        return self.answer


def _proxy(answer: int | Denial | Exception) -> tuple[Proxy, _Upstream, Metrics]:
    cfg = config_mod.parse(CONFIG, source="<test>")
    coherence = Coherence(lease_seconds=1e9)
    coherence.restored()
    cache = KeyCache(ttl_seconds=1e9, negative_ttl_seconds=1e9, max_entries=10)
    cache.put(digest(TOKEN), KeyRecord(id="key_exchange", hash=digest(TOKEN)), cache.generation)
    store: Any = None  # never read: the key is in the cache
    lookup = KeyLookup(store=store, cache=cache, coherence=coherence, serve_stale_seconds=0)
    upstream = _Upstream(answer)
    metrics = Metrics()
    forwarder: Any = upstream
    return Proxy(RouteTable(cfg.routes), lookup, cfg.keys, metrics, forwarder=forwarder), upstream, metrics


def _request(path: str, *headers: tuple[str, str]) -> tuple[Request, _Conn]:
    pairs = [("Host", "gw"), ("User-Agent", "exchange-test/1"), *headers]
    message = RawRequestMessage(
        "GET", path, (1, 1), CIMultiDictProxy(CIMultiDict(pairs)),
        tuple((k.encode(), v.encode()) for k, v in pairs), False, None, False, False, URL(path),
    )  # fmt: skip
    conn = _Conn()
    conn_any: Any = conn
    return Request(conn_any, message, EMPTY_PAYLOAD), conn


def _access(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    fields = ("request_id", "method", "path", "route", "code", "status", "key_id", "upstream_ms", "remote")
    return [{f: getattr(r, f) for f in fields} for r in caplog.records if r.name == "gateway.access"]


def _answer_id(conn: _Conn) -> str:
    _, _, body = b"".join(conn.sent).partition(b"\r\n\r\n")
    request_id: str = orjson.loads(body)["meta"]["requestId"]
    return request_id


async def test_a_forwarded_request_is_recorded_from_its_exchange(caplog: pytest.LogCaptureFixture) -> None:
    proxy, upstream, metrics = _proxy(200)
    request, _ = _request("/api/./v1/items?page=2", ("Authorization", "Bearer " + TOKEN), ("X-Request-Id", "abc-1"))
    with caplog.at_level(logging.INFO, "gateway.access"):
        await proxy.handle(request)
    [line] = _access(caplog)
    assert upstream.request_ids == ["abc-1"]
    assert line["request_id"] == "abc-1" and line["method"] == "GET"
    assert (line["path"], line["route"], line["code"], line["status"]) == ("/api/v1/items", "api", "forwarded", 200)
    assert line["key_id"] == "key_exchange" and line["remote"] == "192.0.2.7"
    assert isinstance(line["upstream_ms"], float)
    assert metrics.requests.labels("api", "forwarded")._value.get() == 1
    assert proxy.inflight == 0


async def test_a_refusal_is_answered_and_recorded_with_one_request_id(caplog: pytest.LogCaptureFixture) -> None:
    proxy, upstream, metrics = _proxy(200)
    request, conn = _request("/api/v1")
    with caplog.at_level(logging.INFO, "gateway.access"):
        await proxy.handle(request)
    [line] = _access(caplog)
    assert upstream.request_ids == []
    assert (line["route"], line["code"], line["status"], line["key_id"]) == ("api", "missing_key", 401, None)
    assert line["upstream_ms"] is None and line["path"] == "/api/v1"
    assert line["request_id"] == _answer_id(conn)
    assert metrics.requests.labels("api", "missing_key")._value.get() == 1


async def test_an_unexpected_failure_answers_with_the_same_request_id_the_path_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The request id is decided once, when the request arrives: the upstream client's log lines,
    # the 500's body and the access record all name the same one (no X-Request-Id: a new one).
    proxy, upstream, metrics = _proxy(RuntimeError("boom"))
    request, conn = _request("/api/v1", ("Authorization", "Bearer " + TOKEN))
    with caplog.at_level(logging.INFO):
        await proxy.handle(request)
    [line] = _access(caplog)
    [given] = upstream.request_ids
    assert line["request_id"] == given == _answer_id(conn)
    assert (line["code"], line["status"], line["route"], line["key_id"]) == ("internal_error", 500, "-", None)
    [unhandled] = [r for r in caplog.records if r.getMessage() == "unhandled RuntimeError"]
    assert unhandled.request_id == given
    assert metrics.requests.labels("-", "internal_error")._value.get() == 1


async def test_a_listener_refusal_is_recorded_without_a_request(caplog: pytest.LogCaptureFixture) -> None:
    proxy, _, metrics = _proxy(200)
    with caplog.at_level(logging.INFO, "gateway.access"):
        proxy.refused("req_0123456789abcdef", "198.51.100.1", "headers_too_large")
    [line] = _access(caplog)
    assert line == {
        "request_id": "req_0123456789abcdef", "method": None, "path": None, "route": "-",
        "code": "headers_too_large", "status": 431, "key_id": None, "upstream_ms": None, "remote": "198.51.100.1",
    }  # fmt: skip
    assert metrics.requests.labels("-", "headers_too_large")._value.get() == 1
