"""The operator CLI (spec 9) against a live gateway: real redis-server, real admin and proxy listeners.

The CLI runs in process through `gateway.cli.main` in a worker thread (it runs
its own event loop with asyncio.run, the gateway runs on the test's loop), or,
for the big import and the terminal test, as `python -m gateway` in a
subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pty
import re
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.cli import keyfile
from gateway.cli import keys as operator_cli
from gateway.cli.main import main
from tests.conftest import ROOT, AdminTokens, Gateway, free_port

UNKNOWN_ID = "key_" + "0" * 20
IMPORT_PREFIX = "tstimp_"  # every plaintext key in an import file starts so; no output may contain it


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return orjson.loads(self.out)

    @property
    def error_line(self) -> str:
        """stderr must be exactly one `gateway: ...` line, never a traceback."""
        assert "Traceback" not in self.err, self.err
        lines = self.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gateway: "), self.err
        return lines[0]


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch, admin_tokens: AdminTokens) -> AdminTokens:
    """GATEWAY_ADMIN_TOKEN holds the admin token (tests switch it with monkeypatch.setenv)."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", admin_tokens.admin)
    monkeypatch.delenv("GATEWAY_ADMIN_URL", raising=False)
    return admin_tokens


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return Run(code, out, err)


async def on(gw: Gateway, capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    """The CLI against this gateway's admin listener."""
    return await cli(capsys, *argv, "--admin-url", gw.admin_url)


async def proxy_status(gw: Gateway, key: str, path: str = "/api/ping") -> tuple[int, dict[str, Any]]:
    async with await gw.call("GET", path, key=key) as r:
        return r.status, orjson.loads(await r.read())


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def plaintext() -> str:
    return IMPORT_PREFIX + secrets.token_urlsafe(24)


# the whole life of a key ----------------------------------------------------------------------


async def test_the_cli_creates_lists_disables_and_audits_a_key_and_the_proxy_then_refuses_it(
    gw: Gateway, token: AdminTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = "acme-" + secrets.token_hex(3)
    run = await on(
        gw, capsys, "keys", "create", "--json", "--name", "billing prod", "--owner", owner,
        "--scope", "billing:read", "--scope", "billing:write", "--meta", '{"team": "payments"}',
        "--expires-at", "2031-05-06T07:08:09+00:00", "--prefix", "acme_",
    )  # fmt: skip
    assert run.code == 0, run.err
    created = run.json()
    key, key_id = created["key"], created["id"]
    assert key.startswith("acme_")
    assert created["scopes"] == ["billing:read", "billing:write"]
    assert created["meta"] == {"team": "payments"}
    assert created["expires_at"].startswith("2031-05-06T07:08:09")
    assert (await proxy_status(gw, key, "/billing/x"))[0] == 200

    # Human table: aligned columns, the key's row, never the key itself.
    run = await on(gw, capsys, "keys", "list", "--owner", owner)
    assert run.code == 0, run.err
    header, *rows = run.out.splitlines()
    assert header.split() == ["ID", "NAME", "OWNER", "STATE", "SCOPES", "CREATED"]
    assert len(rows) == 1 and rows[0].startswith(key_id)
    for column in ("NAME", "OWNER", "STATE", "SCOPES", "CREATED"):
        assert rows[0][header.index(column) :].split("  ")[0].strip() != ""
    assert rows[0][header.index("STATE") :].startswith("active")
    assert rows[0][header.index("NAME") :].startswith("billing prod")
    assert key not in run.out + run.err

    run = await on(gw, capsys, "keys", "disable", key_id, "--reason", "leaked in a public repo")
    assert run.code == 0, run.err
    assert run.out.splitlines()[0] == f"{key_id}: disabled"
    assert re.search(r"propagation: confirmed by 1/1 replica\(s\) in [0-9.]+ ms", run.out), run.out
    status, body = await proxy_status(gw, key, "/billing/x")
    assert (status, body["error"]["code"]) == (403, "key_disabled")

    run = await on(gw, capsys, "keys", "list", "--owner", owner, "--json")
    assert [(k["id"], k["state"]) for k in run.json()["keys"]] == [(key_id, "disabled")]
    assert run.json()["next_cursor"] is None

    run = await on(gw, capsys, "audit", "--key-id", key_id)
    assert run.code == 0, run.err
    header, *rows = run.out.splitlines()
    assert header.split() == ["AT", "ACTOR", "ACTION", "KEY", "REASON", "REMOTE", "DETAIL"]
    assert [r.split()[2] for r in rows] == ["disable", "create"]  # newest first
    assert "leaked in a public repo" in rows[0] and "ops-admin" in rows[0]

    run = await on(gw, capsys, "audit", "--key-id", key_id, "--json")
    entries = run.json()["entries"]
    assert [(e["action"], e["actor"], e["key_id"]) for e in entries] == [
        ("disable", "ops-admin", key_id),
        ("create", "ops-admin", key_id),
    ]
    assert entries[0]["reason"] == "leaked in a public repo"


async def test_show_enable_rotate_and_revoke(
    gw: Gateway, token: AdminTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    created = (await on(gw, capsys, "keys", "create", "--json", "--name", "svc", "--owner", "o1")).json()
    key_id = created["id"]

    run = await on(gw, capsys, "keys", "show", key_id)
    assert run.code == 0, run.err
    fields = dict(line.split(":", 1) for line in run.out.splitlines())
    assert fields["id"].strip() == key_id and fields["state"].strip() == "active"
    assert fields["name"].strip() == "svc" and fields["enabled"].strip() == "yes"
    assert created["key"] not in run.out
    assert (await on(gw, capsys, "keys", "show", key_id, "--json")).json()["id"] == key_id

    assert (await on(gw, capsys, "keys", "disable", key_id)).code == 0
    run = await on(gw, capsys, "keys", "enable", key_id, "--json")
    assert run.code == 0, run.err
    assert run.json()["state"] == "active" and run.json()["propagation"]["confirmed"] == 1
    assert (await proxy_status(gw, created["key"]))[0] == 200

    run = await on(gw, capsys, "keys", "rotate", key_id, "--grace-seconds", "600", "--json")
    assert run.code == 0, run.err
    rotated = run.json()
    assert rotated["id"] != key_id and rotated["name"] == "svc" and rotated["rotated_from"]["id"] == key_id
    assert (await proxy_status(gw, rotated["key"]))[0] == 200
    assert (await proxy_status(gw, created["key"]))[0] == 200  # within the grace period

    run = await on(gw, capsys, "keys", "rotate", rotated["id"])
    assert run.code == 0, run.err
    assert run.out.startswith("key: gw_") and "expires at" in run.out and "propagation: confirmed by 1/1" in run.out
    assert "shown only this once" in run.err

    run = await on(gw, capsys, "keys", "revoke", key_id, "--reason", "customer left")
    assert run.code == 0, run.err
    assert run.out.startswith(f"{key_id}: revoked")
    assert (await proxy_status(gw, created["key"]))[1]["error"]["code"] == "key_revoked"

    # The API refuses (409): exit 1 with its code and detail.
    run = await on(gw, capsys, "keys", "enable", key_id)
    assert run.code == operator_cli.EXIT_REFUSED
    assert run.error_line.startswith("gateway: key_revoked: ") and "(HTTP 409)" in run.error_line


async def test_list_follows_every_cursor_by_default_and_limit_cursor_and_state_filters_page(
    gw: Gateway, token: AdminTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = "many-" + secrets.token_hex(3)
    made = [(await gw.create_key(owner=owner))["id"] for _ in range(230)]
    for key_id in made[:7]:
        assert (await on(gw, capsys, "keys", "disable", key_id)).code == 0

    run = await on(gw, capsys, "keys", "list", "--owner", owner, "--json")
    assert run.code == 0, run.err
    assert [k["id"] for k in run.json()["keys"]] == made  # three pages of 100, in creation order
    assert run.json()["next_cursor"] is None
    run = await on(gw, capsys, "keys", "list", "--owner", owner)
    assert len(run.out.splitlines()) == 1 + 230

    run = await on(gw, capsys, "keys", "list", "--owner", owner, "--limit", "150", "--json")
    first = run.json()
    assert [k["id"] for k in first["keys"]] == made[:150] and first["next_cursor"]
    run = await on(gw, capsys, "keys", "list", "--owner", owner, "--cursor", first["next_cursor"], "--json")
    assert [k["id"] for k in run.json()["keys"]] == made[150:]
    run = await on(gw, capsys, "keys", "list", "--owner", owner, "--limit", "3")
    assert len(run.out.splitlines()) == 4 and "--cursor" in run.err

    run = await on(gw, capsys, "keys", "list", "--owner", owner, "--disabled", "--json")
    assert [k["id"] for k in run.json()["keys"]] == made[:7]
    run = await on(gw, capsys, "keys", "list", "--owner", owner, "--enabled", "--json")
    assert [k["id"] for k in run.json()["keys"]] == made[7:]


async def test_audit_shows_the_newest_50_unless_asked_for_more(
    gw: Gateway, token: AdminTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(60):
        await gw.create_key()
    run = await on(gw, capsys, "audit", "--json")
    assert len(run.json()["entries"]) == 50 and run.json()["next_cursor"]
    run = await on(gw, capsys, "audit", "--all", "--json")
    assert len(run.json()["entries"]) >= 60 and run.json()["next_cursor"] is None
    run = await on(gw, capsys, "audit", "--limit", "5")
    assert len(run.out.splitlines()) == 6 and "--cursor" in run.err


# exit codes -----------------------------------------------------------------------------------


async def test_nothing_listening_at_the_admin_url_is_exit_3(
    token: AdminTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    run = await cli(capsys, "keys", "list", "--admin-url", f"http://127.0.0.1:{free_port()}")
    assert run.code == operator_cli.EXIT_UNREACHABLE
    assert run.error_line.startswith("gateway: cannot connect to http://127.0.0.1:")


async def test_a_server_that_never_answers_is_exit_3_after_the_timeout(
    token: AdminTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nobody ever reads
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        run = await cli(capsys, "keys", "show", UNKNOWN_ID, "--admin-url", url, "--timeout", "0.5")
    assert run.code == operator_cli.EXIT_UNREACHABLE
    assert "no answer within 0.5 s" in run.error_line
    assert time.monotonic() - started < 5


@pytest.fixture
async def not_a_gateway() -> AsyncIterator[str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


async def test_a_server_that_is_not_a_gateway_or_the_proxy_listener_is_exit_3(
    gw: Gateway, not_a_gateway: str, token: AdminTokens, capsys: pytest.CaptureFixture[str]
) -> None:
    run = await cli(capsys, "keys", "list", "--admin-url", not_a_gateway)
    assert run.code == operator_cli.EXIT_UNREACHABLE
    assert "not JSON" in run.error_line
    # The gateway's proxy listener answers in JSON, but not as the admin API.
    for argv in (["keys", "list"], ["keys", "show", UNKNOWN_ID], ["keys", "create"]):
        run = await cli(capsys, *argv, "--admin-url", gw.proxy_url)
        assert run.code == operator_cli.EXIT_UNREACHABLE, (argv, run.err)
        assert "route_not_found" in run.error_line


async def test_a_wrong_token_or_too_low_a_role_is_exit_4(
    gw: Gateway, token: AdminTokens, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id = (await gw.create_key())["id"]
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "gwadm_wrong_" + secrets.token_urlsafe(16))
    run = await on(gw, capsys, "keys", "list")
    assert run.code == operator_cli.EXIT_AUTH
    assert run.error_line.startswith("gateway: invalid_token: ") and "(HTTP 401)" in run.error_line

    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", token.viewer)
    assert (await on(gw, capsys, "keys", "show", key_id)).code == 0
    run = await on(gw, capsys, "keys", "disable", key_id)
    assert run.code == operator_cli.EXIT_AUTH
    assert run.error_line.startswith("gateway: insufficient_permissions: ") and "(HTTP 403)" in run.error_line
    run = await on(gw, capsys, "audit")
    assert run.code == operator_cli.EXIT_AUTH
    # The token is never printed, not even a wrong one.
    assert token.viewer not in run.out + run.err


async def test_a_throttled_address_is_exit_4_saying_when_to_retry(
    gw: Gateway, token: AdminTokens, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "gwadm_developer_" + secrets.token_urlsafe(24)  # a configured id, a wrong secret
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", wrong)
    for _ in range(gw.replica.api.verifier.throttle.max_failures):
        assert (await on(gw, capsys, "keys", "list")).code == operator_cli.EXIT_AUTH
    run = await on(gw, capsys, "keys", "list")
    assert run.code == operator_cli.EXIT_AUTH
    assert run.error_line.startswith("gateway: too_many_requests: ") and "(HTTP 429)" in run.error_line
    assert re.search(r"retry in \d+ s", run.error_line), run.error_line
    assert wrong not in run.out + run.err


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "show", UNKNOWN_ID],
        ["keys", "disable", UNKNOWN_ID, "--reason", "x"],
        ["keys", "enable", UNKNOWN_ID],
        ["keys", "revoke", UNKNOWN_ID],
        ["keys", "rotate", UNKNOWN_ID],
    ],
)
async def test_an_unknown_key_id_is_exit_5(
    gw: Gateway, token: AdminTokens, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    run = await on(gw, capsys, *argv)
    assert run.code == operator_cli.EXIT_NOT_FOUND
    assert run.error_line.startswith("gateway: key_not_found: ") and "(HTTP 404)" in run.error_line


async def test_without_gateway_admin_token_every_command_is_exit_2_before_any_request(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    for argv in (["keys", "list"], ["keys", "create"], ["keys", "show", UNKNOWN_ID], ["audit"]):
        run = await on(gw, capsys, *argv)
        assert run.code == operator_cli.EXIT_USAGE, argv
        assert "GATEWAY_ADMIN_TOKEN is not set" in run.error_line
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "   ")
    assert (await on(gw, capsys, "keys", "list")).code == operator_cli.EXIT_USAGE


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "show", "key_nothex"], "not a key id"),
        (["keys", "disable", "../audit"], "not a key id"),
        (["keys", "create", "--meta", "{not json"], "--meta: not valid JSON"),
        (["keys", "create", "--meta", "[1]"], "meta: must be a JSON object"),
        (["keys", "create", "--expires-at", "tomorrow"], "--expires-at: not an ISO 8601"),
        (["keys", "create", "--expires-at", "2031-01-01T00:00:00"], "--expires-at: give a time zone"),
        (["keys", "create", "--expires-at", "2001-01-01"], "expires_at: must be in the future"),
        (["keys", "create", "--prefix", "no-dash"], "prefix: must be"),
        (["keys", "create", "--scope", "bad scope"], "scopes: each must be"),
        (["keys", "list", "--admin-url", "ftp://example"], "--admin-url: must be an http"),
        (["keys", "rotate", UNKNOWN_ID, "--grace-seconds", "-1"], "--grace-seconds"),
        (["keys", "import", "-"], "needs --format"),
    ],
)
async def test_bad_values_are_exit_2_with_one_line(
    token: AdminTokens, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    # Nothing listens at the default URL's port here: exit 2 means nothing was sent.
    run = await cli(
        capsys, *argv, *([] if "--admin-url" in argv else ["--admin-url", f"http://127.0.0.1:{free_port()}"])
    )
    assert run.code == operator_cli.EXIT_USAGE, run.err
    assert message in run.error_line


def test_argparse_usage_errors_are_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["keys"],
        ["keys", "list", "--enabled", "--disabled"],
        ["keys", "list", "--limit", "0"],
        ["audit", "--all", "--limit", "3"],
        ["keys", "show"],
        ["keys", "rotate", UNKNOWN_ID, "--grace-seconds", "x"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv


async def test_gateway_admin_url_is_the_default_admin_url(
    gw: Gateway, token: AdminTokens, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_URL", gw.admin_url)
    run = await cli(capsys, "keys", "list", "--json", "--limit", "1")
    assert run.code == 0, run.err
    assert isinstance(run.json()["keys"], list)


# import ---------------------------------------------------------------------------------------


@dataclass
class ImportFile:
    path: Path
    plaintexts: list[str]  # imported as `key`
    by_digest: list[str]  # imported as `key_sha256`; the plaintext kept to try them on the proxy
    existing: list[str]  # already in the table before the import
    repeated_lines: list[int]
    rejected_lines: list[int]
    records: int


def write_import_file(path: Path, n_plain: int, n_digest: int, existing: list[str]) -> ImportFile:
    """Half plaintext, half digest records, a few repeats of earlier lines and a few malformed lines."""
    plain = [plaintext() for _ in range(n_plain)]
    by_digest = [plaintext() for _ in range(n_digest)]
    lines: list[bytes] = []
    for i, key in enumerate(plain):
        lines.append(orjson.dumps({"key": key, "name": f"p{i}", "owner": "importer", "scopes": ["billing:read"]}))
    for i, key in enumerate(by_digest):
        record: dict[str, Any] = {"key_sha256": digest(key), "owner": "importer", "meta": {"n": i}}
        if i % 2:
            record["key_sha256"] = record["key_sha256"].upper()
        lines.append(orjson.dumps(record))
    for key in existing:
        lines.append(orjson.dumps({"key": key, "owner": "importer"}))
    body_records = len(lines)
    # Repeats: the same plaintext twice, a digest twice, a plaintext later given by its digest.
    repeats = [
        orjson.dumps({"key": plain[0]}),
        orjson.dumps({"key": plain[1], "name": "other name"}),
        orjson.dumps({"key_sha256": digest(plain[2])}),
    ]
    tail = [orjson.dumps({"key_sha256": digest(by_digest[0])}), orjson.dumps({"key": by_digest[3]})]
    malformed = [
        b'{"key": "' + plaintext().encode() + b'", "name": ',  # cut short
        b"[1, 2, 3]",
        b'"just a string"',
        b'{"name": "no key at all"}',
        b'{"key_sha256": "' + b"a" * 63 + b'"}',
        b'{"key": "short"}',
        b'{"key": "' + plaintext().encode() + b'", "scopes": ["bad scope"]}',
        b'{"key": "' + plaintext().encode() + b'", "colour": "blue"}',
        b'{"key": "' + plaintext().encode() + b'", "expires_at": "2001-01-01T00:00:00Z"}',
        b'{"key": "' + plaintext().encode() + b'", "key_sha256": "' + b"b" * 64 + b'"}',
        b"not json at all " + plaintext().encode(),
    ]
    # Spread the odd lines through the file, and a blank line that is simply skipped.
    out: list[bytes] = []
    repeated_lines: list[int] = []
    rejected_lines: list[int] = []
    extra = [(b, "repeat") for b in repeats] + [(b, "bad") for b in malformed]
    step = body_records // (len(extra) + 1)
    for i, line in enumerate(lines):
        out.append(line)
        if i and i % step == 0 and extra and i > 10:
            text, kind = extra.pop(0)
            out.append(text)
            (repeated_lines if kind == "repeat" else rejected_lines).append(len(out))
    extra += [(b, "repeat") for b in tail]  # after the digest records they repeat
    for text, kind in extra:
        out.append(text)
        (repeated_lines if kind == "repeat" else rejected_lines).append(len(out))
    out.insert(5, b"")  # a blank line: not a record, not an error
    repeated_lines = [n + 1 if n > 5 else n for n in repeated_lines]
    rejected_lines = [n + 1 if n > 5 else n for n in rejected_lines]
    path.write_bytes(b"\n".join(out) + b"\n")
    return ImportFile(
        path, plain, by_digest, existing, repeated_lines, rejected_lines,
        records=body_records + len(repeats) + len(tail) + len(malformed),
    )  # fmt: skip


async def run_subprocess(env_token: str, *argv: str) -> Run:
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": env_token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def assert_no_key_in(text: str, keys: list[str]) -> None:
    assert IMPORT_PREFIX not in text
    candidates = set(re.findall(r"[A-Za-z0-9_\-.~+/=]{16,}", text))
    assert not candidates & set(keys)


@pytest.mark.slow
async def test_an_import_of_10000_keys_counts_exactly_and_the_imported_keys_work(
    gw: Gateway, token: AdminTokens, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    existing = [plaintext() for _ in range(3)]
    for key in existing:
        await gw.create_key(key=key)
    f = write_import_file(tmp_path / "keys.jsonl", 5000 - 3, 5000, existing)
    every_key = f.plaintexts + f.by_digest + existing

    # A dry run checks the file and sends nothing (no token, nothing listening).
    run = await run_subprocess("", "keys", "import", str(f.path), "--dry-run", "--json",
                               "--admin-url", f"http://127.0.0.1:{free_port()}")  # fmt: skip
    assert run.code == 1, run.err
    dry = run.json()
    assert (dry["dry_run"], dry["records"], dry["rejected"], dry["skipped_repeated"]) == (
        True, f.records, len(f.rejected_lines), len(f.repeated_lines),
    )  # fmt: skip
    assert dry["valid"] == 10000 + len(f.repeated_lines)

    started = time.perf_counter()
    run = await run_subprocess(token.developer, "keys", "import", str(f.path), "--json", "--admin-url", gw.admin_url)
    elapsed = time.perf_counter() - started
    print(f"\nimport of {f.records} records (10,000 distinct keys) took {elapsed:.2f} s")
    assert run.code == 1, run.err  # some lines were rejected
    summary = run.json()
    assert summary["complete"] is True
    assert summary["records"] == f.records
    assert summary["imported"] == 10000 - 3
    assert summary["skipped_existing"] == 3
    assert summary["skipped_repeated"] == len(f.repeated_lines) == 5
    assert summary["skipped"] == 3 + 5
    assert summary["rejected"] == len(f.rejected_lines) == 11
    assert [r["line"] for r in summary["rejections"]] == f.rejected_lines
    assert [r["line"] for r in summary["repeats"]] == f.repeated_lines
    details = {r["line"]: r["detail"] for r in summary["rejections"]}
    assert "not valid JSON" in details[f.rejected_lines[0]]
    assert "must be a JSON object" in details[f.rejected_lines[1]]
    assert "key_sha256: must be 64 hexadecimal" in details[f.rejected_lines[4]]
    assert "unknown field(s): colour" in details[f.rejected_lines[7]]
    assert "expires_at: must be in the future" in details[f.rejected_lines[8]]

    # A sample of the imported keys, by plaintext and by digest, works through the proxy.
    sample = secrets.SystemRandom().sample(f.plaintexts, 40) + secrets.SystemRandom().sample(f.by_digest, 40)
    for key in sample:
        status, echo = await proxy_status(gw, key, "/billing/x" if key in f.plaintexts else "/api/x")
        assert status == 200, echo
        assert echo["path"].endswith("/x")
    # Keys from the rejected lines were not imported.
    bad_scope = f.path.read_text().splitlines()[f.rejected_lines[6] - 1]
    rejected_key = orjson.loads(bad_scope)["key"]
    assert (await proxy_status(gw, rejected_key))[0] == 401

    # Run again, in human form: everything is already there.
    run = await run_subprocess(token.developer, "keys", "import", str(f.path), "--admin-url", gw.admin_url)
    assert run.code == 1, run.err
    first, *rest = run.out.splitlines()
    assert first.startswith(
        f"imported 0, skipped {10000 + 5} (10000 already in the table, 5 repeating an earlier line)"
    )
    assert [int(line.split(":")[0].split()[1]) for line in rest] == f.rejected_lines
    assert_no_key_in(repr(summary) + run.out + run.err + caplog.text, every_key)
    assert run.err == ""  # no progress bar without a terminal


async def test_import_output_and_logs_never_contain_a_key_from_the_file(
    gw: Gateway, token: AdminTokens, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    f = write_import_file(tmp_path / "k.jsonl", 30, 30, [])
    every = [*f.plaintexts, *f.by_digest]
    texts = []
    for extra in ([], ["--json"], ["--dry-run"], ["--dry-run", "--json"]):
        run = await on(gw, capsys, "keys", "import", str(f.path), *extra)
        assert run.code == 1, run.err
        texts.append(run.out + run.err)
    assert_no_key_in("".join(texts) + caplog.text, every)


async def test_a_csv_import(
    gw: Gateway, token: AdminTokens, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    k1, k2, k3, k4 = (plaintext() for _ in range(4))
    owner = "csv-" + secrets.token_hex(3)
    text = (
        " Owner , key,Scopes,meta,name,key_sha256,expires_at\n"  # any order, case, spaces
        f'{owner},{k1},billing:read;billing:write,"{{""plan"": ""pro""}}",first,,2031-01-01T00:00:00Z\n'
        f"{owner},{k2},billing:read other:x,,second,,\n"
        f"{owner},,,,by digest,{digest(k3)},\n"
        "\n"
        f"{owner},{k4},,,too many,,,extra\n"
        f'{owner},,,"{{not json",bad meta,{digest(plaintext())},\n'
        f'{owner},"{plaintext()}"oops,,,bad quoting,,\n'
        f'{owner},{k1},,"{{\n""spans"": ""two lines""}}",a repeat,,\n'
    )
    path = tmp_path / "keys.csv"
    path.write_text(text)

    run = await on(gw, capsys, "keys", "import", str(path))
    assert run.code == 1, run.err
    head, *rejections = run.out.splitlines()
    assert head.startswith("imported 3, skipped 1 (0 already in the table, 1 repeating an earlier line), rejected 3")
    assert [line.split(":")[0] for line in rejections] == ["line 6", "line 7", "line 8"]
    assert "has 8 field(s), the header names 7" in rejections[0]
    assert "meta: must be a JSON object" in rejections[1]
    assert "not readable as CSV" in rejections[2]
    assert not any(k in run.out + run.err for k in (k1, k2, k3, k4))

    listed = (await on(gw, capsys, "keys", "list", "--owner", owner, "--json")).json()["keys"]
    listed.sort(key=lambda k: ["first", "second", "by digest"].index(k["name"]))  # sent concurrently
    assert [(k["name"], k["scopes"], k["meta"], k["imported"]) for k in listed] == [
        ("first", ["billing:read", "billing:write"], {"plan": "pro"}, True),
        ("second", ["billing:read", "other:x"], {}, True),
        ("by digest", [], {}, True),
    ]
    assert listed[0]["expires_at"].startswith("2031-01-01T00:00:00")
    assert (await proxy_status(gw, k1, "/billing/x"))[0] == 200
    assert (await proxy_status(gw, k3))[0] == 200
    assert (await proxy_status(gw, k4))[0] == 401


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("k.csv", "key,colour\nabc,red\n", "CSV header: unknown column(s): colour"),
        ("k.csv", "name,owner\nx,y\n", "needs a key or a key_sha256 column"),
        ("k.csv", "key,key\n", "named twice: key"),
        ("k.csv", "", "the file is empty"),
        ("k.txt", "{}\n", "cannot tell the format"),
        ("k.jsonl", b"\xff\xfe\x00garbage", "not UTF-8"),
        ("missing.jsonl", None, "cannot read"),
    ],
)
async def test_a_bad_import_file_is_exit_2_and_nothing_is_sent(
    tmp_path: Path, token: AdminTokens, capsys: pytest.CaptureFixture[str], name: str, content: Any, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    run = await cli(capsys, "keys", "import", str(path), "--admin-url", f"http://127.0.0.1:{free_port()}")
    assert run.code == operator_cli.EXIT_USAGE, run.err
    assert message in run.error_line


async def test_an_import_stops_at_an_auth_failure_or_a_lost_api_with_the_right_exit_code(
    gw: Gateway, token: AdminTokens, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    f = write_import_file(tmp_path / "k.jsonl", 20, 20, [])
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", token.viewer)
    run = await on(gw, capsys, "keys", "import", str(f.path))
    assert run.code == operator_cli.EXIT_AUTH
    assert run.out.startswith("stopped early: imported 0")
    assert "insufficient_permissions" in run.error_line
    run = await cli(capsys, "keys", "import", str(f.path), "--admin-url", f"http://127.0.0.1:{free_port()}")
    assert run.code == operator_cli.EXIT_UNREACHABLE
    assert "cannot connect" in run.error_line


async def test_the_progress_bar_is_drawn_on_a_terminal_only(gw: Gateway, token: AdminTokens, tmp_path: Path) -> None:
    f = write_import_file(tmp_path / "k.jsonl", 50, 50, [])
    master, slave = pty.openpty()

    def drain() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        env = {**os.environ, "GATEWAY_ADMIN_TOKEN": token.developer}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "keys", "import", str(f.path), "--admin-url", gw.admin_url,
            stdout=asyncio.subprocess.PIPE, stderr=slave, env=env, cwd=ROOT,
        )  # fmt: skip
        os.close(slave)
        slave = -1
        # Read the terminal while the import runs, so a full terminal buffer never blocks it.
        (out, _), tty_bytes = await asyncio.gather(proc.communicate(), asyncio.to_thread(drain))
        tty_text = tty_bytes.decode()
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    assert proc.returncode == 1
    assert out.decode().startswith("imported 100, skipped 5")
    assert "\r[" in tty_text and "100% 100/100 imported 100 skipped 0 rejected 0" in tty_text
    assert IMPORT_PREFIX not in tty_text


# pure parts -----------------------------------------------------------------------------------


def test_the_table_aligns_columns_and_shortens_long_cells() -> None:
    records = [
        {"id": "key_1", "name": "a", "owner": None, "state": "active", "scopes": ["x", "y"],
         "created_at": "2026-11-23T10:00:00.123Z"},
        {"id": "key_22", "name": "n" * 100, "owner": "acme", "state": "revoked", "scopes": [],
         "created_at": "2026-11-24T10:00:00.000Z"},
    ]  # fmt: skip
    lines = operator_cli.key_table(records).splitlines()
    starts = [lines[0].index(h) for h in operator_cli.KEY_COLUMNS]
    assert lines[1][starts[2] : starts[3]].strip() == "-"
    assert lines[1][starts[4] :].startswith("x,y")
    assert lines[2][starts[1] : starts[2]].strip() == "n" * 37 + "..."
    assert lines[2][starts[5] :] == "2026-11-24T10:00:00Z"
    assert lines[1][starts[3] :].startswith("active") and lines[2][starts[3] :].startswith("revoked")


def test_the_progress_text() -> None:
    assert operator_cli.progress_text(5, 10, 3, 1, 1, width=10) == (
        "[#####.....]  50% 5/10 imported 3 skipped 1 rejected 1"
    )
    assert operator_cli.progress_text(0, 0, 0, 0, 0, width=4).startswith("[####] 100%")


def test_api_errors_map_to_exit_codes() -> None:
    def code(status: int, error_code: str | None) -> int:
        body = {"error": {"code": error_code, "detail": "d"}} if error_code else {"nope": 1}
        return operator_cli.api_error(status, body, "http://x").code

    assert code(400, "invalid_request") == 1
    assert code(409, "key_exists") == 1
    assert code(401, "invalid_token") == 4
    assert code(401, "missing_token") == 4
    assert code(403, "insufficient_permissions") == 4
    assert code(429, "too_many_requests") == 4  # the admin token throttle
    assert code(429, "rate_limited") == 1
    assert code(401, "key_not_found") == 3  # the proxy's answer
    assert code(404, "key_not_found") == 5
    assert code(404, "not_found") == 3
    assert code(404, "route_not_found") == 3
    assert code(500, "internal_error") == 3
    assert code(503, "not_ready") == 3
    assert code(200, None) == 3


def test_the_import_file_parser_keeps_keys_out_of_reprs_and_messages() -> None:
    key = plaintext()
    items = list(keyfile.parse_jsonl([orjson.dumps({"key": key}).decode(), '{"key": "' + key + '"', key]))
    assert isinstance(items[0], keyfile.Entry) and key not in repr(items[0])
    assert all(isinstance(i, keyfile.Rejection) for i in items[1:])
    assert key not in repr(items) and IMPORT_PREFIX not in repr(items)
    odd_field = keyfile.check(1, {"key": key, key: 1}, time.time())
    assert isinstance(odd_field, keyfile.Rejection) and key not in odd_field.detail


def test_a_prefix_on_an_imported_key_is_rejected_as_the_api_does() -> None:
    rejected = keyfile.check(3, {"key": plaintext(), "prefix": "tstimp_"}, time.time())
    detail = "prefix: applies to generated keys only, not to an import"
    assert rejected == keyfile.Rejection(3, "invalid_request", detail)


async def test_an_import_against_a_gateway_without_the_bulk_endpoint_posts_each_record(
    gw: Gateway, token: AdminTokens, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older gateway answers 404 to POST /v1/keys/import: the CLI sends one POST /v1/keys per
    record instead, with the same counts. The older gateway is this one behind a relay that has
    no such route (everything else is passed through as it is)."""
    seen: list[str] = []

    async def relay(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        if request.path == "/v1/keys/import":
            return web.json_response({"error": {"code": "not_found"}}, status=404)
        async with gw.session.request(
            request.method, gw.admin_url + request.path_qs, data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")},
        ) as r:  # fmt: skip
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    older = TestServer(app, host="127.0.0.1")
    await older.start_server()
    try:
        existing = plaintext()
        await gw.create_key(key=existing)
        f = write_import_file(tmp_path / "keys.jsonl", 20, 20, [existing])
        monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", token.developer)
        run = await cli(capsys, "keys", "import", str(f.path), "--json", "--admin-url", str(older.make_url("")))
    finally:
        await older.close()
    summary = orjson.loads(run.out)
    assert (summary["complete"], summary["imported"], summary["skipped_existing"]) == (True, 40, 1), summary
    assert seen.count("POST /v1/keys/import") == 1 and seen.count("POST /v1/keys") == 41
    for key in f.plaintexts[:3]:
        assert (await proxy_status(gw, key, "/billing/x"))[0] == 200
