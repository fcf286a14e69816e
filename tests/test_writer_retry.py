"""A change whose reply is lost is not sent again (spec 7, 13).

The admin's writer (gateway/runtime/connect.py, `writer_client`) runs each change as one script.
When the connection breaks after the script went out, the client cannot know whether Redis ran
it; sending it again can apply it twice (a `credits.add` added twice, a create answered 409 for
the key it wrote itself). The answer must be 503 `store_unavailable`, the change applied at most
once, and the operator decides whether to retry. Real redis-server, with a relay in front of it
that forwards the change's script and closes the client's connection instead of its reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import AdminTokens, RedisProcess, free_port
from tests.relays import LoopThread, Relay
from tests.test_replicas import Node, gateway_config, start_gateway, stop_gateway, wait_ready


class ReplyEater(Relay):
    """A relay to Redis: the first request holding `marker` reaches Redis, but its reply is never
    delivered: the client's connection is closed instead. Everything else passes."""

    def __init__(self, redis_port: int, marker: bytes) -> None:
        super().__init__(redis_port)
        self.marker = marker
        self.eaten = 0
        self.sent = 0  # requests holding the marker that reached Redis

    async def up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: dict[str, object]) -> None:
        eat = link.setdefault("eat", asyncio.Event())
        assert isinstance(eat, asyncio.Event)
        seen = b""
        while data := await r.read(65536):
            seen = (seen + data)[-len(self.marker) - 65536 :]
            if self.marker in seen:
                self.sent += 1
                seen = b""
                if self.eaten == 0:
                    self.eaten += 1
                    eat.set()
            w.write(data)
            await w.drain()

    async def down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: dict[str, object]) -> None:
        eat = link.setdefault("eat", asyncio.Event())
        assert isinstance(eat, asyncio.Event)
        while data := await r.read(65536):
            if eat.is_set():
                await asyncio.sleep(0.2)  # Redis has run it by now
                return  # the reply is dropped with the connection
            w.write(data)
            await w.drain()


@contextlib.contextmanager
def eating(redis_server: RedisProcess, marker: bytes) -> Iterator[ReplyEater]:
    """The relay, on an event loop of its own in a thread (the gateway is another process)."""
    relay = ReplyEater(redis_server.port, marker)
    background = LoopThread("reply-eater")
    try:
        background.run(relay.start(), 5)
        yield relay
    finally:
        with contextlib.suppress(Exception):
            background.run(relay.close(), 5)
        background.stop()


@contextlib.contextmanager
def gateway(tmp_path: Path, admin_tokens: AdminTokens, redis_url: str, acked: int) -> Iterator[Node]:
    raw = gateway_config("http://127.0.0.1:9", admin_tokens, redis_url, f"lost{secrets.token_hex(4)}:")
    if acked:  # the admin's writer (one connection, then WAIT) instead of the command client
        raw["redis"]["min_replicas_acked"] = acked
    node = start_gateway(tmp_path, f"lost{acked}", raw, admin_tokens)
    try:
        wait_ready(node)
        yield node
    finally:
        stop_gateway(node)


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server with one replica of its own (WAIT 1 is answered), for this module."""
    base = tmp_path_factory.mktemp("lost")
    primary = RedisProcess(free_port(), base / "master")
    primary.start()
    replica = RedisProcess(free_port(), base / "replica", extra=["--replicaof", "127.0.0.1", str(primary.port)])
    replica.start()
    try:
        deadline = time.monotonic() + 10
        with redis.Redis(port=primary.port) as client:
            while (client.info("replication").get("slave0") or {}).get("state") != "online":
                assert time.monotonic() < deadline, "the replica did not connect"
                time.sleep(0.05)
        yield primary
    finally:
        replica.kill()
        primary.kill()


WRITERS = pytest.mark.parametrize("acked", [0, 1], ids=["command client", "writer with WAIT"])


@WRITERS
def test_a_credits_add_whose_reply_is_lost_is_applied_once_and_answered_503(
    tmp_path: Path, admin_tokens: AdminTokens, master: RedisProcess, acked: int
) -> None:
    marker = "lost-reply-" + secrets.token_hex(4)
    with eating(master, marker.encode()) as relay, gateway(tmp_path, admin_tokens, relay.url, acked) as node:
        status, created = node.admin("POST", "/v1/keys", {"name": "credited", "credits": {"remaining": 100}})
        assert status == 201, created
        status, _ = node.admin("PATCH", f"/v1/keys/{created['id']}", {"credits": {"add": 1}})
        assert status == 200  # the scripts are loaded: the marker is in the change's own call
        status, body = node.admin("PATCH", f"/v1/keys/{created['id']}", {"name": marker, "credits": {"add": 10}})
        assert relay.eaten == 1 and relay.sent == 1, (relay.eaten, relay.sent)  # out once, its reply lost
        assert (status, body["error"]["code"]) == (503, "store_unavailable"), body
        # Redis ran it once, and it was not sent again (that would make 121, and a 200).
        status, shown = node.admin("GET", f"/v1/keys/{created['id']}")
        assert shown["credits"]["remaining"] == 111, shown


@WRITERS
def test_a_create_whose_reply_is_lost_is_answered_503_not_409_for_its_own_write(
    tmp_path: Path, admin_tokens: AdminTokens, master: RedisProcess, acked: int
) -> None:
    marker = "lost-create-" + secrets.token_hex(4)
    with eating(master, marker.encode()) as relay, gateway(tmp_path, admin_tokens, relay.url, acked) as node:
        assert node.admin("POST", "/v1/keys", {"name": "first"})[0] == 201  # the scripts are loaded
        status, body = node.admin("POST", "/v1/keys", {"name": marker})
        assert relay.eaten == 1 and relay.sent == 1, (relay.eaten, relay.sent)
        assert (status, body["error"]["code"]) == (503, "store_unavailable"), body
        # The key was written once (Redis ran the script): listed, once.
        status, listed = node.admin("GET", "/v1/keys?limit=100")
        assert [k["name"] for k in listed["keys"]].count(marker) == 1
