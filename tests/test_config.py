"""Spec 3 and 2: the configuration loader and the `gateway check-config` / `hash-token` commands.

A config either loads into typed values or fails with every problem at once,
each naming the file, the key path, the value and the rule, never a secret.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from argon2 import PasswordHasher

from gateway import config as config_mod
from gateway.admin.auth import hash_token
from gateway.config import ConfigError, Problem

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "gateway.yaml"
# One real argon2id hash for every config that needs a token (hashing is slow on purpose).
TOKEN = "gwadm_test_" + "t" * 24
TOKEN_HASH = hash_token(TOKEN)


def valid_raw() -> dict[str, Any]:
    """A small config that passes, to break one piece at a time."""
    return {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "admin": {
            "listen": {"host": "127.0.0.1", "port": 8081},
            "tokens": [{"name": "ops", "role": "admin", "hash": TOKEN_HASH}],
        },
        "redis": {"url": "redis://127.0.0.1:6379/0", "prefix": "gw:"},
        "routes": [{"name": "api", "path_prefix": "/api", "upstream": "http://127.0.0.1:9000"}],
    }


def write(tmp_path: Path, content: str | dict[str, Any], name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
    return path


def problems_of(path: Path, environ: dict[str, str] | None = None) -> tuple[list[Problem], str]:
    """The problems loading `path` reports, and the report's text."""
    with pytest.raises(ConfigError) as caught:
        config_mod.load(path, environ or {})
    assert caught.value.source == str(path)
    return caught.value.problems, str(caught.value)


def only_problem(problems: list[Problem], path: str) -> Problem:
    matching = [p for p in problems if p.path == path]
    assert len(matching) == 1, f"expected one problem at {path!r}, got: {problems}"
    return matching[0]


def run_gateway(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`gateway ARGS` in a child process, with no GATEWAY_* variable from the test's own environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={**clean, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


# the shipped file ------------------------------------------------------------------------


def test_the_shipped_config_validates() -> None:
    cfg = config_mod.load(SHIPPED, {})
    assert cfg.source == str(SHIPPED)
    assert cfg.redis.embedded
    assert cfg.listen.port != cfg.admin.listen.port
    assert {r.name for r in cfg.routes} == {"demo", "demo-admin-area", "public"}
    by_name = {r.name: r for r in cfg.routes}
    assert by_name["demo-admin-area"].scopes == ("demo:admin",)
    assert not by_name["public"].requires_key
    assert by_name["demo"].methods == frozenset({"GET", "POST"})


def test_a_small_valid_config_fills_in_the_documented_defaults(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path, valid_raw()), {})
    assert (cfg.cache.ttl_seconds, cfg.cache.negative_ttl_seconds) == (30, 2)
    assert cfg.cache.max_entries == 100_000
    assert cfg.cache.serve_stale_seconds == 0
    assert (cfg.keys.allow_reenable, cfg.keys.disabled_status) == (True, 403)
    assert cfg.redis.channel_secret is None
    (route,) = cfg.routes
    assert route.methods is None and route.requires_key and route.scopes == ()
    assert not route.strip_prefix and not route.forward_authorization
    assert route.timeout_seconds == 30
    assert [(t.name, t.role) for t in cfg.admin.tokens] == [("ops", "admin")]


# a broken file: every problem at once ------------------------------------------------------

BROKEN = textwrap.dedent(
    """\
    colour: blue
    listen: {host: 127.0.0.1, port: 9000, backlog: 128}
    admin:
      listen: {host: 127.0.0.1, port: 9000}
      tokens:
        - name: ops
          role: admin
          hash: "$2b$12$Xo2bcryptNotArgonHashXo2bcryptNotArgonHashXo2bcryptNo"
          comment: hello
    redis:
      url: redis://127.0.0.1:6379/0
      timeout: 5
    cache:
      ttl_seconds: thirty
      max_entries: 1.5
    keys:
      allow_reenable: "yes"
      disabled_status: 404
    routes:
      - name: billing
        path_prefix: billing
        upstream: http://127.0.0.1:9000
      - name: api
        path_prefix: /api/
        upstream: ftp://127.0.0.1/files
        strip_prefix: "no"
        timeout_seconds: fast
        retries: 3
      - name: dup
        path_prefix: /one
        upstream: http://127.0.0.1:9000
      - name: dup
        path_prefix: /two
        upstream: http://127.0.0.1:9000
    """
)

# key path -> (the value as shown, or None for a secret, a fragment of the rule).
# An unknown key's value is never echoed: it may be a secret under a misspelt name.
BROKEN_PROBLEMS: dict[str, tuple[str | None, str]] = {
    "colour": ("(value not shown)", "unknown key"),
    "listen.backlog": ("(value not shown)", "unknown key"),
    "admin.listen.port": ("9000", "listen.port"),
    "admin.tokens[0].hash": (None, "argon2id"),
    "admin.tokens[0].comment": ("(value not shown)", "unknown key"),
    "redis.timeout": ("(value not shown)", "unknown key"),
    "cache.ttl_seconds": ("'thirty'", "number"),
    "cache.max_entries": ("1.5", "integer"),
    "keys.allow_reenable": ("'yes'", "true or false"),
    "keys.disabled_status": ("404", "401, 403"),
    "routes[0].path_prefix": ("'billing'", "'/'"),
    "routes[1].path_prefix": ("'/api/'", "'/'"),
    "routes[1].upstream": ("'ftp://127.0.0.1/files'", "http"),
    "routes[1].strip_prefix": ("'no'", "true or false"),
    "routes[1].timeout_seconds": ("'fast'", "number"),
    "routes[1].retries": ("(value not shown)", "unknown key"),
    "routes[3].name": ("'dup'", "duplicate"),
}


@pytest.fixture
def broken_file(tmp_path: Path) -> Path:
    return write(tmp_path, BROKEN, "broken.yaml")


def test_a_broken_file_reports_exactly_its_problems_all_at_once(broken_file: Path) -> None:
    problems, _ = problems_of(broken_file)
    assert sorted(p.path for p in problems) == sorted(BROKEN_PROBLEMS)


@pytest.mark.parametrize("key_path", list(BROKEN_PROBLEMS))
def test_each_problem_names_the_file_the_key_path_the_value_and_the_rule(broken_file: Path, key_path: str) -> None:
    problems, text = problems_of(broken_file)
    shown, rule = BROKEN_PROBLEMS[key_path]
    problem = only_problem(problems, key_path)
    assert rule in problem.rule
    line = problem.format(str(broken_file))
    if shown is None:  # a secret: only a placeholder stands in for the value
        assert line.startswith(f"{broken_file}: {key_path}: ") and "(secret)" in line
        assert line.endswith(f": {problem.rule}")
    else:
        assert line == f"{broken_file}: {key_path}: {shown}: {problem.rule}"
    assert line in text.splitlines()


@pytest.mark.parametrize(
    "misspelt",
    [
        "redis: {channel_secrets: 'topsecret-channel-value'}",
        "admin: {tokens: [{name: a, role: admin, hash: '$argon2id$v=19$x', token: 'topsecret-channel-value'}]}",
    ],
)
def test_a_secret_under_a_misspelt_key_is_not_echoed(tmp_path: Path, misspelt: str) -> None:
    path = write(tmp_path, misspelt + "\nroutes: [{name: a, path_prefix: /a, upstream: 'http://127.0.0.1:1'}]\n")
    problems, text = problems_of(path)
    assert any("unknown key" in p.rule for p in problems)
    assert "topsecret-channel-value" not in text


def test_a_broken_file_never_echoes_the_token_hash(broken_file: Path) -> None:
    _, text = problems_of(broken_file)
    assert "Xo2bcrypt" not in text


@pytest.mark.parametrize(
    "prefix",
    ["billing", "", "/api/", "/a//b", "/a/./b", "/a/../b", "/a?b", "/a#b", "/a%2Fb", "/a\\b", "/a b"],
)
def test_a_route_prefix_that_is_not_a_plain_normalised_path_is_a_problem(tmp_path: Path, prefix: str) -> None:
    raw = valid_raw()
    raw["routes"][0]["path_prefix"] = prefix
    problems, _ = problems_of(write(tmp_path, raw))
    assert [p.path for p in problems] == ["routes[0].path_prefix"]
    assert problems[0].value == prefix


@pytest.mark.parametrize(
    "upstream",
    [
        "ftp://127.0.0.1:9000",
        "127.0.0.1:9000",
        "http://",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:9000/?debug=1",
        "http://127.0.0.1:9000/#top",
        "not a url",
    ],
)
def test_an_upstream_that_is_not_a_plain_http_url_is_a_problem(tmp_path: Path, upstream: str) -> None:
    raw = valid_raw()
    raw["routes"][0]["upstream"] = upstream
    problems, _ = problems_of(write(tmp_path, raw))
    assert [p.path for p in problems] == ["routes[0].upstream"]


@pytest.mark.parametrize(
    ("proxy_host", "admin_host"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("127.0.0.1", "0.0.0.0"),
        ("::", "::1"),
        ("127.0.0.1", "localhost"),
    ],
)
def test_the_admin_listener_on_the_proxy_port_is_a_problem(tmp_path: Path, proxy_host: str, admin_host: str) -> None:
    raw = valid_raw()
    raw["listen"] = {"host": proxy_host, "port": 8080}
    raw["admin"]["listen"] = {"host": admin_host, "port": 8080}
    problems, _ = problems_of(write(tmp_path, raw))
    assert [p.path for p in problems] == ["admin.listen.port"]


@pytest.mark.parametrize(
    "digest",
    [
        "$argon2i$v=19$m=65536,t=3,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG",
        "$2b$12$Xo2bcryptNotArgonHashXo2bcryptNotArgonHashXo2bcryptNo",
        "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
        "plain-text-token-in-the-hash-field",
    ],
)
def test_an_admin_token_hash_that_is_not_argon2id_is_a_problem(tmp_path: Path, digest: str) -> None:
    raw = valid_raw()
    raw["admin"]["tokens"][0]["hash"] = digest
    problems, text = problems_of(write(tmp_path, raw))
    assert [p.path for p in problems] == ["admin.tokens[0].hash"]
    assert "argon2id" in problems[0].rule
    assert digest not in text


def test_duplicate_route_names_are_a_problem(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["routes"].append({"name": "api", "path_prefix": "/other", "upstream": "http://127.0.0.1:9001"})
    problems, _ = problems_of(write(tmp_path, raw))
    assert [(p.path, p.value) for p in problems] == [("routes[1].name", "api")]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("listen:\n  host: 127.0.0.1\n port: 8080\nroutes: []\n", 3),
        ("listen: {host: 127.0.0.1, port: 8080}\nredis:\n  prefix: [gw\nroutes: []\n", 4),
        ("routes:\n  - name: api\n\tpath_prefix: /api\n", 3),
    ],
)
def test_unparseable_yaml_is_one_problem_with_its_line_number(tmp_path: Path, text: str, line: int) -> None:
    problems, report = problems_of(write(tmp_path, text))
    assert len(problems) == 1
    assert problems[0].path.startswith(f"line {line},")
    assert "YAML" in problems[0].rule
    assert str(tmp_path / "gateway.yaml") in report


# environment overrides ---------------------------------------------------------------------


def test_environment_variables_override_the_file() -> None:
    cfg = config_mod.load(
        SHIPPED,
        {
            "GATEWAY_REDIS_URL": "redis://redis.internal:6380/2",
            "GATEWAY_LISTEN_PORT": "9123",
            "GATEWAY_ADMIN_LISTEN_PORT": "9124",
            "GATEWAY_CACHE_TTL_SECONDS": "5",
            "GATEWAY_KEYS_DISABLED_STATUS": "401",
            "GATEWAY_KEYS_ALLOW_REENABLE": "false",
            "GATEWAY_REDIS_PREFIX": "prod:",
        },
    )
    assert cfg.redis.url == "redis://redis.internal:6380/2"
    assert not cfg.redis.embedded
    assert cfg.listen.port == 9123
    assert cfg.admin.listen.port == 9124
    assert cfg.cache.ttl_seconds == 5
    assert cfg.keys.disabled_status == 401
    assert cfg.keys.allow_reenable is False
    assert cfg.redis.prefix == "prod:"
    # Untouched values still come from the file.
    assert cfg.listen.host == "127.0.0.1"
    assert cfg.cache.negative_ttl_seconds == 2


def test_admin_tokens_can_come_from_the_environment() -> None:
    tokens = yaml.safe_dump([{"name": "ci", "role": "developer", "hash": TOKEN_HASH}])
    cfg = config_mod.load(SHIPPED, {"GATEWAY_ADMIN_TOKENS": tokens})
    assert [(t.name, t.role, t.hash) for t in cfg.admin.tokens] == [("ci", "developer", TOKEN_HASH)]


def test_only_the_given_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LISTEN_PORT", "9999")
    assert config_mod.load(SHIPPED, {}).listen.port == 8080


@pytest.mark.parametrize(
    ("var", "value", "key_path"),
    [
        ("GATEWAY_CACHE_TTL_SECONDS", "abc", "cache.ttl_seconds"),
        ("GATEWAY_LISTEN_PORT", "abc", "listen.port"),
        ("GATEWAY_LISTEN_PORT", "70000", "listen.port"),
        ("GATEWAY_KEYS_DISABLED_STATUS", "500", "keys.disabled_status"),
        ("GATEWAY_KEYS_ALLOW_REENABLE", "maybe", "keys.allow_reenable"),
        ("GATEWAY_CACHE_MAX_ENTRIES", "[1, 2", "cache.max_entries"),
    ],
)
def test_a_bad_environment_value_is_a_problem_naming_the_variable(var: str, value: str, key_path: str) -> None:
    problems, text = problems_of(SHIPPED, {var: value})
    assert len(problems) == 1, problems
    line = problems[0].format(str(SHIPPED))
    assert var in line
    assert key_path in line or var == problems[0].path
    assert str(SHIPPED) in text


# secrets are never echoed --------------------------------------------------------------------

SECRET = "Sup3rS3cretValue"  # appears in each case below and must never be printed


@pytest.mark.parametrize(
    ("where", "change"),
    [
        pytest.param("redis.channel_secret", {"redis": {"channel_secret": SECRET[:12]}}, id="short-channel-secret"),
        pytest.param("redis.channel_secret", {"redis": {"channel_secret": [SECRET]}}, id="channel-secret-not-a-string"),
        pytest.param("redis.url", {"redis": {"url": f"http://:{SECRET}@redis.internal:6379"}}, id="redis-url-scheme"),
        pytest.param("redis.url", {"redis": {"url": f"redis://:{SECRET}@/0"}}, id="redis-url-no-host"),
        pytest.param("redis.url", {"redis": {"url": {"password": SECRET}}}, id="redis-url-not-a-string"),
        pytest.param("admin.tokens[0].hash", {"admin": {"hash": f"$2b$12${SECRET}"}}, id="token-hash-not-argon2id"),
        pytest.param("admin.tokens[0].hash", {"admin": {"hash": [SECRET]}}, id="token-hash-not-a-string"),
    ],
)
def test_secrets_in_the_file_are_not_echoed_in_problems(tmp_path: Path, where: str, change: dict[str, Any]) -> None:
    raw = valid_raw()
    if "hash" in change.get("admin", {}):
        raw["admin"]["tokens"][0]["hash"] = change["admin"]["hash"]
    else:
        raw["redis"].update(change["redis"])
    raw["routes"][0]["path_prefix"] = "no-slash"  # another problem alongside, to see the secret is not listed
    path = write(tmp_path, raw)
    problems, text = problems_of(path)
    assert {p.path for p in problems} == {where, "routes[0].path_prefix"}
    assert SECRET[:12] not in text
    completed = run_gateway("check-config", "--config", str(path))
    assert completed.returncode == 2
    assert SECRET[:12] not in completed.stderr + completed.stdout


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("GATEWAY_REDIS_URL", f"http://:{SECRET}@redis.internal:6379"),
        ("GATEWAY_REDIS_URL", f"redis://:{SECRET}@/0"),
        ("GATEWAY_REDIS_CHANNEL_SECRET", SECRET[:12]),
    ],
)
def test_secrets_from_the_environment_are_not_echoed_in_problems(var: str, value: str) -> None:
    problems, text = problems_of(SHIPPED, {var: value})
    assert len(problems) == 1
    assert var in text
    assert SECRET[:12] not in text


def test_a_valid_channel_secret_is_not_echoed_when_another_problem_is_reported(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["redis"]["channel_secret"] = SECRET * 2
    raw["redis"]["url"] = f"redis://:{SECRET}@redis.internal:6379/0"
    raw["cache"] = {"ttl_seconds": -1}
    problems, text = problems_of(write(tmp_path, raw))
    assert [p.path for p in problems] == ["cache.ttl_seconds"]
    assert SECRET[:12] not in text


# `gateway check-config` ------------------------------------------------------------------------


def test_check_config_accepts_the_shipped_file_with_one_ok_line() -> None:
    completed = run_gateway("check-config", "--config", str(SHIPPED))
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 1
    assert str(SHIPPED) in lines[0] and "ok" in lines[0]
    assert completed.stderr == ""


def test_check_config_lists_every_problem_of_a_broken_file_and_exits_2(broken_file: Path) -> None:
    completed = run_gateway("check-config", "--config", str(broken_file))
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""
    for key_path, (shown, _) in BROKEN_PROBLEMS.items():
        expected = f"{broken_file}: {key_path}: " + (f"{shown}: " if shown is not None else "")
        assert any(expected in line for line in completed.stderr.splitlines()), (
            f"{key_path} missing from:\n{completed.stderr}"
        )


@pytest.mark.parametrize(
    "case",
    ["missing", "directory", "not-utf8", "unparseable", "a-list", "empty"],
)
def test_check_config_exits_2_without_a_traceback_for_a_file_it_cannot_use(tmp_path: Path, case: str) -> None:
    path = tmp_path / "gateway.yaml"
    if case == "directory":
        path.mkdir()
    elif case == "not-utf8":
        path.write_bytes(b"listen:\n  host: \xff\xfe\n")
    elif case == "unparseable":
        path.write_text("listen:\n  host: 127.0.0.1\n port: 8080\n")
    elif case == "a-list":
        path.write_text("- listen\n- routes\n")
    elif case == "empty":
        path.write_text("")
    completed = run_gateway("check-config", "--config", str(path))
    assert completed.returncode == 2, completed.stdout
    assert "Traceback" not in completed.stderr
    assert str(path) in completed.stderr
    assert completed.stderr.strip()
    if case == "unparseable":
        assert "line 3" in completed.stderr


def test_check_config_applies_environment_overrides() -> None:
    good = run_gateway("check-config", "--config", str(SHIPPED), env={"GATEWAY_LISTEN_PORT": "9090"})
    assert good.returncode == 0, good.stderr
    bad = run_gateway("check-config", "--config", str(SHIPPED), env={"GATEWAY_CACHE_TTL_SECONDS": "abc"})
    assert bad.returncode == 2
    assert "GATEWAY_CACHE_TTL_SECONDS" in bad.stderr
    assert "Traceback" not in bad.stderr


# `gateway hash-token` -----------------------------------------------------------------------------


def test_hash_token_generate_prints_a_token_and_an_argon2id_hash_that_verifies(tmp_path: Path) -> None:
    completed = run_gateway("hash-token", "--generate", "--name", "ci-bot", "--role", "developer")
    assert completed.returncode == 0, completed.stderr
    token_lines = [line for line in completed.stdout.splitlines() if line.startswith("token: ")]
    assert len(token_lines) == 1
    token = token_lines[0].removeprefix("token: ").strip()
    assert len(token) >= 32
    entries = [e for e in yaml.safe_load(completed.stdout.split("\n", 1)[1]) if isinstance(e, dict)]
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["name"], entry["role"]) == ("ci-bot", "developer")
    assert entry["hash"].startswith("$argon2id$")
    assert token not in entry["hash"]
    assert PasswordHasher().verify(entry["hash"], token)

    # The printed entry is a valid admin.tokens item.
    raw = valid_raw()
    raw["admin"]["tokens"] = [entry]
    cfg = config_mod.load(write(tmp_path, raw), {})
    assert cfg.admin.tokens[0].hash == entry["hash"]


def test_hash_token_generates_a_different_token_each_time() -> None:
    first = run_gateway("hash-token", "--generate").stdout
    second = run_gateway("hash-token", "--generate").stdout
    assert first.splitlines()[0].startswith("token: ")
    assert first.splitlines()[0] != second.splitlines()[0]


def test_hash_token_hashes_a_token_read_from_stdin() -> None:
    token = "my-own-admin-token-" + "x" * 16
    completed = run_gateway("hash-token", stdin=token + "\n")
    assert completed.returncode == 0, completed.stderr
    assert token not in completed.stdout
    (entry,) = yaml.safe_load(completed.stdout)
    assert PasswordHasher().verify(entry["hash"], token)


def test_hash_token_refuses_a_short_token() -> None:
    completed = run_gateway("hash-token", stdin="short\n")
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert "$argon2id$" not in completed.stdout


def _entry_of(stdout: str) -> dict[str, Any]:
    entries = [e for e in yaml.safe_load(stdout.split("\n", 1)[1]) if isinstance(e, dict)]
    assert len(entries) == 1
    entry: dict[str, Any] = entries[0]
    return entry


async def test_hash_token_generates_the_gwadm_id_secret_shape_and_its_entry_authenticates(tmp_path: Path) -> None:
    from gateway.admin.auth import Principal, TokenVerifier

    completed = run_gateway("hash-token", "--generate", "--name", "ci-bot", "--role", "developer")
    assert completed.returncode == 0, completed.stderr
    token = completed.stdout.splitlines()[0].removeprefix("token: ")
    match = re.fullmatch(r"gwadm_([a-z0-9]{8})_([A-Za-z0-9_-]{43})", token)
    assert match, token
    entry = _entry_of(completed.stdout)
    assert entry["id"] == match[1]
    assert token not in completed.stderr and match[2] not in entry["hash"]
    raw = valid_raw()
    raw["admin"]["tokens"] = [entry]
    cfg = config_mod.load(write(tmp_path, raw), {})
    assert cfg.admin.tokens[0].id == match[1]
    verifier = TokenVerifier(cfg.admin.tokens)
    try:
        assert await verifier.verify(token, "127.0.0.1") == Principal("ci-bot", "developer")
        assert await verifier.verify(token[:-1] + ("A" if token[-1] != "A" else "B"), "127.0.0.1") is None
    finally:
        verifier.close()


def test_hash_token_takes_the_id_to_generate_with_and_refuses_a_bad_one() -> None:
    completed = run_gateway("hash-token", "--generate", "--id", "ci2027")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("token: gwadm_ci2027_")
    assert _entry_of(completed.stdout)["id"] == "ci2027"
    for bad in ("CI", "ab", "has_underscore", "x" * 33):
        refused = run_gateway("hash-token", "--generate", "--id", bad)
        assert refused.returncode == 2 and "--id" in refused.stderr and "$argon2id$" not in refused.stdout


def test_hash_token_reads_the_id_of_a_new_shape_token_and_notes_a_legacy_one() -> None:
    shaped = "gwadm_mine1_" + "s" * 43
    completed = run_gateway("hash-token", "--name", "mine", stdin=shaped + "\n")
    assert completed.returncode == 0, completed.stderr
    (entry,) = yaml.safe_load(completed.stdout)
    assert entry["id"] == "mine1" and PasswordHasher().verify(entry["hash"], shaped)
    assert shaped not in completed.stdout + completed.stderr
    legacy = "an-old-admin-token-" + "y" * 20
    completed = run_gateway("hash-token", stdin=legacy + "\n")
    assert completed.returncode == 0, completed.stderr
    (entry,) = yaml.safe_load(completed.stdout)
    assert "id" not in entry
    assert "legacy" in completed.stderr and "--generate" in completed.stderr
    assert legacy not in completed.stdout + completed.stderr


# the typed schema ----------------------------------------------------------------------------


def _types_in(hint: object) -> list[object]:
    """`hint` and every type argument inside it."""
    return [hint, *(t for arg in typing.get_args(hint) for t in _types_in(arg))]


def test_no_config_object_has_a_field_typed_any() -> None:
    objects = [
        config_mod.Config, config_mod.Listen, config_mod.AdminConfig, config_mod.AdminToken, config_mod.RedisConfig,
        config_mod.CacheConfig, config_mod.KeysConfig, config_mod.Route, config_mod.LoggingConfig,
        config_mod.LimitsConfig, config_mod.LifecycleConfig,
    ]  # fmt: skip
    for cls in objects:
        for name, hint in typing.get_type_hints(cls).items():
            assert typing.Any not in _types_in(hint), f"{cls.__name__}.{name}: {hint}"


def test_the_vocabulary_tuples_match_their_literals() -> None:
    assert config_mod.ROLES == typing.get_args(config_mod.Role)
    assert config_mod.ROUTE_AUTHS == typing.get_args(config_mod.RouteAuth)
    assert config_mod.LOG_LEVELS == typing.get_args(config_mod.LogLevel)
    assert config_mod.LOG_FORMATS == typing.get_args(config_mod.LogFormat)
    assert config_mod.DISABLED_STATUSES == typing.get_args(config_mod.DisabledStatus)
    hints = typing.get_type_hints(config_mod.Route)
    assert hints["auth"] == config_mod.RouteAuth
    assert typing.get_type_hints(config_mod.AdminToken)["role"] == config_mod.Role


def test_every_environment_override_names_a_key_the_schema_knows() -> None:
    for var in config_mod.ENV_OVERRIDES:
        try:
            config_mod.load(SHIPPED, {var: "[not, valid, here]"})
        except ConfigError as exc:
            assert not [p for p in exc.problems if "unknown key" in p.rule], var


def test_problems_come_in_the_order_the_schema_declares_whatever_the_file_order(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["routes"][0] = {"max_body_bytes": -1, "auth": "sometimes", "path_prefix": "x", "name": "a b", "upstream": "u"}
    problems, _ = problems_of(write(tmp_path, raw))
    assert [p.path for p in problems] == [
        "routes[0].name", "routes[0].path_prefix", "routes[0].upstream", "routes[0].auth", "routes[0].max_body_bytes",
    ]  # fmt: skip
    assert problems[3].rule == "must be one of: required, none"


@pytest.mark.parametrize("key_path", ["cache.ttl_seconds", "limits.keepalive_seconds", "lifecycle.drain_seconds"])
def test_a_number_that_is_not_a_number_is_a_problem(tmp_path: Path, key_path: str) -> None:
    section, key = key_path.split(".")
    raw = valid_raw()
    raw[section] = {key: float("nan")}
    problems, _ = problems_of(write(tmp_path, raw))
    assert [(p.path, repr(p.value)) for p in problems] == [(key_path, "nan")]
    assert problems[0].rule.startswith("must be between ")


def test_a_problem_inside_a_value_from_the_environment_names_the_variable() -> None:
    tokens = yaml.safe_dump([{"name": "ci", "role": "boss", "hash": f"$2b$12${SECRET}"}])
    problems, text = problems_of(SHIPPED, {"GATEWAY_ADMIN_TOKENS": tokens, "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8, x"})
    assert [p.path for p in problems] == [
        "admin.tokens[0].role (from GATEWAY_ADMIN_TOKENS)",
        "admin.tokens[0].hash (from GATEWAY_ADMIN_TOKENS)",
        "trusted_proxies[1] (from GATEWAY_TRUSTED_PROXIES)",
    ]
    assert SECRET not in text


def test_an_admin_token_entry_that_is_not_a_mapping_is_a_problem(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["admin"]["tokens"].append(None)
    problems, _ = problems_of(write(tmp_path, raw))
    assert [(p.path, p.value, p.rule) for p in problems] == [("admin.tokens[1]", "NoneType", "must be a mapping")]


def test_tokens_without_names_are_not_reported_as_duplicates(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["admin"]["tokens"] = [{"role": "admin", "hash": TOKEN_HASH}, {"role": "viewer", "hash": TOKEN_HASH}]
    problems, _ = problems_of(write(tmp_path, raw))
    assert [(p.path, p.rule) for p in problems] == [
        ("admin.tokens[0].name", "is required"),
        ("admin.tokens[1].name", "is required"),
    ]


def test_the_port_check_across_listeners_uses_only_valid_ports(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["admin"]["listen"] = {"host": "not a host", "port": 8080}  # a broken host: the clash is still found
    problems, _ = problems_of(write(tmp_path, raw))
    assert [p.path for p in problems] == ["admin.listen.host", "admin.listen.port"]
    assert "must differ from listen.port" in problems[1].rule
    raw["admin"]["listen"] = {"port": "8081x"}  # a broken port is not compared as its default
    raw["listen"]["port"] = 8081
    problems, _ = problems_of(write(tmp_path, raw))
    assert [(p.path, p.value, p.rule) for p in problems] == [("admin.listen.port", "8081x", "must be an integer")]


def test_literal_fields_load_as_their_values(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["logging"] = {"level": "debug", "format": "text"}
    raw["keys"] = {"disabled_status": 401}
    raw["routes"][0]["auth"] = "none"
    cfg = config_mod.load(write(tmp_path, raw), {})
    assert (cfg.logging.level, cfg.logging.format, cfg.keys.disabled_status) == ("debug", "text", 401)
    assert not cfg.routes[0].requires_key
