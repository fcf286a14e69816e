"""`make run`: the gateway on config/gateway.yaml with embedded Redis and a demo upstream.

Prints the operator console's URL, a fresh demo admin token, a freshly created demo key and the curl lines
that show 200, 401 missing_key, disable, and 403 key_disabled. With --check it
runs those steps itself and exits 0 when every answer is the expected one.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "gateway.yaml"
PROXY, ADMIN, UPSTREAM = 8080, 8081, 9000


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def http(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback http only
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_ready(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if http("GET", url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"demo: the gateway did not become ready at {url}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="run the demo steps and exit 0 if all pass")
    args = parser.parse_args()

    busy = [p for p in (PROXY, ADMIN, UPSTREAM) if not port_free(p)]
    if busy:
        print(f"demo: port(s) {busy} on 127.0.0.1 are in use; stop what uses them and retry", file=sys.stderr)
        return 2

    sys.path.insert(0, str(ROOT))
    from gateway.admin.auth import hash_token

    token = "gwadm_demo_" + secrets.token_urlsafe(24)
    env = dict(os.environ)
    env["GATEWAY_ADMIN_TOKENS"] = json.dumps([{"name": "demo-admin", "role": "admin", "hash": hash_token(token)}])
    children = [
        subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo_upstream.py"), "--port", str(UPSTREAM)]),
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(CONFIG), "--log-format", "text"],
            env=env,
            cwd=ROOT,
        ),
    ]
    try:
        wait_ready(f"http://127.0.0.1:{ADMIN}/readyz")
        status, created = http(
            "POST", f"http://127.0.0.1:{ADMIN}/v1/keys", token, {"name": "demo key", "owner": "demo-user"}
        )
        if status != 201:
            print(f"demo: creating the demo key failed: {status} {created}", file=sys.stderr)
            return 1
        key, key_id = created["key"], created["id"]
        proxy, admin = f"http://127.0.0.1:{PROXY}", f"http://127.0.0.1:{ADMIN}"
        if args.check:
            return check(proxy, admin, token, key, key_id)
        print(
            f"""
gateway is running: proxy {proxy}, admin {admin}, embedded Redis in ./.gateway-data
operator console:              {admin}/  (sign in with the demo admin token)
demo admin token (role admin): {token}
demo API key (id {key_id}):    {key}

  # 200: forwarded to the demo upstream, which sees X-Gateway-Key-Id
  curl -i -H "Authorization: Bearer {key}" {proxy}/demo/hello
  # 401 missing_key
  curl -i {proxy}/demo/hello
  # disable the key (answers once the cache has dropped it)
  curl -i -X POST -H "Authorization: Bearer {token}" -H "Content-Type: application/json" \\
       -d '{{"reason": "demo"}}' {admin}/v1/keys/{key_id}/disable
  # 403 key_disabled
  curl -i -H "Authorization: Bearer {key}" {proxy}/demo/hello

Ctrl-C stops the gateway, its Redis and the demo upstream.""",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()


def check(proxy: str, admin: str, token: str, key: str, key_id: str) -> int:
    steps = [
        ("forwarded with the key", http("GET", f"{proxy}/demo/hello", key), 200, None),
        ("no key", http("GET", f"{proxy}/demo/hello"), 401, "missing_key"),
        ("disable", http("POST", f"{admin}/v1/keys/{key_id}/disable", token, {"reason": "demo"}), 200, None),
        ("disabled key", http("GET", f"{proxy}/demo/hello", key), 403, "key_disabled"),
    ]
    with urllib.request.urlopen(f"{admin}/sign-in", timeout=5) as page:  # noqa: S310 - loopback http only
        console = (page.status, {} if b'name="token"' in page.read() else {"error": {"code": "no sign-in form"}})
    steps.append(("console sign-in page", console, 200, None))
    failed = 0
    for name, (status, body), want_status, want_code in steps:
        code = body.get("error", {}).get("code")
        ok = status == want_status and (want_code is None or code == want_code)
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}: {status} {code or ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
