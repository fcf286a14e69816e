"""GET /v1/status and the console's status page (spec 7, 11): one report, from the same action."""

from __future__ import annotations

from typing import Any

from tests.conftest import Gateway
from tests.test_console import browsers, signed_in

__all__ = ["browsers"]  # the console tests' fixture: signed-in clients of the admin listener


async def status(gw: Gateway, token: str | None = "viewer") -> tuple[int, Any]:
    async with await gw.admin_call("GET", "/v1/status", token=token) as r:
        return r.status, await r.json()


async def test_the_status_shows_this_replica_the_live_set_redis_and_the_latest_propagations(gw: Gateway) -> None:
    code, before = await status(gw)
    assert code == 200, before
    assert before["propagation"] == {"changes": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "fenced": 0}
    key = await gw.create_key(name="status")
    async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/disable", json={"reason": "s"}) as r:
        assert r.status == 200
        disabled = await r.json()
    code, after = await status(gw)
    assert code == 200
    replica = after["replica"]
    assert replica["id"] == gw.replica.replica_id and replica["coherent"] is True
    assert 0 < replica["lease_remaining_ms"] <= gw.replica.config.redis.lease_seconds * 1000
    assert [r["id"] for r in after["live_replicas"] if r["self"]] == [gw.replica.replica_id]
    assert after["redis"]["role"] == "master" and after["redis"]["persistence"] in ("aof", "off", "unknown")
    figures = after["propagation"]
    assert figures["changes"] == 2 and figures["fenced"] == 0  # the create and the disable
    assert figures["max_ms"] >= disabled["propagation"]["ms"] - 0.001
    assert 0 <= figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]


async def test_the_status_needs_a_token(gw: Gateway) -> None:
    code, body = await status(gw, token=None)
    assert code == 401 and body["error"]["code"] == "missing_token"


async def test_the_console_status_page_shows_the_same_propagation_figures(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="status-page")
    async with await gw.admin_call("POST", f"/v1/keys/{key['id']}/disable", json={}) as r:
        assert r.status == 200
    _, report = await status(gw)
    b = await signed_in(browsers, gw.tokens.viewer)
    code, page, _ = await b.get("/status")
    assert code == 200
    figures = report["propagation"]
    assert f"The last {figures['changes']} change(s)" in page
    assert f"{figures['p50_ms']} ms at the median" in page
    assert gw.replica.replica_id in page
