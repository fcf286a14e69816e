"""The admin API's OpenAPI document (GET /v1/openapi.json) is true: it names exactly the admin
application's routes, and Schemathesis, fuzzing a real gateway against it, finds no 5xx and no
answer outside the document (every 4xx is the spec 5 body its `Error` schema describes exactly).

Schemathesis lives in .venv-schemathesis/ (scripts/ensure-schemathesis.sh, run by `make test`):
it needs newer pytest and hypothesis than the lowest versions the suite also runs on.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.admin.openapi import document
from gateway.errors import KINDS
from tests.conftest import Gateway

ROOT = Path(__file__).resolve().parent.parent
SCHEMATHESIS = ROOT / ".venv-schemathesis" / "bin" / "schemathesis"
METHODS = {"get", "post", "put", "patch", "delete"}


def routes_of(gw: Gateway) -> set[tuple[str, str]]:
    """(METHOD, path) of every admin route but the console's pages and static files."""
    out = set()
    for route in gw.replica.admin_app.router.routes():
        name = route.name or ""
        if name.startswith("console.") or route.method in ("HEAD", "*"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        assert path, route
        out.add((route.method, path))
    return out


async def test_the_document_names_every_admin_route_and_no_other(gw: Gateway) -> None:
    documented = {
        (method.upper(), path) for path, item in document()["paths"].items() for method in item if method in METHODS
    }
    assert documented == routes_of(gw), "document new admin endpoints in gateway/admin/openapi.py"


async def test_it_is_served_without_a_token(gw: Gateway) -> None:
    async with await gw.admin_call("GET", "/v1/openapi.json", token=None) as r:
        assert r.status == 200 and r.content_type == "application/json"
        body = await r.json()
    assert body == document()
    assert body["openapi"] == "3.1.0"
    assert body["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    # Every code the gateway may answer is in the error schema's enum.
    assert set(body["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]) == set(
        KINDS
    )
    # Each authenticated operation documents its errors with the Error schema.
    for path, item in body["paths"].items():
        for method, op in item.items():
            for status in ("400", "401", "403", "429", "503") if op.get("security") != [] else ("405",):
                assert op["responses"][status]["$ref"].startswith("#/components/responses/E"), (method, path)


@pytest.mark.slow
@pytest.mark.skipif(
    not SCHEMATHESIS.exists(),
    reason="Schemathesis is not installed: bash scripts/ensure-schemathesis.sh (make test runs it)",
)
async def test_schemathesis_finds_no_5xx_and_no_undocumented_answer(gw: Gateway, tmp_path: Path) -> None:
    for i in range(3):  # something to read, disable and rotate besides the generated ids
        await gw.create_key(name=f"fuzz-{i}", owner="fuzz")
    args: list[Any] = [
        str(SCHEMATHESIS), "run", gw.admin_url + "/v1/openapi.json",
        "--header", f"Authorization: Bearer {gw.tokens.admin}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,negative_data_rejection",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", os.environ.get("ST_EXAMPLES", "60"),
        "--workers", "1",
        "--exclude-path", "/v1/keys/import",  # NDJSON streams: tests/test_bulk_import.py
        "--seed", os.environ.get("ST_SEED", "1"),
        "--request-timeout", "10",
        "--no-color",
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=tmp_path
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    sys.stdout.write(text[-4000:])
    assert proc.returncode == 0, text[-8000:]
    assert "passed" in text.lower()
