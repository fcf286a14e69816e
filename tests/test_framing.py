"""Exact framing, both directions (spec 6, issue 10): what the UPSTREAM received, byte for byte.

Every case runs a real gateway replica against tests/recording_upstream.py, an
upstream that records the exact bytes it read on each connection and splits
them into requests by its own strict reading of the framing. The question each
test asks is the one an attacker's request poses: did the upstream read exactly
the requests the clients sent, each once, whole, with exactly its body, and
nothing else (not a refused request, not the bytes behind it, not a request of
another client inside a body)?

Request side: a framing the gateway cannot honour exactly is 400 invalid_request
with `Connection: close`, the connection is closed, and nothing of it or after it
reaches the upstream; a well-framed body larger than the route allows is 413.
Response side: a response whose framing is not exact is 502 upstream_unavailable,
no byte of it reaches the client, and the upstream connection is never used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import pytest

from tests.conftest import AdminTokens, Gateway, RedisProcess
from tests.recording_upstream import (
    SMALL_LIMIT,
    TEST_ID,
    Answer,
    Client,
    RecordingUpstream,
    Sent,
    chunked,
    gateway_idle,
    raw_request,
    start_gateway,
    upstream_saw_exactly,
)

T = TypeVar("T")
MARKER = "SMUGGLED-7f3c"  # in bytes that must never reach the upstream
# A body that is itself a request, carrying a credential: read as a request, it would be forwarded.
SMUGGLED = raw_request("GET", "/api/smuggled", [f"{TEST_ID}: smuggled", f"Authorization: Bearer {MARKER}"])


@pytest.fixture
async def recorder(request: pytest.FixtureRequest) -> AsyncIterator[RecordingUpstream]:
    """The recording upstream; `early` (answers before reading the body) unless parametrized."""
    upstream = RecordingUpstream(getattr(request, "param", "early"))
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
async def fgw(
    redis_server: RedisProcess, admin_tokens: AdminTokens, recorder: RecordingUpstream
) -> AsyncIterator[Gateway]:
    async with contextlib.AsyncExitStack() as stack:
        yield await start_gateway(stack, redis_server.url, admin_tokens, recorder)


@pytest.fixture
async def key(fgw: Gateway) -> str:
    created = await fgw.create_key(name="framing", owner="acme")
    token: str = created["key"]
    return token


@contextlib.asynccontextmanager
async def client(gw: Gateway) -> AsyncIterator[Client]:
    c = await Client.open(gw.proxy.port)
    try:
        yield c
    finally:
        await c.close()


async def attempt(step: Awaitable[T]) -> T | str:
    """An answer, or what went wrong instead (so the upstream's record is checked before the client's)."""
    try:
        return await step
    except (TimeoutError, AssertionError, asyncio.IncompleteReadError, ConnectionError) as exc:
        return f"no answer: {type(exc).__name__} {exc}"


def assert_upstream_answer(answer: Answer | str, test_id: str) -> Answer:
    assert isinstance(answer, Answer), answer
    assert answer.from_upstream, (answer.status, answer.raw_headers, answer.body[:300])
    assert answer.headers[TEST_ID] == test_id, answer.raw_headers
    return answer


def assert_refused(answer: Answer | str, status: int = 400, code: str = "invalid_request") -> Answer:
    assert isinstance(answer, Answer), answer
    assert answer.status == status, (answer.status, answer.raw_headers, answer.body[:300])
    assert answer.code == code
    assert "X-Upstream" not in answer.headers, "the upstream answered a request the gateway should have refused"
    return answer


# --- 1. what the upstream reads for an accepted request ------------------------------------------------------

BODY = b"".join(bytes([i % 251]) for i in range(3000))  # every byte value but a few, CR and LF included


def accepted_requests(key: str) -> list[tuple[bytes, Sent]]:
    """Well-framed requests of every kind, and what the upstream must read for each."""
    cases: list[tuple[bytes, Sent]] = []

    def add(method: str, target: str, headers: list[str], body: bytes, wire_body: bytes) -> None:
        test_id = f"ok-{len(cases)}"
        lines = [f"{TEST_ID}: {test_id}", *headers]
        own = tuple((n, v.strip(" \t")) for n, _, v in (h.partition(":") for h in lines)
                    if n.lower() not in ("content-length", "transfer-encoding", "authorization"))  # fmt: skip
        cases.append((raw_request(method, target, lines, wire_body),
                      Sent(test_id, method, target.split("?")[0], body, own)))  # fmt: skip

    add("GET", "/public/plain", [], b"", b"")
    add("GET", "/public/q?a=1", ["Content-Length: 0"], b"", b"")
    add("POST", "/public/length", [f"Content-Length: {len(BODY)}"], BODY, BODY)
    add("POST", "/public/ows", ["Content-Length:   5  "], b"hello", b"hello")  # OWS around the value
    add("POST", "/public/ows-tab", ["Content-Length:\t5\t"], b"hello", b"hello")
    add("PUT", "/public/empty", ["Content-Length: 0"], b"", b"")
    add("POST", "/public/chunked", ["Transfer-Encoding: chunked"], BODY, chunked(BODY, [1, 2, 500, 7]))
    add("POST", "/public/chunked-ext", ["Transfer-Encoding: chunked"], BODY, chunked(BODY, [100], ext=True))
    add("PATCH", "/public/chunked-trailer", ["Transfer-Encoding: chunked"], b"abc",
        b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n")  # fmt: skip
    add(
        "POST",
        "/public/chunked-upper",
        ["Transfer-Encoding: chunked"],
        BODY[:300],
        b"12C\r\n" + BODY[:300] + b"\r\n0\r\n\r\n",
    )
    add("POST", "/public/empty-chunked", ["Transfer-Encoding: chunked"], b"", b"0\r\n\r\n")
    add("POST", "/public/looks-like-requests", [f"Content-Length: {len(SMUGGLED) * 3}"], SMUGGLED * 3, SMUGGLED * 3)
    add("POST", "/public/chunked-looks-like", ["Transfer-Encoding: chunked"], SMUGGLED, chunked(SMUGGLED, [10]))
    add("POST", "/api/keyed", [f"Authorization: Bearer {key}", "Content-Length: 4"], b"keyd", b"keyd")
    add("DELETE", "/api/keyed-chunked", [f"Authorization: Bearer {key}", "Transfer-Encoding: chunked"], b"xyz",
        chunked(b"xyz", [1]))  # fmt: skip
    small = b"s" * SMALL_LIMIT
    add("POST", "/small/at-the-limit", [f"Content-Length: {SMALL_LIMIT}"], small, small)
    return cases


@pytest.mark.parametrize("recorder", ["normal", "early"], indirect=True)
@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
async def test_an_accepted_request_reaches_the_upstream_exactly_as_sent(
    fgw: Gateway, key: str, recorder: RecordingUpstream, pipelined: bool
) -> None:
    cases = accepted_requests(key)
    answers: list[Answer | str] = []
    async with client(fgw) as c:
        if pipelined:
            await c.send(b"".join(wire for wire, _ in cases))
            for _ in cases:
                answers.append(await attempt(c.answer()))
        else:
            for wire, _ in cases:
                await c.send(wire)
                answers.append(await attempt(c.answer()))
        await recorder.settle(done=gateway_idle(fgw))
    upstream_saw_exactly(recorder, [sent for _, sent in cases], secrets=[key])
    for answer, (_, sent) in zip(answers, cases, strict=True):
        reply = assert_upstream_answer(answer, sent.test_id)
        assert not reply.closes
    # Requests went out on pooled connections, one after another: fewer connections than requests.
    assert len({r.conn for r in recorder.requests}) < len(cases)


@pytest.mark.parametrize("trailer", ["X-Injected: 1", f"Authorization: Bearer {MARKER}", "Expect: 100-continue"])
async def test_a_trailer_never_becomes_a_header_of_the_next_request(
    fgw: Gateway, recorder: RecordingUpstream, trailer: str
) -> None:
    """A chunked body's trailer section belongs to that request: the upstream must not read its fields
    as header fields of the request that follows on the connection. The gateway may forward the first
    request (trailer dropped or kept as a trailer) or refuse it; what it forwards must be exactly what
    the client sent, and exactly what it answered from the upstream."""
    first = raw_request("POST", "/public/t1", [f"{TEST_ID}: t1", "Transfer-Encoding: chunked"])
    first += b"3\r\nabc\r\n0\r\n" + trailer.encode() + b"\r\n\r\n"
    second = raw_request("GET", "/public/t2", [f"{TEST_ID}: t2"])
    expected = {
        "t1": Sent("t1", "POST", "/public/t1", b"abc", ((TEST_ID, "t1"),)),
        "t2": Sent("t2", "GET", "/public/t2", b"", ((TEST_ID, "t2"),)),
    }
    async with client(fgw) as c:
        await c.send(first + second)
        answers = [await attempt(c.answer()) for _ in range(2)]
        await recorder.settle(done=gateway_idle(fgw))
    forwarded = [a.headers[TEST_ID] for a in answers if isinstance(a, Answer) and a.from_upstream]
    upstream_saw_exactly(recorder, [expected[i] for i in forwarded], secrets=[MARKER])
    assert forwarded == ["t1", "t2"] or (isinstance(answers[0], Answer) and answers[0].status == 400), answers


# --- 2. the catalogue of framings the gateway cannot honour exactly ---------------------------------------------


@dataclass(frozen=True)
class Bad:
    wire: bytes
    status: int = 400
    code: str = "invalid_request"


def with_headers(*headers: str | bytes, body: bytes = SMUGGLED, target: str = "/public/bad") -> bytes:
    return raw_request("POST", target, [f"{TEST_ID}: bad", *headers], body)


def cl(value: str | bytes, target: str = "/public/bad") -> Bad:
    raw = value if isinstance(value, bytes) else value.encode("latin-1")
    return Bad(with_headers(b"Content-Length: " + raw, target=target))


def te(*values: str | bytes, body: bytes = chunked(b"hello") + SMUGGLED) -> Bad:
    lines = [b"Transfer-Encoding: " + (v if isinstance(v, bytes) else v.encode("latin-1")) for v in values]
    return Bad(with_headers(*lines, body=body))


def chunk_body(wire: bytes) -> Bad:
    return Bad(with_headers("Transfer-Encoding: chunked", body=wire + SMUGGLED))


def head_bytes(wire: bytes) -> Bad:
    return Bad(wire + SMUGGLED)


REFUSED: dict[str, Bad] = {
    # Content-Length overflow and near-overflow: no length the gateway cannot honour is ever forwarded.
    "cl-2^64-1": cl(str(2**64 - 1)),
    "cl-2^64": cl(str(2**64)),
    "cl-2^64+1": cl(str(2**64 + 1)),
    "cl-2^64+5-wraps-to-5": cl(str(2**64 + 5)),
    "cl-2^128": cl(str(2**128)),
    "cl-2^63": cl(str(2**63)),
    "cl-2^63-1": cl(str(2**63 - 1)),
    "cl-2^53+1": cl(str(2**53 + 1)),
    "cl-2^53+1-on-a-small-route": cl(str(2**53 + 1), target="/small/bad"),
    "cl-twenty-nines": cl("9" * 20),
    "cl-a-thousand-digits": cl("1" + "0" * 999),
    # Not a plain decimal.
    "cl-plus": cl("+5"),
    "cl-minus": cl("-5"),
    "cl-minus-zero": cl("-0"),
    "cl-leading-zero": cl("05"),
    "cl-double-zero": cl("00"),
    "cl-many-leading-zeros": cl("0000000000000000000005"),
    "cl-hex": cl("0x5"),
    "cl-inner-space": cl("5 5"),
    "cl-list": cl("5, 5"),
    "cl-list-no-space": cl("5,5"),
    "cl-decimal-point": cl("5.0"),
    "cl-exponent": cl("5e0"),
    "cl-underscore": cl("1_0"),
    "cl-empty": cl(""),
    "cl-fullwidth-digit": cl("\uff15".encode()),
    "cl-vertical-tab": cl("5\x0b"),
    "cl-form-feed-before": cl("\x0c5"),
    "cl-nul-after": cl("5\x00"),
    "cl-duplicate-equal": Bad(with_headers("Content-Length: 5", "Content-Length: 5")),
    "cl-duplicate-different": Bad(with_headers("Content-Length: 5", "Content-Length: 50")),
    "cl-space-before-colon": Bad(with_headers("Content-Length : 5")),
    "cl-obs-fold": Bad(with_headers("Content-Length:", " 5")),
    # Content-Length with Transfer-Encoding, in either order.
    "cl-then-te": Bad(with_headers("Content-Length: 5", "Transfer-Encoding: chunked", body=chunked(b"hello"))),
    "te-then-cl": Bad(with_headers("Transfer-Encoding: chunked", "Content-Length: 5", body=chunked(b"hello"))),
    "cl-0-then-te": Bad(with_headers("Content-Length: 0", "Transfer-Encoding: chunked", body=chunked(SMUGGLED))),
    # Any Transfer-Encoding but exactly one `chunked`.
    "te-gzip-chunked": te("gzip, chunked"),
    "te-chunked-gzip": te("chunked, gzip"),
    "te-chunked-chunked": te("chunked, chunked"),
    "te-two-fields": te("chunked", "chunked"),
    "te-two-fields-gzip-first": te("gzip", "chunked"),
    "te-identity": te("identity"),
    "te-xchunked": te("xchunked"),
    "te-chunkedx": te("chunkedx"),
    "te-chunked-vertical-tab": te(b"chunked\x0b"),
    "te-chunked-nul": te(b"chunked\x00"),
    "te-quoted": te('"chunked"'),
    "te-empty": te(""),
    "te-space-before-colon": Bad(with_headers("Transfer-Encoding : chunked", body=chunked(b"hello") + SMUGGLED)),
    "te-obs-fold-value": Bad(with_headers("Transfer-Encoding:", " chunked", body=chunked(b"hello") + SMUGGLED)),
    "te-obs-fold-line": Bad(with_headers("X-Pad: 1", " Transfer-Encoding: chunked", body=chunked(b"hello"))),
    # Chunk sizes the gateway cannot honour, or chunked framing that is not exact.
    "chunk-size-overflow": chunk_body(b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-2^64+5-wraps-to-5": chunk_body(b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-plus": chunk_body(b"+5\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-0x": chunk_body(b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-negative": chunk_body(b"-1\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-empty": chunk_body(b"\r\nhello\r\n0\r\n\r\n"),
    "chunk-bare-lf": chunk_body(b"5\nhello\n0\n\n"),
    "chunk-data-not-followed-by-crlf": chunk_body(b"5\r\nhelloXX0\r\n\r\n"),
    "chunk-size-line-bare-cr": chunk_body(b"5\rhello\r\n0\r\n\r\n"),
    # Line endings, obs-fold, NUL and CR in values.
    "bare-lf-head": head_bytes(
        f"POST /public/bad HTTP/1.1\nHost: gw\n{TEST_ID}: bad\nContent-Length: 5\n\nhello".encode()
    ),
    "bare-lf-one-header-line": head_bytes(
        f"POST /public/bad HTTP/1.1\r\nHost: gw\r\n{TEST_ID}: bad\nContent-Length: 5\r\n\r\nhello".encode()
    ),
    "bare-lf-request-line": head_bytes(f"GET /public/bad HTTP/1.1\nHost: gw\r\n{TEST_ID}: bad\r\n\r\n".encode()),
    "bare-lf-end-of-head": head_bytes(f"GET /public/bad HTTP/1.1\r\nHost: gw\r\n{TEST_ID}: bad\r\n\n".encode()),
    "obs-fold": Bad(with_headers("X-Folded: a", " b", "Content-Length: 5", body=b"hello" + SMUGGLED)),
    "obs-fold-tab": Bad(with_headers("X-Folded: a", "\tb", "Content-Length: 5", body=b"hello" + SMUGGLED)),
    "nul-in-value": Bad(with_headers("X-Nul: a\x00b", "Content-Length: 5", body=b"hello" + SMUGGLED)),
    "cr-in-value": Bad(with_headers("X-Cr: a\rb", "Content-Length: 5", body=b"hello" + SMUGGLED)),
    "cr-in-value-hiding-a-header": Bad(with_headers("X-Cr: a\rContent-Length: 5", body=b"hello" + SMUGGLED)),
    "expect-continue-with-cl-2^64": Bad(with_headers("Expect: 100-continue", f"Content-Length: {2**64}")),
    # Well framed, but larger than the route takes: 413 body_too_large, nothing forwarded.
    "cl-above-a-small-route-limit": Bad(
        with_headers(f"Content-Length: {SMALL_LIMIT + 1}", target="/small/big", body=b"b" * (SMALL_LIMIT + 1)),
        413,
        "body_too_large",
    ),
    "cl-10MiB+1": Bad(with_headers(f"Content-Length: {10 * 1024 * 1024 + 1}"), 413, "body_too_large"),
    "cl-2^32": Bad(with_headers(f"Content-Length: {2**32}"), 413, "body_too_large"),
    "cl-2^53": Bad(with_headers(f"Content-Length: {2**53}"), 413, "body_too_large"),
    "cl-2^53-on-a-small-route": Bad(with_headers(f"Content-Length: {2**53}", target="/small/x"), 413, "body_too_large"),
}
AFTER = raw_request("GET", "/public/after", [f"{TEST_ID}: after"])


async def refused_then_a_victim(gw: Gateway, key: str, recorder: RecordingUpstream, bad: Bad) -> None:
    """The attack of issue 10: a request the gateway cannot frame exactly (with a body that is a request
    itself, and one more request behind it), then, while that connection is still open, another client's
    request with its key on a second connection. The upstream must read only the victim's request, whole,
    without the key; the bad request is refused and its connection closed."""
    async with client(gw) as attacker, client(gw) as victim:
        await attacker.send(bad.wire + (AFTER if bad.status == 400 else b""))
        refused = await attempt(attacker.answer())
        await victim.send(raw_request("GET", "/api/victim", [f"{TEST_ID}: victim", f"Authorization: Bearer {key}"]))
        victims = await attempt(victim.answer())
        closed: bytes | str | None = await attempt(attacker.closed_by_gateway()) if bad.status == 400 else None
        await recorder.settle(done=gateway_idle(gw))
    upstream_saw_exactly(recorder, [Sent("victim", "GET", "/api/victim")], secrets=[key, MARKER])
    assert_refused(refused, bad.status, bad.code)
    assert isinstance(refused, Answer)
    if bad.status == 400:
        assert refused.closes, refused.raw_headers
        assert closed == b"", f"the gateway sent more after the refusal: {closed!r}"
        assert attacker.received.count(b"HTTP/1.1 ") == 1, bytes(attacker.received)
    assert b"100 Continue" not in attacker.received
    assert_upstream_answer(victims, "victim")


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
async def test_a_framing_the_gateway_cannot_honour_reaches_no_upstream(
    fgw: Gateway, key: str, recorder: RecordingUpstream, case: str
) -> None:
    await refused_then_a_victim(fgw, key, recorder, REFUSED[case])


OVERFLOWS = ["cl-2^64-1", "cl-2^64", "cl-2^64+5-wraps-to-5", "cl-2^53+1", "te-gzip-chunked", "chunk-size-overflow"]


@pytest.mark.parametrize("recorder", ["normal"], indirect=True)
@pytest.mark.parametrize("case", OVERFLOWS, ids=OVERFLOWS)
async def test_the_reported_smuggling_against_an_upstream_that_reads_the_body_first(
    fgw: Gateway, key: str, recorder: RecordingUpstream, case: str
) -> None:
    """The catalogue runs against the `early` upstream (the one that was exploited); these against one
    that reads the whole body before answering."""
    await refused_then_a_victim(fgw, key, recorder, REFUSED[case])


@pytest.mark.parametrize("recorder", ["normal", "early"], indirect=True)
async def test_a_victim_on_a_warm_pooled_connection_is_not_read_as_an_attackers_body(
    fgw: Gateway, key: str, recorder: RecordingUpstream
) -> None:
    """The reported case in its original shape: the pool holds one live connection (a warm-up request),
    the attacker's CL near 2^64 goes first, the victim's keyed request follows at once."""
    async with client(fgw) as warm:
        await warm.send(raw_request("GET", "/public/warm", [f"{TEST_ID}: warm"]))
        assert_upstream_answer(await attempt(warm.answer()), "warm")
    async with client(fgw) as attacker, client(fgw) as victim:
        await attacker.send(
            raw_request("POST", "/public/upload", [f"{TEST_ID}: attacker", f"Content-Length: {2**64 - 1}"])
        )
        await asyncio.sleep(0.05)
        await victim.send(
            raw_request(
                "POST",
                "/api/victim",
                [f"{TEST_ID}: victim", f"Authorization: Bearer {key}", "Content-Length: 2"],
                b"hi",
            )
        )
        victims = await attempt(victim.answer())
        refused = await attempt(attacker.answer())
        await recorder.settle(done=gateway_idle(fgw))
    upstream_saw_exactly(
        recorder, [Sent("warm", "GET", "/public/warm"), Sent("victim", "POST", "/api/victim", b"hi")], secrets=[key]
    )
    assert_refused(refused)
    assert_upstream_answer(victims, "victim")


# --- 3. pipelines ------------------------------------------------------------------------------------------

PIPELINE_BREAKERS = [
    "cl-2^64",
    "cl-2^64+5-wraps-to-5",
    "cl-plus",
    "cl-duplicate-equal",
    "te-then-cl",
    "te-gzip-chunked",
    "te-obs-fold-line",
    "chunk-size-overflow",
    "chunk-bare-lf",
    "bare-lf-one-header-line",
    "obs-fold",
    "nul-in-value",
    "cr-in-value",
]


@pytest.mark.parametrize("recorder", ["normal", "early"], indirect=True)
@pytest.mark.parametrize("case", PIPELINE_BREAKERS, ids=PIPELINE_BREAKERS)
async def test_a_pipeline_is_answered_in_order_up_to_the_refused_request_and_nothing_after_it_is_forwarded(
    fgw: Gateway, key: str, recorder: RecordingUpstream, case: str
) -> None:
    before = [
        (raw_request("POST", "/public/a", [f"{TEST_ID}: a", f"Content-Length: {len(SMUGGLED)}"], SMUGGLED),
         Sent("a", "POST", "/public/a", SMUGGLED)),
        (raw_request("GET", "/api/b", [f"{TEST_ID}: b", f"Authorization: Bearer {key}"]), Sent("b", "GET", "/api/b")),
        (raw_request("PUT", "/public/c", [f"{TEST_ID}: c", "Transfer-Encoding: chunked"], chunked(BODY, [3, 1000])),
         Sent("c", "PUT", "/public/c", BODY)),
        # Refused by the gateway, not by the parser: its body is read and dropped, the pipeline goes on.
        (raw_request("POST", "/api/no-key", [f"{TEST_ID}: no-key", f"Content-Length: {len(SMUGGLED)}"], SMUGGLED),
         None),
    ]  # fmt: skip
    after = raw_request("GET", "/public/d", [f"{TEST_ID}: d"]) + raw_request(
        "POST", "/public/e", [f"{TEST_ID}: e", "Content-Length: 3"], b"eee"
    )
    async with client(fgw) as c:
        await c.send(b"".join(wire for wire, _ in before) + REFUSED[case].wire + after)
        answers = [await attempt(c.answer()) for _ in before]
        refused = await attempt(c.answer())
        closed = await attempt(c.closed_by_gateway())
        await recorder.settle(done=gateway_idle(fgw))
    # (request a's body is SMUGGLED: the marker reaches the upstream inside it, and only there.)
    upstream_saw_exactly(recorder, [sent for _, sent in before if sent is not None], secrets=[key])
    for answer, (_, sent) in zip(answers, before, strict=True):
        if sent is None:
            assert_refused(answer, 401, "missing_key")
        else:
            assert_upstream_answer(answer, sent.test_id)
        assert isinstance(answer, Answer) and not answer.closes, answer
    assert_refused(refused)
    assert isinstance(refused, Answer) and refused.closes
    assert closed == b""


# --- 4. Expect: 100-continue ---------------------------------------------------------------------------------


@pytest.mark.parametrize("credential", ["none", "unknown-key", "malformed"])
async def test_expect_continue_with_a_bad_key_gets_401_without_100_and_nothing_is_forwarded(
    fgw: Gateway, recorder: RecordingUpstream, credential: str
) -> None:
    auth = {
        "none": [],
        "unknown-key": [f"Authorization: Bearer gw_{MARKER}"],
        "malformed": [f"Authorization: {MARKER}"],
    }
    headers = [f"{TEST_ID}: expect", "Expect: 100-continue", "Content-Length: 100000", *auth[credential]]
    async with client(fgw) as c:
        await c.send(raw_request("POST", "/api/upload", headers))
        answer = await attempt(c.answer())
        # The client may send its body anyway (RFC 9110 10.1.1): it must not reach the upstream either.
        with contextlib.suppress(ConnectionError):
            await c.send(SMUGGLED)
        closed = await attempt(c.closed_by_gateway())
        await recorder.settle(done=gateway_idle(fgw))
    upstream_saw_exactly(recorder, [], secrets=[MARKER])
    assert recorder.raw == b""
    reply = assert_refused(answer, 401, "missing_key" if credential == "none" else
                           "key_not_found" if credential == "unknown-key" else "malformed_key")  # fmt: skip
    assert b"100 Continue" not in c.received
    assert reply.closes and closed == b""


@pytest.mark.parametrize("recorder", ["normal", "early"], indirect=True)
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_expect_continue_with_a_good_key_gets_100_then_the_upstream_reads_exactly_the_body(
    fgw: Gateway, key: str, recorder: RecordingUpstream, framing: str
) -> None:
    body = BODY * 20
    framing_line = f"Content-Length: {len(body)}" if framing == "length" else "Transfer-Encoding: chunked"
    wire_body = body if framing == "length" else chunked(body, [1, 4096, 17])
    headers = [f"{TEST_ID}: expect", "Expect: 100-continue", f"Authorization: Bearer {key}", framing_line]
    async with client(fgw) as c:
        await c.send(raw_request("POST", "/api/upload", headers))
        interim = await attempt(c.answer())
        assert isinstance(interim, Answer) and (interim.status, interim.raw_headers) == (100, []), interim
        await c.send(wire_body)
        final = await attempt(c.answer())
        # and the connection goes on
        await c.send(raw_request("GET", "/public/next", [f"{TEST_ID}: next"]))
        following = await attempt(c.answer())
        await recorder.settle(done=gateway_idle(fgw))
    upstream_saw_exactly(recorder, [Sent("expect", "POST", "/api/upload", body), Sent("next", "GET", "/public/next")],
                         secrets=[key])  # fmt: skip
    assert_upstream_answer(final, "expect")
    assert_upstream_answer(following, "next")


# --- 5. uploads cut short by the gateway: never read whole by the upstream -----------------------------------


async def upstream_has_read(recorder: RecordingUpstream, test_id: str, body_bytes: int) -> None:
    """Until the upstream has read `body_bytes` of the body of the request tagged `test_id`."""
    deadline = time.monotonic() + 10
    while not any(r.test_id == test_id and len(r.body) >= body_bytes for r in recorder.requests):
        assert time.monotonic() < deadline, f"the upstream did not read {body_bytes} bytes of {test_id}'s body"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    "tail",
    [b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n", b"5\nhello\n0\n\n", b"+5\r\nhello\r\n0\r\n\r\n"],
    ids=["chunk-size-overflow", "bare-lf", "plus"],
)
async def test_a_chunked_body_that_breaks_after_it_was_forwarded_is_never_read_whole_upstream(
    fgw: Gateway, key: str, recorder: RecordingUpstream, tail: bytes
) -> None:
    """The head and a first chunk arrive and go on; the framing breaks in a later packet. The upstream
    connection must be given up: the upstream never reads a whole request out of it."""
    recorder.mode = "normal"
    head = raw_request("POST", "/public/stream", [f"{TEST_ID}: cut", "Transfer-Encoding: chunked"], b"3\r\nabc\r\n")
    async with client(fgw) as c:
        await c.send(head)
        await upstream_has_read(recorder, "cut", 3)  # the head and the first chunk are at the upstream
        with contextlib.suppress(ConnectionError):
            await c.send(tail + AFTER)
        answer = await attempt(c.answer())
        await recorder.settle(done=gateway_idle(fgw))
        async with client(fgw) as nxt:
            await nxt.send(raw_request("GET", "/public/next", [f"{TEST_ID}: next"]))
            following = await attempt(nxt.answer())
        await recorder.settle(done=gateway_idle(fgw))
    upstream_saw_exactly(recorder, [Sent("next", "GET", "/public/next")], allow_cut=["cut"])
    cut = [r for r in recorder.requests if r.test_id == "cut"]
    for r in cut:
        assert recorder.connection(r.conn).eof, "the upstream connection of the broken upload was not closed"
    reply = assert_upstream_answer(following, "next")
    assert all(reply.upstream_conn != r.conn for r in cut)
    assert_refused(answer)


async def test_a_chunked_upload_that_grows_past_the_route_limit_is_413_and_never_read_whole_upstream(
    fgw: Gateway, recorder: RecordingUpstream
) -> None:
    recorder.mode = "normal"
    part = b"%x\r\n%s\r\n" % (400, b"p" * 400)  # 4 of them: 1600 bytes on a route that takes 1000
    async with client(fgw) as c:
        await c.send(raw_request("POST", "/small/grow", [f"{TEST_ID}: grow", "Transfer-Encoding: chunked"], part * 2))
        await upstream_has_read(recorder, "grow", 800)  # 800 bytes: under the limit, forwarded
        await c.send(part * 2 + b"0\r\n\r\n")  # the last write: the 413 may close the connection after it
        answer = await attempt(c.answer())
        await recorder.settle(done=gateway_idle(fgw))
    upstream_saw_exactly(recorder, [], allow_cut=["grow"])
    assert_refused(answer, 413, "body_too_large")


# --- 6. responses whose framing is not exact -----------------------------------------------------------------

EVIL = b"EVIL-RESPONSE-BYTES"
INNER = b"HTTP/1.1 200 OK\r\nX-Evil: smuggled\r\nContent-Length: %d\r\n\r\n%s" % (len(EVIL), EVIL)


def response(*headers: str | bytes, body: bytes = EVIL + INNER, eol: bytes = b"\r\n") -> bytes:
    lines = [b"HTTP/1.1 200 OK", b"X-Evil: 1", b"Content-Type: text/plain"]
    lines += [h if isinstance(h, bytes) else h.encode("latin-1") for h in headers]
    return eol.join(lines) + eol + eol + body


def resp_cl(value: str | bytes) -> bytes:
    return response(b"Content-Length: " + (value if isinstance(value, bytes) else value.encode("latin-1")))


def resp_te(*values: str, body: bytes = chunked(EVIL) + INNER) -> bytes:
    return response(*(f"Transfer-Encoding: {v}" for v in values), body=body)


BAD_RESPONSES: dict[str, bytes] = {
    "cl-plus": resp_cl("+19"),
    "cl-minus": resp_cl("-1"),
    "cl-leading-zero": resp_cl("019"),
    "cl-hex": resp_cl("0x13"),
    "cl-inner-space": resp_cl("1 9"),
    "cl-list": resp_cl("19, 19"),
    "cl-decimal-point": resp_cl("19.0"),
    "cl-empty": resp_cl(""),
    "cl-2^64-1": resp_cl(str(2**64 - 1)),
    "cl-2^64": resp_cl(str(2**64)),
    "cl-2^64+19-wraps-to-19": resp_cl(str(2**64 + 19)),
    "cl-2^53+1": resp_cl(str(2**53 + 1)),
    "cl-twenty-nines": resp_cl("9" * 20),
    "cl-duplicate-equal": response("Content-Length: 19", "Content-Length: 19"),
    "cl-duplicate-different": response("Content-Length: 19", "Content-Length: 80"),
    "cl-then-te": response("Content-Length: 19", "Transfer-Encoding: chunked", body=chunked(EVIL) + INNER),
    "te-then-cl": response("Transfer-Encoding: chunked", "Content-Length: 19", body=chunked(EVIL) + INNER),
    "te-gzip-chunked": resp_te("gzip, chunked"),
    "te-chunked-gzip": resp_te("chunked, gzip"),
    "te-two-fields": resp_te("chunked", "chunked"),
    "te-identity": resp_te("identity"),
    "te-xchunked": resp_te("xchunked"),
    "te-chunked-vertical-tab": resp_te("chunked\x0b"),
    "bare-lf-head": response("Content-Length: 19", eol=b"\n"),
    "bare-lf-one-line": response(b"Content-Length: 19\nX-Other: 1"),
    "chunk-size-overflow": resp_te("chunked", body=b"ffffffffffffffffff\r\n" + EVIL + b"\r\n0\r\n\r\n" + INNER),
    "chunk-size-2^64+19-wraps-to-19": resp_te(
        "chunked", body=b"10000000000000013\r\n" + EVIL + b"\r\n0\r\n\r\n" + INNER
    ),
    "chunk-bare-lf": resp_te("chunked", body=b"13\n" + EVIL + b"\n0\n\n" + INNER),
}


@pytest.mark.parametrize("recorder", ["normal"], indirect=True)
@pytest.mark.parametrize("case", list(BAD_RESPONSES), ids=list(BAD_RESPONSES))
async def test_a_response_whose_framing_is_not_exact_is_502_and_its_connection_is_never_reused(
    fgw: Gateway, recorder: RecordingUpstream, case: str
) -> None:
    recorder.scripts["/public/bad"] = BAD_RESPONSES[case]
    async with client(fgw) as c:
        # A warm connection in the pool: the bad answer comes on a reused one.
        await c.send(raw_request("GET", "/public/warm", [f"{TEST_ID}: warm"]))
        warm = await attempt(c.answer())
        await c.send(raw_request("GET", "/public/bad", [f"{TEST_ID}: bad"]))
        answer = await attempt(c.answer())
        await asyncio.sleep(0.05)
        leaked = bytes(c.received)
    bad_conns = {r.conn for r in recorder.requests if r.test_id == "bad"}
    for conn in bad_conns:
        await recorder.wait_eof(conn)
    async with client(fgw) as c:
        await c.send(raw_request("GET", "/public/next", [f"{TEST_ID}: next"]))
        following = await attempt(c.answer())
        await recorder.settle(done=gateway_idle(fgw))
    assert not recorder.errors, recorder.errors
    assert_upstream_answer(warm, "warm")
    assert b"EVIL" not in leaked and b"X-Evil" not in leaked, leaked
    assert_refused(answer, 502, "upstream_unavailable")
    reply = assert_upstream_answer(following, "next")
    assert bad_conns and reply.upstream_conn not in bad_conns, (reply.upstream_conn, bad_conns)


@pytest.mark.parametrize("recorder", ["normal"], indirect=True)
async def test_a_good_response_keeps_its_connection_for_the_next_request(
    fgw: Gateway, recorder: RecordingUpstream
) -> None:
    """The other half of the reuse rule, so the test above cannot pass by never reusing anything."""
    recorder.scripts["/public/good"] = b"HTTP/1.1 200 OK\r\nX-Good: 1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
        b"fine", [2]
    )
    async with client(fgw) as c:
        await c.send(raw_request("GET", "/public/warm", [f"{TEST_ID}: warm"]))
        warm = await attempt(c.answer())
        await c.send(raw_request("GET", "/public/good", [f"{TEST_ID}: good"]))
        good = await attempt(c.answer())
        await c.send(raw_request("GET", "/public/next", [f"{TEST_ID}: next"]))
        following = await attempt(c.answer())
        await recorder.settle(done=gateway_idle(fgw))
    first = assert_upstream_answer(warm, "warm")
    assert isinstance(good, Answer) and (good.status, good.body) == (200, b"fine"), good
    reply = assert_upstream_answer(following, "next")
    assert reply.upstream_conn == first.upstream_conn
    upstream_saw_exactly(
        recorder,
        [Sent("warm", "GET", "/public/warm"), Sent("good", "GET", "/public/good"), Sent("next", "GET", "/public/next")],
    )
