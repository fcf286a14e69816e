"""The configuration file (spec 3): loaded into typed, frozen objects.

Loading is separate from validation, and validation collects every problem
before reporting: each names the file, the key path, the value and the rule.
Environment variables override file values (`ENV_OVERRIDES`); `environ` is an
argument so tests pass a dict.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

ROLES: Final = ("viewer", "developer", "admin")
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
_ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SCOPE_RULE = re.compile(r"[A-Za-z0-9_.:/*-]{1,128}")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    role: str
    hash: str = field(repr=False)
    # The `<id>` of a `gwadm_<id>_<secret>` token (spec 7): selects this entry without argon2 work.
    # None: a token from before the shape existed, verified the old way (see docs, migration).
    id: str | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen
    tokens: tuple[AdminToken, ...]
    propagation_timeout_seconds: float = 1.0


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str | None  # None: embedded
    prefix: str
    channel_secret: str | None = field(repr=False)
    data_dir: Path
    health_check_seconds: float = 1.0
    # Trust in the cache is a lease (spec 8): a PING sent at t whose reply came back on the
    # subscription lets the replica answer from its cache until t + lease_seconds.
    lease_seconds: float = 1.0

    @property
    def embedded(self) -> bool:
        return self.url is None


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl_seconds: float
    negative_ttl_seconds: float
    max_entries: int
    serve_stale_seconds: float
    key_filter: bool = True


@dataclass(frozen=True, slots=True)
class KeysConfig:
    allow_reenable: bool
    disabled_status: int


DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    path_prefix: str
    upstream: str
    strip_prefix: bool
    methods: frozenset[str] | None  # None: all
    auth: str  # "required" | "none"
    scopes: tuple[str, ...]
    timeout_seconds: float
    forward_authorization: bool
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a request body larger than this is 413 body_too_large

    @property
    def requires_key(self) -> bool:
        return self.auth == "required"


LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "text")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "json"  # one JSON object per line, as container log collectors expect


MAX_SAFE_LENGTH: Final = 2**53  # no Content-Length above this is ever honoured (spec 6)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """What a client may hold of the proxy listener (spec 6); defaults for a public edge."""

    header_timeout_seconds: float = 10.0  # the whole request head, from its first byte (not reset per byte)
    max_header_bytes: int = 32 * 1024  # the whole head: request line and every field
    max_headers: int = 100  # header fields in one request
    max_connections: int = 10_000  # client connections open at once; more are closed on accept
    body_timeout_seconds: float = 30.0  # no byte of a request body for this long: 408, at once
    keepalive_seconds: float = 75.0  # an idle client connection is closed after this


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    drain_seconds: float = 20.0  # SIGTERM: how long in-flight requests may take to finish


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen
    admin: AdminConfig
    redis: RedisConfig
    cache: CacheConfig
    keys: KeysConfig
    routes: tuple[Route, ...]
    source: str = "<config>"
    logging: LoggingConfig = LoggingConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    limits: LimitsConfig = LimitsConfig()
    # Peers (CIDR) whose Forwarded / X-Forwarded-* / X-Real-IP headers are believed (spec 6).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    value: object
    rule: str

    def format(self, source: str) -> str:
        shown = repr(self.value)
        return f"{source}: {self.path}: {shown}: {self.rule}"


class ConfigError(ValueError):
    """Every problem found in one configuration, reported together."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.format(source) for p in problems))


class _Shown:
    """A value placeholder in problem reports: printed as its label, without quotes."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __repr__(self) -> str:
        return self.label


_ABSENT: Final = _Shown("(absent)")
_SECRET: Final = _Shown("(secret)")
# An unknown key's value is not echoed: a misspelt secret key must not print the secret.
_NOT_SHOWN: Final = _Shown("(value not shown)")

# Environment variable -> key path in the file. Values are parsed as YAML scalars
# (so "8080" is a number and "false" a boolean) and then validated like the file.
ENV_OVERRIDES: Final[dict[str, tuple[str, ...]]] = {
    "GATEWAY_LISTEN_HOST": ("listen", "host"),
    "GATEWAY_LISTEN_PORT": ("listen", "port"),
    "GATEWAY_ADMIN_LISTEN_HOST": ("admin", "listen", "host"),
    "GATEWAY_ADMIN_LISTEN_PORT": ("admin", "listen", "port"),
    "GATEWAY_ADMIN_TOKENS": ("admin", "tokens"),
    "GATEWAY_ADMIN_PROPAGATION_TIMEOUT_SECONDS": ("admin", "propagation_timeout_seconds"),
    "GATEWAY_REDIS_URL": ("redis", "url"),
    "GATEWAY_REDIS_PREFIX": ("redis", "prefix"),
    "GATEWAY_REDIS_CHANNEL_SECRET": ("redis", "channel_secret"),
    "GATEWAY_REDIS_DATA_DIR": ("redis", "data_dir"),
    "GATEWAY_REDIS_HEALTH_CHECK_SECONDS": ("redis", "health_check_seconds"),
    "GATEWAY_CACHE_TTL_SECONDS": ("cache", "ttl_seconds"),
    "GATEWAY_CACHE_NEGATIVE_TTL_SECONDS": ("cache", "negative_ttl_seconds"),
    "GATEWAY_CACHE_MAX_ENTRIES": ("cache", "max_entries"),
    "GATEWAY_CACHE_SERVE_STALE_SECONDS": ("cache", "serve_stale_seconds"),
    "GATEWAY_CACHE_KEY_FILTER": ("cache", "key_filter"),
    "GATEWAY_KEYS_ALLOW_REENABLE": ("keys", "allow_reenable"),
    "GATEWAY_KEYS_DISABLED_STATUS": ("keys", "disabled_status"),
    "GATEWAY_LOGGING_LEVEL": ("logging", "level"),
    "GATEWAY_LOGGING_FORMAT": ("logging", "format"),
    "GATEWAY_LIFECYCLE_DRAIN_SECONDS": ("lifecycle", "drain_seconds"),
    "GATEWAY_REDIS_LEASE_SECONDS": ("redis", "lease_seconds"),
    "GATEWAY_LIMITS_HEADER_TIMEOUT_SECONDS": ("limits", "header_timeout_seconds"),
    "GATEWAY_LIMITS_MAX_HEADER_BYTES": ("limits", "max_header_bytes"),
    "GATEWAY_LIMITS_MAX_HEADERS": ("limits", "max_headers"),
    "GATEWAY_LIMITS_MAX_CONNECTIONS": ("limits", "max_connections"),
    "GATEWAY_LIMITS_BODY_TIMEOUT_SECONDS": ("limits", "body_timeout_seconds"),
    "GATEWAY_LIMITS_KEEPALIVE_SECONDS": ("limits", "keepalive_seconds"),
    "GATEWAY_TRUSTED_PROXIES": ("trusted_proxies",),
}
# Values that are secrets: never echoed in a problem report.
_SECRET_PATHS: Final = {("redis", "channel_secret"), ("redis", "url")}


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, validate. Raises ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [Problem("(file)", _ABSENT, f"cannot be read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(source, [Problem("(file)", _ABSENT, "is not UTF-8 text")]) from None
    return parse(text, source=source, environ=environ)


def parse(text: str, *, source: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(source, [Problem(where, _ABSENT, f"not valid YAML: {problem}")]) from None
    if raw is None:
        raw = {}
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        raise ConfigError(source, [Problem("(root)", type(raw).__name__, "must be a mapping of keys")])
    from_env = _apply_env(raw, environ or {}, problems)
    config = _Validator(problems).config(raw, source)
    if problems:
        problems = [
            Problem(f"{p.path} (from {from_env[p.path]})", p.value, p.rule) if p.path in from_env else p
            for p in problems
        ]
        raise ConfigError(source, problems)
    assert config is not None
    return config


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], problems: list[Problem]) -> dict[str, str]:
    """Write overrides into the raw mapping; returns key path -> the variable that set it."""
    applied: dict[str, str] = {}
    for var, path in ENV_OVERRIDES.items():
        if var not in environ:
            continue
        text = environ[var]
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            shown: object = _SECRET if path in _SECRET_PATHS else text
            problems.append(Problem(var, shown, "not a valid value"))
            continue
        if path in {("redis", "url"), ("redis", "channel_secret"), ("redis", "prefix")}:
            value = text  # strings verbatim: a secret like "123" stays a string
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
        applied[".".join(path)] = var
    return applied


class _Validator:
    """Walks the raw mapping once, appending a Problem for every violation."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def bad(self, path: str, value: object, rule: str) -> None:
        self.problems.append(Problem(path, value, rule))

    def section(self, raw: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.bad(path, type(raw).__name__, "must be a mapping")
            return {}
        for key in raw:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.bad(where, _NOT_SHOWN, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return raw

    def value(
        self,
        raw: dict[str, Any],
        key: str,
        path: str,
        kind: type | tuple[type, ...],
        default: Any = _ABSENT,
        check: Callable[[Any], str | None] | None = None,
        secret: bool = False,
    ) -> Any:
        where = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            if default is _ABSENT:
                self.bad(where, _ABSENT, "is required")
                return None
            return default
        value = raw[key]
        shown = _SECRET if secret else value
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a port of `true` is still wrong.
        if isinstance(value, bool) and bool not in kinds:
            self.bad(where, shown, f"must be {_kind_name(kinds)}")
            return default
        if float in kinds and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kinds):
            self.bad(where, shown, f"must be {_kind_name(kinds)}")
            return default
        if check is not None:
            rule = check(value)
            if rule is not None:
                self.bad(where, shown, rule)
                return default
        return value

    # sections -------------------------------------------------------------

    def config(self, raw: dict[str, Any], source: str) -> Config | None:
        sections = {"listen", "admin", "redis", "cache", "keys", "routes", "logging", "lifecycle", "limits"}
        self.section(raw, "", sections | {"trusted_proxies"})
        listen = self.listen(raw.get("listen"), "listen", Listen("0.0.0.0", 8080))
        admin = self.admin(raw.get("admin"))
        if admin is not None and listen is not None and admin.listen.port == listen.port != 0:
            self.bad(
                "admin.listen.port",
                admin.listen.port,
                "must differ from listen.port: the admin API never shares the proxy port",
            )
        redis = self.redis(raw.get("redis"))
        cache = self.cache(raw.get("cache"))
        keys = self.keys(raw.get("keys"))
        routes = self.routes(raw.get("routes"))
        logs = self.logging(raw.get("logging"))
        lifecycle = self.lifecycle(raw.get("lifecycle"))
        limits = self.limits(raw.get("limits"))
        trusted = self.trusted_proxies(raw.get("trusted_proxies"))
        if self.problems:
            return None
        assert listen and admin and redis and cache and keys and logs and lifecycle and limits
        return Config(listen, admin, redis, cache, keys, routes, source, logs, lifecycle, limits, trusted)

    def limits(self, raw: Any) -> LimitsConfig | None:
        d = LimitsConfig()
        sec = self.section(
            raw,
            "limits",
            {"header_timeout_seconds", "max_header_bytes", "max_headers", "max_connections",
             "body_timeout_seconds", "keepalive_seconds"},
        )  # fmt: skip
        head = self.value(sec, "header_timeout_seconds", "limits", float, d.header_timeout_seconds, _range(0.1, 3600))
        size = self.value(sec, "max_header_bytes", "limits", int, d.max_header_bytes, _range(1024, 1024 * 1024))
        count = self.value(sec, "max_headers", "limits", int, d.max_headers, _range(8, 10_000))
        conns = self.value(sec, "max_connections", "limits", int, d.max_connections, _range(1, 1_000_000))
        body = self.value(sec, "body_timeout_seconds", "limits", float, d.body_timeout_seconds, _range(0.1, 3600))
        idle = self.value(sec, "keepalive_seconds", "limits", float, d.keepalive_seconds, _range(0.1, 3600))
        if None in (head, size, count, conns, body, idle):
            return None
        return LimitsConfig(head, size, count, conns, body, idle)

    def trusted_proxies(self, raw: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        if raw is None:
            return ()
        if isinstance(raw, str):  # GATEWAY_TRUSTED_PROXIES="10.0.0.0/8, 192.168.0.0/16"
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list):
            self.bad("trusted_proxies", type(raw).__name__, "must be a list of CIDR networks")
            return ()
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for i, item in enumerate(raw):
            try:
                out.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                self.bad(f"trusted_proxies[{i}]", item, "must be a CIDR network such as 10.0.0.0/8 or an address")
        return tuple(out)

    def logging(self, raw: Any) -> LoggingConfig | None:
        sec = self.section(raw, "logging", {"level", "format"})
        level = self.value(sec, "level", "logging", str, "info", _one_of(LOG_LEVELS))
        fmt = self.value(sec, "format", "logging", str, "json", _one_of(LOG_FORMATS))
        if level is None or fmt is None:
            return None
        return LoggingConfig(level, fmt)

    def lifecycle(self, raw: Any) -> LifecycleConfig | None:
        sec = self.section(raw, "lifecycle", {"drain_seconds"})
        drain = self.value(sec, "drain_seconds", "lifecycle", float, 20.0, _range(0, 3600))
        return None if drain is None else LifecycleConfig(drain)

    def listen(self, raw: Any, path: str, default: Listen) -> Listen | None:
        sec = self.section(raw, path, {"host", "port"})
        host = self.value(sec, "host", path, str, default.host, _check_host)
        port = self.value(sec, "port", path, int, default.port, _check_port)
        if host is None or port is None:
            return None
        return Listen(host, port)

    def admin(self, raw: Any) -> AdminConfig | None:
        sec = self.section(raw, "admin", {"listen", "tokens", "propagation_timeout_seconds"})
        wait = self.value(sec, "propagation_timeout_seconds", "admin", float, 1.0, _range(0, 30))
        listen = self.listen(sec.get("listen"), "admin.listen", Listen("127.0.0.1", 8081))
        tokens_raw = sec.get("tokens") or []
        tokens: list[AdminToken] = []
        if not isinstance(tokens_raw, list):
            self.bad("admin.tokens", type(tokens_raw).__name__, "must be a list of {name, role, hash}")
            tokens_raw = []
        names: set[str] = set()
        ids: set[str | None] = set()
        for i, item in enumerate(tokens_raw):
            path = f"admin.tokens[{i}]"
            tsec = self.section(item, path, {"name", "role", "hash", "id"})
            if not isinstance(item, dict):
                continue
            token_id = self.value(tsec, "id", path, str, None, _check_token_id)
            if token_id is not None and token_id in ids:
                self.bad(f"{path}.id", token_id, "duplicate token id")
            ids.add(token_id)
            name = self.value(tsec, "name", path, str, check=_check_name)
            role = self.value(tsec, "role", path, str, check=_one_of(ROLES))
            digest = self.value(tsec, "hash", path, str, check=_check_argon2id, secret=True)
            if name in names:
                self.bad(f"{path}.name", name, "duplicate token name")
            names.add(name)
            if name and role and digest:
                tokens.append(AdminToken(name, role, digest, token_id))
        if listen is None or wait is None:
            return None
        return AdminConfig(listen, tuple(tokens), wait)

    def redis(self, raw: Any) -> RedisConfig | None:
        sec = self.section(
            raw, "redis", {"url", "prefix", "channel_secret", "data_dir", "health_check_seconds", "lease_seconds"}
        )
        url = self.value(sec, "url", "redis", str, "embedded", _check_redis_url, secret=True)
        prefix = self.value(sec, "prefix", "redis", str, "gw:", _check_prefix)
        secret = self.value(sec, "channel_secret", "redis", str, None, _check_secret, secret=True)
        data_dir = self.value(sec, "data_dir", "redis", str, "./.gateway-data", _nonempty)
        health = self.value(sec, "health_check_seconds", "redis", float, 1.0, _range(0.05, 60))
        lease = self.value(sec, "lease_seconds", "redis", float, 1.0, _range(0.05, 60))
        if url is None or prefix is None or data_dir is None or health is None or lease is None:
            return None
        return RedisConfig(None if url == "embedded" else url, prefix, secret, Path(data_dir), health, lease)

    def cache(self, raw: Any) -> CacheConfig | None:
        names = {"ttl_seconds", "negative_ttl_seconds", "max_entries", "serve_stale_seconds", "key_filter"}
        sec = self.section(raw, "cache", names)
        ttl = self.value(sec, "ttl_seconds", "cache", float, 30.0, _range(0, 86400))
        neg = self.value(sec, "negative_ttl_seconds", "cache", float, 2.0, _range(0, 3600))
        size = self.value(sec, "max_entries", "cache", int, 100_000, _range(1, 100_000_000))
        stale = self.value(sec, "serve_stale_seconds", "cache", float, 0.0, _range(0, 3600))
        key_filter = self.value(sec, "key_filter", "cache", bool, True)
        if None in (ttl, neg, size, stale, key_filter):
            return None
        return CacheConfig(ttl, neg, size, stale, key_filter)

    def keys(self, raw: Any) -> KeysConfig | None:
        sec = self.section(raw, "keys", {"allow_reenable", "disabled_status"})
        allow = self.value(sec, "allow_reenable", "keys", bool, True)
        status = self.value(sec, "disabled_status", "keys", int, 403, _one_of((401, 403)))
        if allow is None or status is None:
            return None
        return KeysConfig(allow, status)

    def routes(self, raw: Any) -> tuple[Route, ...]:
        if raw is None:
            self.bad("routes", _ABSENT, "is required: a list of at least one route")
            return ()
        if not isinstance(raw, list) or not raw:
            self.bad("routes", raw if not isinstance(raw, list) else [], "must be a non-empty list of routes")
            return ()
        routes: list[Route] = []
        names: set[str] = set()
        prefixes: set[str] = set()
        for i, item in enumerate(raw):
            route = self.route(item, f"routes[{i}]")
            if route is None:
                continue
            if route.name in names:
                self.bad(f"routes[{i}].name", route.name, "duplicate route name")
            if route.path_prefix in prefixes:
                self.bad(
                    f"routes[{i}].path_prefix",
                    route.path_prefix,
                    "duplicate path_prefix: another route already claims it",
                )
            names.add(route.name)
            prefixes.add(route.path_prefix)
            routes.append(route)
        return tuple(routes)

    def route(self, raw: Any, path: str) -> Route | None:
        allowed = {
            "name", "path_prefix", "upstream", "strip_prefix", "methods", "auth",
            "scopes", "timeout_seconds", "forward_authorization", "max_body_bytes",
        }  # fmt: skip
        if not isinstance(raw, dict):
            self.bad(path, type(raw).__name__, "must be a mapping")
            return None
        sec = self.section(raw, path, allowed)
        before = len(self.problems)
        name = self.value(sec, "name", path, str, check=_check_route_name)
        prefix = self.value(sec, "path_prefix", path, str, check=_check_path_prefix)
        upstream = self.value(sec, "upstream", path, str, check=_check_upstream)
        strip = self.value(sec, "strip_prefix", path, bool, False)
        methods = self.value(sec, "methods", path, list, None, _check_methods)
        auth = self.value(sec, "auth", path, str, "required", _one_of(("required", "none")))
        scopes = self.value(sec, "scopes", path, list, [], _check_scopes)
        timeout = self.value(sec, "timeout_seconds", path, float, 30.0, _range(0.001, 3600, low_open=False))
        fwd = self.value(sec, "forward_authorization", path, bool, False)
        max_body = self.value(sec, "max_body_bytes", path, int, DEFAULT_MAX_BODY_BYTES, _range(0, MAX_SAFE_LENGTH))
        if auth == "none" and scopes:
            self.bad(f"{path}.scopes", scopes, "a public route (auth: none) cannot require scopes")
        if len(self.problems) != before:
            return None
        return Route(
            name=name,
            path_prefix=prefix,
            upstream=upstream.rstrip("/"),
            strip_prefix=strip,
            methods=frozenset(m.upper() for m in methods) if methods is not None else None,
            auth=auth,
            scopes=tuple(scopes),
            timeout_seconds=timeout,
            forward_authorization=fwd,
            max_body_bytes=max_body,
        )


# rules: each returns None when the value passes, else the rule it breaks ---------


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a mapping"}  # fmt: skip
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _check_name(v: str) -> str | None:
    return None if _ROUTE_NAME.fullmatch(v) else "must be 1-64 letters, digits, '_', '.', '-'"


_check_route_name = _check_name


def _check_host(v: str) -> str | None:
    if not v:
        return "must not be empty"
    try:
        ipaddress.ip_address(v)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", v):
            return "must be an IP address or a host name"
    return None


def _check_port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number from 0 to 65535"


def _range(low: float, high: float, *, low_open: bool = False) -> Callable[[float], str | None]:
    def check(v: float) -> str | None:
        if v < low or v > high or (low_open and v == low):
            return f"must be between {low:g} and {high:g}"
        return None

    return check


def _one_of(options: tuple[Any, ...]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else "must be one of: " + ", ".join(str(o) for o in options)

    return check


def _check_argon2id(v: str) -> str | None:
    if not v.startswith("$argon2id$"):
        return "must be an argon2id hash (make one with `gateway hash-token`)"
    return None


def _check_token_id(v: str) -> str | None:
    if not re.fullmatch(r"[a-z0-9]{4,32}", v):
        return "must be 4-32 lowercase letters and digits (the <id> of gwadm_<id>_<secret>)"
    return None


def _check_redis_url(v: str) -> str | None:
    if v == "embedded":
        return None
    parts = urlsplit(v)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "must be 'embedded' or a redis://, rediss:// or unix:// URL"
    if parts.scheme != "unix" and not parts.hostname:
        return "must name a host"
    return None


def _check_prefix(v: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9_.:{}-]{1,64}", v):
        return "must be 1-64 characters from A-Z a-z 0-9 _ . : - { }"
    return None


def _check_secret(v: str) -> str | None:
    return None if len(v) >= 16 else "must be at least 16 characters"


def _check_path_prefix(v: str) -> str | None:
    if not v.startswith("/"):
        return "must start with '/'"
    if v != "/" and v.endswith("/"):
        return "must not end with '/' (prefixes match on segment boundaries already)"
    segments = v.split("/")[1:]
    if v != "/" and any(s in ("", ".", "..") for s in segments):
        return "must be a normalised path (no empty, '.' or '..' segments)"
    if any(c in v for c in "?#%\\") or any(ord(c) < 0x21 or ord(c) == 0x7F for c in v):
        return "must be a plain path: no '?', '#', '%', '\\', spaces or control characters"
    return None


def _check_upstream(v: str) -> str | None:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.query or parts.fragment or parts.username or parts.password:
        return "must not carry a query, fragment or credentials"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "has an invalid port"
    return None


def _check_methods(v: list[Any]) -> str | None:
    if not v:
        return "must list at least one method (leave it out to allow all)"
    for m in v:
        if not isinstance(m, str) or m.upper() not in METHODS:
            return "must list HTTP methods from: " + ", ".join(sorted(METHODS))
    return None


def _check_scopes(v: list[Any]) -> str | None:
    for s in v:
        if not isinstance(s, str) or not SCOPE_RULE.fullmatch(s):
            return "must be a list of scope names (letters, digits, _ . : / * -)"
    return None
