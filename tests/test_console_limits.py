"""The console's key page shows a key's rate limits and its credit balance (spec 11, 12)."""

from __future__ import annotations

from typing import Any

from tests.conftest import Gateway
from tests.test_console import browsers, signed_in

__all__ = ["browsers"]  # the console tests' fixture


async def test_the_key_page_shows_limits_and_the_credit_balance(gw: Gateway, browsers: Any) -> None:
    body = {
        "name": "limited",
        "ratelimits": [{"name": "per-minute", "limit": 100, "window_seconds": 60}],
        "credits": {"remaining": 5, "refill": {"amount": 10, "interval": 3600}},
    }
    async with await gw.admin_call("POST", "/v1/keys", token="developer", json=body) as r:
        assert r.status == 201, await r.text()
        key = await r.json()
    async with await gw.call("GET", "/api/spend", key=key["key"]) as r:
        assert r.status == 200  # one credit spent
    b = await signed_in(browsers, gw.tokens.viewer)
    code, page, _ = await b.get(f"/keys/{key['id']}")
    assert code == 200
    assert "<code>per-minute</code> 100 per 60 s" in page
    assert '<dd id="credits">4 left, refilled to 10 every 3600 s</dd>' in page
