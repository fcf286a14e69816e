"""`gateway keys usage ID` and `gateway keys list --unused-since`, against a real gateway and Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway.cli.main import main
from gateway.cli.usage import usage_chart
from tests.conftest import AdminTokens, Gateway
from tests.test_cli import on


async def test_keys_usage_charts_and_json(
    gateway_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, admin_tokens: AdminTokens,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", admin_tokens.viewer)
    gw: Gateway = await gateway_factory(**{"usage.flush_seconds": 300})
    key = await gw.create_key(name="u")
    idle = await gw.create_key(name="idle")
    for path, n in (("/api/a", 6), ("/billing/x", 2)):
        for _ in range(n):
            async with await gw.call("GET", path, key=key["key"]) as r:
                await r.read()
    await gw.replica.usage.flush()  # type: ignore[union-attr]

    run = await on(gw, capsys, "keys", "usage", key["id"], "--window", "1h")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0] == f"{key['id']}: usage over 1h (UTC; # passed, x refused)"
    bars = [line for line in lines if "|" in line]
    assert len(bars) == 12  # one row per 5 minutes
    busy = [line for line in bars if line.rstrip().endswith(" 8")]
    assert len(busy) == 1 and "#" * 30 + "x" * 10 in busy[0]  # 6 passed, 2 refused: 30 + 10 of 40 columns
    assert "requests: 8 (forwarded 6, insufficient_permissions 2)" in run.out
    assert "distinct client addresses: 1" in run.out
    assert "from 127.0.0.1 on route billing" in run.out

    run = await on(gw, capsys, "keys", "usage", key["id"], "--json")
    data = run.json()
    assert (data["window"], data["totals"]["requests"], len(data["buckets"])) == ("24h", 8, 24)

    run = await on(gw, capsys, "keys", "list", "--unused-since", "30d", "--json")
    assert [k["id"] for k in run.json()["keys"]] == [idle["id"]]
    run = await on(gw, capsys, "keys", "list", "--unused-since", "30d")
    assert idle["id"] in run.out and key["id"] not in run.out

    run = await on(gw, capsys, "keys", "show", key["id"])
    assert "last_used_ip:" in run.out and "127.0.0.1" in run.out


def test_bad_usage_flags_are_exit_2() -> None:
    for argv in (["keys", "usage", "key_" + "0" * 20, "--window", "2h"], ["keys", "list", "--unused-since", "soon"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv


def test_chart_of_an_unused_key() -> None:
    now = time.time()
    data = {"key_id": "key_x", "window": "24h", "bucket_seconds": 3600, "totals": {"requests": 0, "outcomes": {}},
            "distinct_addresses": 0, "last_used_at": None, "flush_seconds": 10.0,
            "buckets": [{"start": time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(now - 3600 * i)), "requests": 0,
                         "outcomes": {}} for i in range(24)]}  # fmt: skip
    text = usage_chart(data)
    assert "last used: never" in text and "requests: 0" in text
    assert len([line for line in text.splitlines() if "|" in line]) == 24
