"""A key decision is fresh only until the request's first byte goes upstream (spec 8).

A request that passed its key check and then waits for a new upstream connection must not be
forwarded if the key was disabled meanwhile: the disable's answer may come before the connection
does. The proxy takes the decision again once the connection is open (gateway/proxy.py,
`_fresh_decision`). The wait is made long by holding the pool's connect (a real upstream, a real
Redis and a real disable through the admin API around it).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.h1 import client as upstream
from tests.conftest import Gateway


async def _held_connect(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    connecting, release = asyncio.Event(), asyncio.Event()
    real = upstream._Pool.connect

    async def held(self: Any, loop: asyncio.AbstractEventLoop, seconds: float) -> Any:
        connecting.set()
        await release.wait()
        return await real(self, loop, seconds)

    monkeypatch.setattr(upstream._Pool, "connect", held)
    return connecting, release


async def _cached_key(gw: Gateway, name: str) -> dict[str, Any]:
    created = await gw.create_key(name=name, owner="acme")
    async with await gw.call("GET", "/api/warm", key=created["key"]) as r:
        assert r.status == 200  # looked up, cached, and its upstream connection pooled
    await gw.replica.proxy.forwarder.close()  # no pooled connection: the next request must open one
    return created


async def test_a_key_disabled_while_its_request_waits_for_a_connection_is_refused_not_forwarded(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await _cached_key(gw, "held-connect")
    connecting, release = await _held_connect(monkeypatch)
    request = asyncio.ensure_future(gw.call("GET", "/api/after-disable", key=created["key"]))
    await asyncio.wait_for(connecting.wait(), 5)  # the key passed (from the cache); the connect is held
    async with await gw.admin_call(
        "POST", f"/v1/keys/{created['id']}/disable", token="developer", json={"reason": "test"}
    ) as r:
        assert r.status == 200
        assert (await r.json())["propagation"]["confirmed"] == 1
    release.set()
    async with await request as answer:
        body = await answer.json()
        # The gateway's own refusal: the echo upstream would have answered 200 with the path.
        assert (answer.status, body["error"]["code"]) == (403, "key_disabled")


async def test_a_request_held_at_connect_with_nothing_changed_is_forwarded(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await _cached_key(gw, "held-unchanged")
    connecting, release = await _held_connect(monkeypatch)
    request = asyncio.ensure_future(gw.call("GET", "/api/held", key=created["key"]))
    await asyncio.wait_for(connecting.wait(), 5)
    await asyncio.sleep(0.1)  # older than the freshness bound: the decision is taken again, and still passes
    release.set()
    async with await request as answer:
        assert answer.status == 200
        assert (await answer.json())["path"] == "/api/held"
