"""The production Redis settings (spec 13): `redis.sentinel`, `redis+sentinel://` URLs, the password,
`redis.min_replicas_acked`, and secrets read from files (`GATEWAY_X_FILE`, as Kubernetes mounts a
Secret). Pure: the config is parsed, nothing connects (tests/test_sentinel.py runs real Sentinels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as config_mod
from gateway.config import SentinelConfig
from tests.test_config import SECRET, only_problem, problems_of, valid_raw, write

SENTINELS = ["10.1.0.1:26379", "sentinel-2.redis", "[fd00::3]:26380"]


def load(tmp_path: Path, raw: dict[str, Any], environ: dict[str, str] | None = None) -> config_mod.Config:
    return config_mod.load(write(tmp_path, raw), environ or {})


def test_a_sentinel_section_names_the_master_and_the_sentinels(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["redis"] = {
        "sentinel": {"master_name": "gw-main", "sentinels": SENTINELS, "password": SECRET, "tls": True},
        "password": SECRET + "x",
        "min_replicas_acked": 1,
    }
    redis = load(tmp_path, raw).redis
    assert redis.sentinel == SentinelConfig(
        "gw-main", (("10.1.0.1", 26379), ("sentinel-2.redis", 26379), ("fd00::3", 26380)), SECRET, True
    )
    assert (redis.url, redis.embedded, redis.password, redis.min_replicas_acked) == (None, False, SECRET + "x", 1)
    assert redis.min_replicas_timeout_seconds == 0.5
    assert SECRET not in repr(redis)


def test_a_sentinel_url_is_the_same_settings_in_one_line(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["redis"] = {"url": f"rediss+sentinel://:{SECRET}@10.1.0.1:26379,sentinel-2.redis/gw-main"}
    redis = load(tmp_path, raw).redis
    assert redis.sentinel == SentinelConfig("gw-main", (("10.1.0.1", 26379), ("sentinel-2.redis", 26379)), None, True)
    assert (redis.url, redis.password) == (None, SECRET)


def test_sentinels_can_come_from_the_environment_as_one_comma_separated_string(tmp_path: Path) -> None:
    raw = valid_raw()
    del raw["redis"]["url"]
    env = {"GATEWAY_REDIS_SENTINEL_MASTER_NAME": "gw", "GATEWAY_REDIS_SENTINEL_SENTINELS": "a:1,b:2"}
    assert load(tmp_path, raw, env).redis.sentinel == SentinelConfig("gw", (("a", 1), ("b", 2)))


@pytest.mark.parametrize(
    ("redis", "path", "rule"),
    [
        ({"sentinel": {"sentinels": SENTINELS}}, "redis.sentinel.master_name", "is required"),
        ({"sentinel": {"master_name": "m"}}, "redis.sentinel.sentinels", "is required"),
        ({"sentinel": {"master_name": "m", "sentinels": []}}, "redis.sentinel.sentinels", "host:port"),
        ({"sentinel": {"master_name": "m", "sentinels": ["h:99999"]}}, "redis.sentinel.sentinels", "host:port"),
        ({"sentinel": {"master_name": "m", "sentinels": ["h:1"]}, "url": "redis://h:6379"}, "redis.sentinel",
         "not both"),
        ({"url": "redis+sentinel://h:1,h:2"}, "redis.url", "master name"),
        ({"url": "redis+sentinel://h:x/m"}, "redis.url", "host:port"),
        ({"url": "redis://:pw@h:6379", "password": "other"}, "redis.password", "not both"),
        ({"password": "pw"}, "redis.password", "external Redis"),
        ({"min_replicas_acked": 1}, "redis.min_replicas_acked", "embedded"),
        ({"url": "redis://h", "min_replicas_acked": -1}, "redis.min_replicas_acked", "between 0 and 16"),
        ({"url": "redis://h", "min_replicas_timeout_seconds": 2}, "redis.min_replicas_timeout_seconds", "between"),
    ],
)  # fmt: skip
def test_a_broken_redis_topology_is_a_clear_problem(
    tmp_path: Path, redis: dict[str, Any], path: str, rule: str
) -> None:
    raw = valid_raw()
    raw["redis"] = redis
    problems, text = problems_of(write(tmp_path, raw))
    assert rule in only_problem(problems, path).rule, text
    assert "pw" not in text.replace("password", "")


def test_the_sentinel_password_is_never_echoed(tmp_path: Path) -> None:
    raw = valid_raw()
    raw["redis"] = {"sentinel": {"master_name": "m", "sentinels": "not a list", "password": [SECRET]}}
    problems, text = problems_of(write(tmp_path, raw))
    assert only_problem(problems, "redis.sentinel.password")
    assert SECRET not in text


# secrets from files ---------------------------------------------------------------------------


def test_secrets_come_from_files_as_kubernetes_mounts_them(tmp_path: Path) -> None:
    tokens = yaml.safe_load(yaml.safe_dump(valid_raw()["admin"]["tokens"]))
    files = {
        "GATEWAY_REDIS_CHANNEL_SECRET_FILE": (tmp_path / "channel", SECRET + "\n"),
        "GATEWAY_REDIS_PASSWORD_FILE": (tmp_path / "password", "p@ss word\n"),
        "GATEWAY_ADMIN_TOKENS_FILE": (tmp_path / "tokens", yaml.safe_dump(tokens)),
        "GATEWAY_REDIS_URL_FILE": (tmp_path / "url", "redis://redis.internal:6379/0"),
    }
    for path, text in files.values():
        path.write_text(text)
    raw = valid_raw()
    raw["admin"]["tokens"] = []
    config = load(tmp_path, raw, {var: str(path) for var, (path, _) in files.items()})
    assert config.redis.channel_secret == SECRET  # one trailing newline dropped, nothing else
    assert config.redis.password == "p@ss word"
    assert config.redis.url == "redis://redis.internal:6379/0"
    assert [t.hash for t in config.admin.tokens] == [t["hash"] for t in tokens]


def test_a_secret_file_that_cannot_be_read_or_is_given_twice_is_a_problem_that_shows_no_secret(
    tmp_path: Path,
) -> None:
    present = tmp_path / "secret"
    present.write_text(SECRET)
    environ = {
        "GATEWAY_REDIS_CHANNEL_SECRET_FILE": str(tmp_path / "missing"),
        "GATEWAY_REDIS_PASSWORD_FILE": str(present),
        "GATEWAY_REDIS_PASSWORD": SECRET,
    }
    problems, text = problems_of(write(tmp_path, valid_raw()), environ)
    assert "cannot be read" in only_problem(problems, "GATEWAY_REDIS_CHANNEL_SECRET_FILE").rule
    assert "not both" in only_problem(problems, "GATEWAY_REDIS_PASSWORD_FILE").rule
    assert SECRET not in text


def test_a_bad_value_from_a_secret_file_names_the_file_variable_and_hides_the_value(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort")
    problems, text = problems_of(write(tmp_path, valid_raw()), {"GATEWAY_REDIS_CHANNEL_SECRET_FILE": str(short)})
    problem = only_problem(problems, "redis.channel_secret (from GATEWAY_REDIS_CHANNEL_SECRET_FILE)")
    assert "16 characters" in problem.rule
    assert "tooshort" not in text


def test_every_secret_file_variant_names_an_environment_override() -> None:
    assert set(config_mod.FILE_VARIANTS) <= set(config_mod.ENV_OVERRIDES)
    assert all(not var.endswith("_FILE") for var in config_mod.ENV_OVERRIDES)
