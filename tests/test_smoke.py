from tests.conftest import Gateway


async def test_a_created_key_is_forwarded_and_a_missing_key_is_refused(gw: Gateway) -> None:
    created = await gw.create_key(name="smoke", owner="acme")
    async with await gw.call("GET", "/api/hello", key=created["key"]) as r:
        assert r.status == 200
        echo = await r.json()
    headers = dict(echo["headers"])
    assert headers["X-Gateway-Key-Id"] == created["id"]
    assert "Authorization" not in headers
    async with await gw.call("GET", "/api/hello") as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "missing_key"
