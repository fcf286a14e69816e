"""The console's key page shows a key's rate limits and its credit balance (spec 11, 12)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import Gateway
from tests.test_console import browsers, signed_in
from tests.test_ratelimit import until_clear_of_window_end

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


async def test_a_developer_sets_limits_and_credits_in_a_form_in_force_at_once(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="form")
    b = await signed_in(browsers, gw.tokens.developer)
    code, page, _ = await b.get(f"/keys/{key['id']}")
    assert code == 200 and 'id="limits"' in page
    code, page, _ = await b.get(f"/keys/{key['id']}/limits")
    assert code == 200 and 'name="limits"' in page
    form = {"limits": "burst=2/60s, 1000/1h", "credits_action": "set", "credits_amount": "3", "refill": "5/1d"}
    code, page, r = await b.post(f"/keys/{key['id']}/limits", form)
    assert code == 303, page
    code, page, _ = await b.get(r.headers["Location"])
    assert 'id="result-action">updated<' in page and '<span id="confirmed">1</span>' in page
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}", token="viewer") as r:
        record = await r.json()
    assert [(x["name"], x["limit"], x["window_seconds"]) for x in record["ratelimits"]] == [
        ("burst", 2, 60),
        ("limit2", 1000, 3600),
    ]
    assert record["credits"] == {"remaining": 3, "refill": {"amount": 5, "interval": 86400}}
    statuses = []
    await asyncio.sleep(until_clear_of_window_end(60, 2))  # the three requests in one minute window
    for _ in range(3):
        async with await gw.call("GET", "/api/form", key=key["key"]) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 429]  # the burst limit, in force on the next request
    # Remove the limits and the credits again.
    code, _, _ = await b.post(f"/keys/{key['id']}/limits", {"limits": "", "credits_action": "remove"})
    assert code == 303
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}", token="viewer") as r:
        record = await r.json()
    assert record["ratelimits"] == [] and record["credits"] is None


async def test_a_bad_limits_form_is_refused_and_changes_nothing(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="bad-form")
    b = await signed_in(browsers, gw.tokens.developer)
    await b.get(f"/keys/{key['id']}/limits")
    for form in ({"limits": "lots/60s"}, {"limits": "", "credits_action": "set", "credits_amount": "x"},
                 {"limits": "", "credits_action": "steal"}):  # fmt: skip
        code, page, _ = await b.post(f"/keys/{key['id']}/limits", form)
        assert code == 400 and "invalid_request" in page, (form, code)
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}", token="viewer") as r:
        record = await r.json()
    assert record["ratelimits"] == [] and record["credits"] is None


async def test_a_viewer_has_no_limits_form_and_a_forged_post_is_refused(gw: Gateway, browsers: Any) -> None:
    key = await gw.create_key(name="viewer-form")
    b = await signed_in(browsers, gw.tokens.viewer)
    code, page, _ = await b.get(f"/keys/{key['id']}")
    assert 'id="limits"' not in page
    code, _, _ = await b.post(f"/keys/{key['id']}/limits", {"limits": "1/60s"})
    assert code == 403
    async with await gw.admin_call("GET", f"/v1/keys/{key['id']}", token="viewer") as r:
        assert (await r.json())["ratelimits"] == []
