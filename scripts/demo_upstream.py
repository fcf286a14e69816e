"""The demo upstream for `make run`: answers every request with what it received, as JSON."""

from __future__ import annotations

import argparse

from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "upstream": "demo",
            "method": request.method,
            "path": request.raw_path,
            "key_id": request.headers.get("X-Gateway-Key-Id"),
            "key_owner": request.headers.get("X-Gateway-Key-Owner"),
            "request_id": request.headers.get("X-Request-Id"),
            "body_bytes": len(body),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
