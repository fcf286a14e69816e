"""Unit tests of the pure parts of spec 6 (and the credential of spec 5).

Path normalisation, route matching, the upstream path, which request and
response headers cross the gateway, and reading the bearer credential: all
pure functions, so plain parametrized tables, no servers.
"""

from __future__ import annotations

from http import HTTPStatus

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import errors
from gateway.config import Route
from gateway.errors import Denial
from gateway.h1.headers import HOP_BY_HOP, client_response_head, upstream_request_headers
from gateway.keytable.credentials import MAX_TOKEN_LENGTH, Bearer, bearer_from
from gateway.keytable.record import KeyRecord
from gateway.routing import RouteTable, Target, UnsafePath, encode, normalise, split_target, upstream_path


def make_route(prefix: str, *, name: str | None = None, strip: bool = False, forward_auth: bool = False) -> Route:
    return Route(
        name=name or (prefix.strip("/").replace("/", "-") or "root"),
        path_prefix=prefix,
        upstream="http://127.0.0.1:9000",
        strip_prefix=strip,
        methods=None,
        auth="required",
        scopes=(),
        timeout_seconds=30.0,
        forward_authorization=forward_auth,
    )


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


RECORD = KeyRecord(id="key_0123456789abcdef0123", hash="0" * 64, owner="acme")


def forward(
    *pairs: tuple[str, str],
    forward_authorization: bool = False,
    record: KeyRecord | None = RECORD,
    request_id: str = "req_fromgateway0001",
    peer: str | None = "127.0.0.1",
    scheme: str = "http",
    host: str | None = "api.example.com",
    trusted: bool = False,
) -> CIMultiDict[str]:
    """The upstream's headers for a client that sent `pairs` (plus `Host: host` unless it sent one);
    `trusted`: the peer is in trusted_proxies."""
    if host is not None and not any(name.lower() == "host" for name, _ in pairs):
        pairs = (*pairs, ("Host", host))
    out = upstream_request_headers(
        tuple((name.encode(), value.encode()) for name, value in pairs),
        forward_authorization=forward_authorization,
        key_id=record.id if record is not None else None,
        key_owner=record.owner if record is not None else None,
        request_id=request_id,
        peer=peer,
        scheme=scheme,
        trusted=trusted,
    )
    return CIMultiDict((name.decode(), value.decode()) for name, value in out)


# --- normalise ---------------------------------------------------------------------------------

NORMALISED = [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/a/./b", "/a/b"),
    ("/./a", "/a"),
    ("/a/b/../c", "/a/c"),
    ("/a/b/c/../../d", "/a/d"),
    ("/a//b///c", "/a/b/c"),
    ("//a", "/a"),
    ("///", "/"),
    ("/api/a/./b//c/../d", "/api/a/b/d"),
    # a trailing slash is kept; a final '.' or '..' leaves the path pointing at a directory
    ("/a/b/", "/a/b/"),
    ("/a/b//", "/a/b/"),
    ("/a/.", "/a/"),
    ("/a/b/..", "/a/"),
    ("/a/..", "/"),
    ("/a/../", "/"),
    # percent-escapes decoded once
    ("/%61pi/x", "/api/x"),
    ("/a%20b", "/a b"),
    ("/caf%C3%A9", "/café"),
    ("/caf%c3%a9", "/café"),
    ("/a%3Fb", "/a?b"),
    ("/a%23b", "/a#b"),
    ("/a%25b", "/a%b"),
    # an encoded dot segment is a dot segment
    ("/a/%2e/b", "/a/b"),
    ("/a/%2e%2e/b", "/b"),
    ("/a/%2E%2E/b", "/b"),
    ("/a/.%2e/b", "/b"),
    ("/public/%2e%2e/billing/x", "/billing/x"),
    ("/public/../billing/x", "/billing/x"),
    # ... but decoding happens once only: a double-encoded one is a literal name
    ("/%252e%252e/x", "/%2e%2e/x"),
    ("/a%252Fb", "/a%2Fb"),
    ("/a%255Cb", "/a%5Cb"),
    # a dot that is part of a name is not a dot segment
    ("/a/.../b", "/a/.../b"),
    ("/a/..b/c", "/a/..b/c"),
    ("/a/.hidden", "/a/.hidden"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_normalise_resolves_dot_segments_slashes_and_escapes(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


UNSAFE = [
    # '..' above the root, plain or encoded
    "/..",
    "/../a",
    "/a/../..",
    "/a/../../b",
    "/%2e%2e",
    "/%2e%2e/a",
    "/a/%2e%2e/%2E%2E/b",
    "/a/b/../../../c",
    # encoded '/', '\' and NUL
    "/a%2Fb",
    "/a%2fb",
    "/public%2F..%2Fbilling",
    "/a%5Cb",
    "/a%5cb",
    "/a%00b",
    "/a%00",
    # raw backslash
    "/a\\b",
    "/public\\..\\billing",
    # control characters once decoded
    "/a%0Ab",
    "/a%0d%0aX-Injected:%201",
    "/a%7F",
    "/a%1F",
    # invalid percent-escapes
    "/a%zz",
    "/a%",
    "/a%2",
    "/a%g0",
    # not UTF-8 once decoded
    "/a%ff",
    "/a%C3",
    "/a%C3%28",
    "/%80",
    # a dot segment with path parameters: Tomcat, Jetty and Spring drop `;x` and then resolve the dot
    "/public/..;/admin",
    "/public/..;x=1/admin",
    "/public/%2e%2e;/admin",
    "/public/.;/x",
    # not origin-form
    "",
    "a/b",
    "*",
    "http://evil.example/a",
]


@pytest.mark.parametrize("raw", UNSAFE)
def test_normalise_refuses_unsafe_paths(raw: str) -> None:
    with pytest.raises(UnsafePath):
        normalise(raw)


def test_unsafe_path_is_a_value_error() -> None:
    assert issubclass(UnsafePath, ValueError)


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("/", "/"),
        ("/a/b/", "/a/b/"),
        ("/a b", "/a%20b"),
        ("/a?b", "/a%3Fb"),
        ("/a#b", "/a%23b"),
        ("/a%b", "/a%25b"),
        ("/a%2Fb", "/a%252Fb"),
        ("/café", "/caf%C3%A9"),
        ("/a:b@c!$&'()*+,;=-._~", "/a:b@c!$&'()*+,;=-._~"),
    ],
)
def test_encode_percent_encodes_what_a_path_cannot_carry(path: str, encoded: str) -> None:
    assert encode(path) == encoded


@pytest.mark.parametrize("raw", [raw for raw, _ in NORMALISED])
def test_encoding_a_normalised_path_is_stable(raw: str) -> None:
    """What the gateway matched is what the upstream receives: decode(encode(p)) == p, encode is idempotent."""
    path = normalise(raw)
    wire = encode(path)
    assert normalise(wire) == path
    assert encode(normalise(wire)) == wire


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        ("/a/./b?x=1&y=%2F", Target("/a/b", "x=1&y=%2F")),
        ("/a?", Target("/a", "")),
        ("/a", Target("/a", "")),
        ("/a?b?c", Target("/a", "b?c")),
        ("/a#frag", Target("/a", "")),
        ("/a//b/../c?q=%2e%2e/../", Target("/a/c", "q=%2e%2e/../")),
    ],
)
def test_split_target_normalises_the_path_and_keeps_the_query_raw(raw: str, target: Target) -> None:
    assert split_target(raw) == target


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        ("http://example.com/api/./x?q=1", Target("/api/x", "q=1")),
        ("HTTPS://example.com:8443/a//b", Target("/a/b", "")),
        ("http://example.com", Target("/", "")),
        ("http://example.com?q=1", Target("/", "q=1")),
    ],
)
def test_split_target_accepts_absolute_form_and_uses_its_path(raw: str, target: Target) -> None:
    assert split_target(raw) == target


def test_split_target_refuses_an_unsafe_path_in_absolute_form() -> None:
    with pytest.raises(UnsafePath):
        split_target("http://example.com/public/%2e%2e/%2e%2e/billing")


def test_split_target_refuses_an_unsafe_path_even_with_a_query() -> None:
    with pytest.raises(UnsafePath):
        split_target("/a%2Fb?x=1")


# --- route table -------------------------------------------------------------------------------

ROUTES = (
    make_route("/", name="root"),
    make_route("/billing", name="billing"),
    make_route("/billing/admin", name="billing-admin"),
    make_route("/api", name="api"),
    make_route("/api/v2", name="api-v2"),
)


@pytest.mark.parametrize("order", ["as-configured", "reversed"])
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/billing", "billing"),
        ("/billing/", "billing"),
        ("/billing/x", "billing"),
        ("/billingx", "root"),
        ("/billing-admin", "root"),
        ("/billing/admin", "billing-admin"),
        ("/billing/admin/", "billing-admin"),
        ("/billing/admin/y", "billing-admin"),
        ("/billing/adminx", "billing"),
        ("/api/v2/z", "api-v2"),
        ("/api/v20", "api"),
        ("/api", "api"),
        ("/apix", "root"),
        ("/x", "root"),
        ("/", "root"),
    ],
)
def test_route_table_takes_the_longest_prefix_on_segment_boundaries(path: str, expected: str, order: str) -> None:
    routes = ROUTES if order == "as-configured" else tuple(reversed(ROUTES))
    route = RouteTable(routes).match(path)
    assert route is not None
    assert route.name == expected


@pytest.mark.parametrize("path", ["/", "/billingx", "/bil", "/apix", "/x/billing", "/Billing"])
def test_route_table_without_a_catch_all_matches_nothing_else(path: str) -> None:
    assert RouteTable(ROUTES[1:]).match(path) is None


def test_an_empty_route_table_matches_nothing() -> None:
    assert RouteTable(()).match("/") is None


# --- upstream path -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "strip", "path", "expected"),
    [
        ("/stripped", True, "/stripped/x", "/x"),
        ("/stripped", True, "/stripped/a/b/", "/a/b/"),
        ("/stripped", True, "/stripped", "/"),
        ("/stripped", True, "/stripped/", "/"),
        ("/a/b", True, "/a/b/c", "/c"),
        ("/stripped", False, "/stripped/x", "/stripped/x"),
        ("/stripped", False, "/stripped", "/stripped"),
        ("/", True, "/x/y", "/x/y"),
        ("/", False, "/x/y", "/x/y"),
    ],
)
def test_upstream_path_strips_the_prefix_only_when_asked(prefix: str, strip: bool, path: str, expected: str) -> None:
    assert upstream_path(make_route(prefix, strip=strip), path) == expected


# --- request headers to the upstream -----------------------------------------------------------


@pytest.mark.parametrize(
    "hop",
    [
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authenticate", "Basic"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("connection", "close"),
        ("UPGRADE", "h2c"),
    ],
)
def test_hop_by_hop_request_headers_are_removed(hop: tuple[str, str]) -> None:
    out = forward(hop, ("X-Keep", "1"))
    assert hop[0] not in out
    assert out["X-Keep"] == "1"


def test_headers_named_in_connection_are_removed() -> None:
    out = forward(
        ("Connection", "keep-alive, X-Hop-One"),
        ("Connection", " x-hop-two ,,X-HOP-THREE "),
        ("X-Hop-One", "1"),
        ("X-Hop-Two", "2"),
        ("x-hop-three", "3"),
        ("X-Hop-Four", "4"),
        ("Accept", "*/*"),
    )
    for name in ("Connection", "X-Hop-One", "X-Hop-Two", "X-Hop-Three"):
        assert name not in out
    assert out["X-Hop-Four"] == "4"
    assert out["Accept"] == "*/*"


def test_the_hop_by_hop_set_is_the_rfc_one() -> None:
    assert {"connection", "keep-alive", "proxy-authorization", "te", "transfer-encoding", "upgrade"} <= HOP_BY_HOP
    assert "authorization" not in HOP_BY_HOP
    assert "content-length" not in HOP_BY_HOP


def test_connection_cannot_strip_the_headers_the_gateway_sets() -> None:
    out = forward(
        ("Connection", "X-Gateway-Key-Id, X-Gateway-Key-Owner, X-Request-Id, X-Forwarded-Proto, X-Forwarded-Host"),
    )
    assert out.getall("X-Gateway-Key-Id") == [RECORD.id]
    assert out.getall("X-Gateway-Key-Owner") == ["acme"]
    assert out.getall("X-Request-Id") == ["req_fromgateway0001"]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Forwarded-Host") == ["api.example.com"]
    assert out.getall("X-Forwarded-For") == ["127.0.0.1"]


SPOOFED = (
    ("X-Gateway-Key-Id", "key_evil"),
    ("x-gateway-key-id", "key_evil2"),
    ("X-Gateway-Key-Owner", "evil"),
    ("X-Gateway-Anything", "1"),
    ("X-GATEWAY-ROLE", "admin"),
)


def test_client_sent_gateway_headers_are_replaced_by_the_gateways_own() -> None:
    out = forward(*SPOOFED, ("X-Gateway", "not-a-gateway-header"))
    assert out.getall("X-Gateway-Key-Id") == [RECORD.id]
    assert out.getall("X-Gateway-Key-Owner") == ["acme"]
    assert sorted(k.lower() for k in out if k.lower().startswith("x-gateway-")) == [
        "x-gateway-key-id",
        "x-gateway-key-owner",
    ]
    assert out["X-Gateway"] == "not-a-gateway-header"


def test_without_a_key_no_gateway_identity_header_is_sent_at_all() -> None:
    out = forward(*SPOOFED, record=None)
    assert [k for k in out if k.lower().startswith("x-gateway-")] == []


def test_a_key_without_an_owner_sends_no_owner_header() -> None:
    record = KeyRecord(id="key_noowner", hash="0" * 64, owner=None)
    out = forward(("X-Gateway-Key-Owner", "evil"), record=record)
    assert out.getall("X-Gateway-Key-Id") == ["key_noowner"]
    assert "X-Gateway-Key-Owner" not in out


@pytest.mark.parametrize(("forward_authorization", "kept"), [(False, False), (True, True)])
def test_authorization_is_forwarded_only_when_the_route_says_so(forward_authorization: bool, kept: bool) -> None:
    out = forward(("Authorization", "Bearer gw_secret"), forward_authorization=forward_authorization)
    assert out.getall("Authorization", []) == (["Bearer gw_secret"] if kept else [])


def test_proxy_authorization_is_dropped_even_when_authorization_is_forwarded() -> None:
    out = forward(("Proxy-Authorization", "Basic x"), ("Authorization", "Bearer k"), forward_authorization=True)
    assert "Proxy-Authorization" not in out
    assert out["Authorization"] == "Bearer k"


@pytest.mark.parametrize(
    ("client", "peer", "expected"),
    [
        ((), "127.0.0.1", "127.0.0.1"),
        (("1.2.3.4",), "127.0.0.1", "1.2.3.4, 127.0.0.1"),
        (("1.2.3.4, 10.0.0.1",), "127.0.0.1", "1.2.3.4, 10.0.0.1, 127.0.0.1"),
        (("1.2.3.4", "5.6.7.8"), "127.0.0.1", "1.2.3.4, 5.6.7.8, 127.0.0.1"),
        (("1.2.3.4",), None, "1.2.3.4"),
        ((), "::1", "::1"),
    ],
)
def test_x_forwarded_for_appends_the_peer(client: tuple[str, ...], peer: str | None, expected: str) -> None:
    # A client's X-Forwarded-For is kept only from a trusted proxy (spec 6): this peer is one.
    out = forward(*(("X-Forwarded-For", v) for v in client), peer=peer, trusted=True)
    assert out.getall("X-Forwarded-For") == [expected]


def test_no_peer_and_no_client_value_sends_no_x_forwarded_for() -> None:
    assert "X-Forwarded-For" not in forward(peer=None)


def test_request_id_proto_and_host_are_set_by_the_gateway_not_copied() -> None:
    out = forward(
        ("X-Request-Id", "client-id"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("Host", "api.example.com"),
        ("Expect", "100-continue"),
        request_id="client-id-checked",
        scheme="http",
        host="api.example.com",
    )
    assert out.getall("X-Request-Id") == ["client-id-checked"]
    assert out.getall("X-Forwarded-Proto") == ["http"]
    assert out.getall("X-Forwarded-Host") == ["api.example.com"]
    assert "Host" not in out
    assert "Expect" not in out


def test_end_to_end_headers_pass_with_every_value_in_order() -> None:
    out = forward(
        ("Accept", "application/json"),
        ("X-Multi", "one"),
        ("Content-Type", "text/plain"),
        ("X-Multi", "two"),
        ("Content-Length", "5"),
        ("Cookie", "a=1"),
    )
    assert out.getall("X-Multi") == ["one", "two"]
    assert out["Accept"] == "application/json"
    assert out["Content-Type"] == "text/plain"
    assert out["Content-Length"] == "5"
    assert out["Cookie"] == "a=1"


# --- response headers to the client ------------------------------------------------------------


DATE = b"Mon, 23 Nov 2026 10:00:00 GMT"


def response_head(pairs: list[tuple[str, str]], request_id: str = "req_abc") -> tuple[CIMultiDict[str], bool]:
    """client_response_head's block parsed back into headers, and its has-a-length flag."""
    block, has_length = client_response_head(tuple((n.encode(), v.encode()) for n, v in pairs), request_id, DATE)
    assert block.endswith(b"\r\n") and not block.endswith(b"\r\n\r\n")
    out: CIMultiDict[str] = CIMultiDict()
    for line in block.decode().split("\r\n")[:-1]:
        name, sep, value = line.partition(": ")
        assert sep, line
        out.add(name, value)
    return out, has_length


def test_hop_by_hop_response_headers_are_removed() -> None:
    out, _ = response_head(
        [
            ("Connection", "X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Proxy-Authenticate", "Basic"),
            ("X-Kept", "1"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Location", "/elsewhere"),
        ]
    )
    for name in ("Connection", "X-Secret-Hop", "Keep-Alive", "Transfer-Encoding", "Upgrade", "Proxy-Authenticate"):
        assert name not in out
    assert out["X-Kept"] == "1"
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["Location"] == "/elsewhere"


@pytest.mark.parametrize(("upstream_value", "expected"), [(None, "req_abc"), ("up-123", "up-123")])
def test_response_carries_a_request_id(upstream_value: str | None, expected: str) -> None:
    pairs = [("X-Upstream", "1")] + ([("X-Request-Id", upstream_value)] if upstream_value else [])
    out, _ = response_head(pairs)
    assert out.getall("X-Request-Id") == [expected]


@pytest.mark.parametrize(
    ("upstream_date", "expected"), [(None, DATE.decode()), ("Sun, 06 Nov 1994 08:49:37 GMT", None)]
)
def test_response_date_is_added_only_when_the_upstream_sent_none(
    upstream_date: str | None, expected: str | None
) -> None:
    out, _ = response_head([("X-Upstream", "1")] + ([("Date", upstream_date)] if upstream_date else []))
    assert out.getall("Date") == [expected or upstream_date]


@pytest.mark.parametrize(
    ("pairs", "has_length"),
    [
        ([("Content-Length", "5")], True),
        ([("content-length", "0")], True),
        ([("Transfer-Encoding", "chunked")], False),
        ([], False),
    ],
)
def test_response_head_says_whether_it_carries_a_length(pairs: list[tuple[str, str]], has_length: bool) -> None:
    out, flag = response_head(pairs)
    assert flag is has_length
    assert "Transfer-Encoding" not in out


# --- the bearer credential ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "token"),
    [
        (["Bearer gw_abc"], "gw_abc"),
        (["bearer gw_abc"], "gw_abc"),
        (["BEARER gw_abc"], "gw_abc"),
        (["Bearer   gw_abc  "], "gw_abc"),
        (["  Bearer gw_abc"], "gw_abc"),
        (["Bearer a-b.c_d~e+f/g=="], "a-b.c_d~e+f/g=="),
        (["Bearer " + "a" * MAX_TOKEN_LENGTH], "a" * MAX_TOKEN_LENGTH),
    ],
)
def test_bearer_from_reads_the_token(values: list[str], token: str) -> None:
    result = bearer_from(values)
    assert isinstance(result, Bearer)
    assert result.token == token


@pytest.mark.parametrize(
    ("values", "code"),
    [
        ([], "missing_key"),
        (["Bearer a", "Bearer b"], "invalid_request"),
        (["Bearer a", "Basic b"], "invalid_request"),
        (["Basic dXNlcjpwYXNz"], "malformed_key"),
        (["gw_abc"], "malformed_key"),
        (["Bearer"], "malformed_key"),
        (["Bearer "], "malformed_key"),
        (["Bearer    "], "malformed_key"),
        ([""], "malformed_key"),
        (["Bearer " + "a" * (MAX_TOKEN_LENGTH + 1)], "malformed_key"),
        (["Bearer a b"], "malformed_key"),
        (["Bearer a,b"], "malformed_key"),
        (["Bearer =abc"], "malformed_key"),
        (["Bearer abc=def"], "malformed_key"),
        (["Bearer caf\u00e9"], "malformed_key"),
        (["Bearerabc"], "malformed_key"),
    ],
)
def test_bearer_from_refuses(values: list[str], code: str) -> None:
    result = bearer_from(values)
    assert isinstance(result, Denial)
    assert result.code == code


def test_an_oversized_token_is_not_echoed() -> None:
    token = "s3cr3t" * 200
    result = bearer_from(["Bearer " + token])
    assert isinstance(result, Denial)
    assert token not in (result.detail or "")


def test_the_bearer_repr_never_shows_the_token() -> None:
    assert "gw_topsecret" not in repr(Bearer("gw_topsecret"))
    assert "gw_topsecret" not in str(Bearer("gw_topsecret"))


# --- the proxy's refusals as bytes -----------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(errors.KINDS))
@pytest.mark.parametrize("request_id", ["req_0123456789abcdef", "client-id.1:2_3"])
def test_wire_is_the_rendered_answer_with_the_request_id_in_place(code: str, request_id: str) -> None:
    """errors.wire (a template per kind of denial) says exactly what errors.rendered says."""
    for denial in (
        errors.Denial(code),
        errors.Denial(code, detail="a detail of its own"),
        errors.Denial(code, status=401),
        errors.Denial(code, headers={"Allow": "GET, HEAD"}),
    ):
        status, fields, body = errors.rendered(denial, request_id)
        got_status, reason, head, got_body = errors.wire(denial, request_id)
        assert (got_status, got_body) == (status, body)
        assert reason == HTTPStatus(status).phrase
        assert head == "".join(f"{k}: {v}\r\n" for k, v in fields.items()).encode()
        assert head.count(request_id.encode()) == 1 and got_body.count(request_id.encode()) == 1
