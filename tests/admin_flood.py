"""A flood of wrong admin tokens, from its own process (so the flood's client work does not share
the gateway's event loop): `python -m tests.admin_flood URL COUNT ADDRESS...`.

Sends COUNT requests at once, spread over the source ADDRESSes, each with a wrong token of one of
four kinds: an unknown id, no gateway shape at all, a wrong secret for the configured id `other1`,
and junk. Prints `sent` once every request is under way, then one JSON line {status: count}.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections import Counter

import aiohttp
import orjson


def wrong(i: int) -> str:
    kind = i % 6
    if kind in (0, 1):
        return f"gwadm_unknown{i % 7}_" + secrets.token_urlsafe(32)
    if kind == 2:
        return "garbage-" + secrets.token_urlsafe(24)
    if kind == 3:
        return "gwadm_other1_" + secrets.token_urlsafe(32)
    return "x" * (i % 900 + 1)


async def main(url: str, count: int, addresses: list[str]) -> None:
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(a, 0), limit=0, force_close=True))
        for a in addresses
    ]

    async def one(i: int) -> int:
        session = sessions[i % len(sessions)]
        async with session.get(url, headers={"Authorization": f"Bearer {wrong(i)}"}) as r:
            await r.read()
            return r.status

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    await asyncio.sleep(0)
    print("sent", flush=True)
    statuses = Counter(await asyncio.gather(*tasks))
    for session in sessions:
        await session.close()
    print(orjson.dumps({str(k): v for k, v in statuses.items()}).decode(), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
