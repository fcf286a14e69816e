"""`make run`'s demo, run the way an operator would, checked step by step.

The demo listens on fixed ports (8080, 8081, 9000), as `make run` does: the test holds a lock file
while it runs, so two runs of it at once (on two xdist workers, or in two test runs on one machine)
take turns instead of one of them skipping.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _demo_module() -> ModuleType:
    """scripts/demo.py itself, so the test checks ports exactly as `make run` does."""
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_ports() -> Iterator[None]:
    """The demo's ports, held by this test run until the test ends (waits for another run's demo)."""
    with open(Path(tempfile.gettempdir()) / "gateway-demo-ports.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.mark.slow
def test_the_demo_shows_200_401_disable_and_403_on_the_shipped_config(tmp_path: Path, demo_ports: None) -> None:
    demo = _demo_module()
    busy = [p for p in (demo.PROXY, demo.ADMIN, demo.UPSTREAM) if not demo.port_free(p)]
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
        "ok  console sign-in page: 200 ",
    ]
