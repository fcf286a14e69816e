"""`make run`'s demo, run the way an operator would, checked step by step."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.slow
def test_the_demo_shows_200_401_disable_and_403_on_the_shipped_config(tmp_path: Path) -> None:
    busy = [p for p in (8080, 8081, 9000) if _busy(p)]
    if busy:
        pytest.skip(f"the demo needs ports 8080, 8081 and 9000; in use: {busy}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        env={"GATEWAY_REDIS_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "ok  forwarded with the key: 200 ",
        "ok  no key: 401 missing_key",
        "ok  disable: 200 ",
        "ok  disabled key: 403 key_disabled",
    ]
