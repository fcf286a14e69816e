"""The configuration file (spec 3): loaded into typed, frozen objects.

Loading is separate from validation, and validation collects every problem
before reporting: each names the file, the key path, the value and the rule.
Environment variables override file values (`ENV_OVERRIDES`); `environ` is an
argument so tests pass a dict.

Each section of the file is declared once, as a schema class (`_Listen`,
`_Redis`, `_Route`, ...): one typed `_Field` per key with its kind, default,
rules and whether it is a secret. Opening a section checks every field in the
order declared and records a `Problem` for each broken one; the section's
object is built only when none is broken, from values read back with their
types (`_Field[T, D]` yields `T | D`), so no `Any` reaches a config object.

Why not pydantic v2 (evaluated on 2.14 with pydantic-core 2.50): its errors
carry what ours need (a location, the input, a message) but not in our shape
("admin.tokens.0.hash" for "admin.tokens[0].hash", "Input should be a valid
number" with a link to errors.pydantic.dev), and it echoes inputs we must not
print: `SecretStr` hides a valid string, but a secret of the wrong type (a
list holding it) and the value under a misspelt key (`extra="forbid"`) are
shown in full. Keeping today's report would mean a translation layer over its
error types, custom validators for every rule here (path prefixes, upstream
URLs, argon2id hashes, host names) and our own env-var note, so we would still
own a table of rules, plus a dependency of about 10 MB (a compiled core)
costing about 200 ms to import and tens of milliseconds to build the models on
every `gateway` start (measured on this machine; PyYAML and the standard
library modules used here take about 50 ms). The schema below is some 120
lines of standard library; mypy checks it strictly.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final, Generic, Literal, Never, TypeAlias, TypeGuard, TypeVar
from urllib.parse import urlsplit

import yaml

# The vocabulary: each Literal below and the tuple of its values, least privileged role first.
Role: TypeAlias = Literal["viewer", "developer", "admin"]
RouteAuth: TypeAlias = Literal["required", "none"]
RouteMode: TypeAlias = Literal["proxy", "verify"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error"]
LogFormat: TypeAlias = Literal["json", "text"]
DisabledStatus: TypeAlias = Literal[401, 403]
OnStoreError: TypeAlias = Literal["deny", "allow"]  # a rate limit's answer while Redis cannot be reached (spec 12)

_ROLES: Final[tuple[Role, ...]] = ("viewer", "developer", "admin")
ROLES: Final[tuple[str, ...]] = _ROLES  # admin/auth.py ranks roles (str) by their position here
ROUTE_AUTHS: Final[tuple[RouteAuth, ...]] = ("required", "none")
ROUTE_MODES: Final[tuple[RouteMode, ...]] = ("proxy", "verify")
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("json", "text")
DISABLED_STATUSES: Final[tuple[DisabledStatus, ...]] = (401, 403)
ON_STORE_ERRORS: Final[tuple[OnStoreError, ...]] = ("deny", "allow")

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
    role: Role
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
    disabled_status: DisabledStatus


DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024

# Rate limits (spec 12; gateway/ratelimit/): the bounds a limit must keep, in a route and in a key record.
RATELIMIT_NAME_RULE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # safe in a header's sf-string
MAX_RATELIMIT: Final = 1_000_000_000  # requests a window
MAX_WINDOW_SECONDS: Final = 86_400  # windows from 1 s to 1 day
MAX_RATELIMITS: Final = 10  # limits on one key or one route
MAX_COST: Final = 1_000_000  # credits one request may cost


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `limit` requests in each window of `window_seconds` (windows aligned to Redis time), for
    one key; `on_store_error` decides a request that needs Redis while Redis cannot answer."""

    name: str
    limit: int
    window_seconds: int
    on_store_error: OnStoreError = "deny"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    path_prefix: str
    upstream: str  # "" for a verify route: the proxy in front of the gateway forwards
    strip_prefix: bool
    methods: frozenset[str] | None  # None: all
    auth: RouteAuth
    scopes: tuple[str, ...]
    timeout_seconds: float
    forward_authorization: bool
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a request body larger than this is 413 body_too_large
    # proxy: the gateway forwards what passes; verify: the verify listener answers another proxy's
    # question about a request (nginx auth_request, Caddy forward_auth, ...) and forwards nothing.
    mode: RouteMode = "proxy"
    # Rate limits applied to each key on this route (a key's own limit of the same name takes its
    # place), and the credits a request here costs (spec 12).
    ratelimits: tuple[RateLimit, ...] = ()
    cost: int = 1

    @property
    def requires_key(self) -> bool:
        return self.auth == "required"


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = "info"
    format: LogFormat = "json"  # one JSON object per line, as container log collectors expect


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
class VerifyConfig:
    """The verify listener (its own port): answers nginx auth_request, Caddy forward_auth, Traefik
    ForwardAuth and Envoy ext_authz about the `mode: verify` routes."""

    listen: Listen
    # Envoy's ext_authz `path_prefix`: removed from the start of a request line's path before it is
    # matched ("" when the proxy sends the original path as it is).
    path_prefix: str = ""


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
    verify: VerifyConfig | None = None  # None: no verify listener

    def routes_for(self, mode: RouteMode) -> tuple[Route, ...]:
        return tuple(route for route in self.routes if route.mode == mode)


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
    "GATEWAY_VERIFY_LISTEN_HOST": ("verify", "listen", "host"),
    "GATEWAY_VERIFY_LISTEN_PORT": ("verify", "listen", "port"),
}
# Values that are secrets: never echoed in a problem report.
_SECRET_PATHS: Final = {("redis", "channel_secret"), ("redis", "url")}
# Values taken verbatim, not as YAML: a secret like "123" stays a string.
_VERBATIM_PATHS: Final = {("redis", "url"), ("redis", "channel_secret"), ("redis", "prefix")}


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
        raw: object = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = exc.problem_mark if isinstance(exc, yaml.MarkedYAMLError) else None
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"
        problem = (exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None) or "invalid YAML"
        raise ConfigError(source, [Problem(where, _ABSENT, f"not valid YAML: {problem}")]) from None
    if raw is None:
        raw = {}
    if not _is_table(raw):
        raise ConfigError(source, [Problem("(root)", type(raw).__name__, "must be a mapping of keys")])
    problems: list[Problem] = []
    from_env = _apply_env(raw, environ or {}, problems)
    config = _Validator(problems).config(raw, source)
    if problems:
        raise ConfigError(source, [_noting_env(p, from_env) for p in problems])
    assert config is not None
    return config


def _noting_env(problem: Problem, from_env: Mapping[str, str]) -> Problem:
    """The problem with "(from GATEWAY_X)" after its path when that variable set the value or a parent of it."""
    for key_path, var in from_env.items():
        if problem.path == key_path or problem.path.startswith((f"{key_path}.", f"{key_path}[")):
            return Problem(f"{problem.path} (from {var})", problem.value, problem.rule)
    return problem


def _apply_env(raw: dict[object, object], environ: Mapping[str, str], problems: list[Problem]) -> dict[str, str]:
    """Write overrides into the raw mapping; returns key path -> the variable that set it."""
    applied: dict[str, str] = {}
    for var, path in ENV_OVERRIDES.items():
        if var not in environ:
            continue
        text = environ[var]
        value: object
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            shown: object = _SECRET if path in _SECRET_PATHS else text
            problems.append(Problem(var, shown, "not a valid value"))
            continue
        if path in _VERBATIM_PATHS:
            value = text
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not _is_table(child):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
        applied[".".join(path)] = var
    return applied


def _is_table(value: object) -> TypeGuard[dict[object, object]]:
    """A YAML mapping (its keys may be any scalar)."""
    return isinstance(value, dict)


def _is_list(value: object) -> TypeGuard[list[object]]:
    return isinstance(value, list)


# the schema: kinds, rules and fields ------------------------------------------------------

T = TypeVar("T")
D = TypeVar("D")
C = TypeVar("C")
T_co = TypeVar("T_co", covariant=True)
D_co = TypeVar("D_co", covariant=True)


@dataclass(frozen=True, slots=True)
class _Broken:
    """What a value that fails its field is: the rule it breaks."""

    rule: str


# Reads a raw value as T, or says which rule it breaks. Never receives None (None is absent).
_Parse: TypeAlias = Callable[[object], T | _Broken]
# A rule on a value already of its kind: None when it passes, else the rule.
_Check: TypeAlias = Callable[[T], str | None]


def _string(v: object) -> str | _Broken:
    return v if isinstance(v, str) else _Broken("must be a string")


def _integer(v: object) -> int | _Broken:
    # bool is an int in Python; a port of `true` is still wrong.
    return v if isinstance(v, int) and not isinstance(v, bool) else _Broken("must be an integer")


def _number(v: object) -> float | _Broken:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else _Broken("must be a number")


def _flag(v: object) -> bool | _Broken:
    return v if isinstance(v, bool) else _Broken("must be true or false")


def _choice(kind: _Parse[object], options: tuple[C, ...]) -> _Parse[C]:
    """One of `options` (a Literal's values), after `kind`: the value comes back as the option, typed."""
    rule = "must be one of: " + ", ".join(str(o) for o in options)

    def parse(v: object) -> C | _Broken:
        got = kind(v)
        if isinstance(got, _Broken):
            return got
        return next((o for o in options if o == got), _Broken(rule))

    return parse


def _methods(v: object) -> frozenset[str] | _Broken:
    if not _is_list(v):
        return _Broken("must be a list")
    if not v:
        return _Broken("must list at least one method (leave it out to allow all)")
    names = [m.upper() for m in v if isinstance(m, str)]
    if len(names) != len(v) or not METHODS.issuperset(names):
        return _Broken("must list HTTP methods from: " + ", ".join(sorted(METHODS)))
    return frozenset(names)


def _scopes(v: object) -> tuple[str, ...] | _Broken:
    if not _is_list(v):
        return _Broken("must be a list")
    scopes = tuple(s for s in v if isinstance(s, str) and SCOPE_RULE.fullmatch(s))
    if len(scopes) != len(v):
        return _Broken("must be a list of scope names (letters, digits, _ . : / * -)")
    return scopes


def ratelimit_problem(item: object) -> RateLimit | str:
    """One rate limit `{name, limit, window_seconds, on_store_error}` (a route's in the file, a key's in
    the admin API), or the rule it breaks."""
    if not _is_table(item):
        return "each must be a mapping {name, limit, window_seconds, on_store_error}"
    unknown = sorted(str(k) for k in item if k not in ("name", "limit", "window_seconds", "on_store_error"))
    if unknown:
        return f"unknown key(s) {', '.join(unknown)[:100]} (allowed: name, limit, window_seconds, on_store_error)"
    name, limit, window = item.get("name"), item.get("limit"), item.get("window_seconds")
    on_error = item.get("on_store_error", "deny")
    if not isinstance(name, str) or not RATELIMIT_NAME_RULE.fullmatch(name):
        return "name: must be 1-64 letters, digits, '_', '.', '-'"
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RATELIMIT:
        return f"limit: must be a whole number from 1 to {MAX_RATELIMIT}"
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW_SECONDS:
        return f"window_seconds: must be a whole number of seconds from 1 to {MAX_WINDOW_SECONDS}"
    if on_error not in ON_STORE_ERRORS:
        return "on_store_error: must be one of: " + ", ".join(ON_STORE_ERRORS)
    return RateLimit(name, limit, window, "allow" if on_error == "allow" else "deny")


def ratelimits_problem(v: object) -> tuple[RateLimit, ...] | str:
    """A list of rate limits with distinct names, or the rule it breaks (naming the item)."""
    if not _is_list(v) or len(v) > MAX_RATELIMITS:
        return f"must be a list of at most {MAX_RATELIMITS} rate limits"
    out: list[RateLimit] = []
    for i, item in enumerate(v):
        got = ratelimit_problem(item)
        if isinstance(got, str):
            return f"[{i}] {got}"
        if any(other.name == got.name for other in out):
            return f"[{i}] name: duplicate rate limit name"
        out.append(got)
    return tuple(out)


def _ratelimits(v: object) -> tuple[RateLimit, ...] | _Broken:
    got = ratelimits_problem(v)
    return _Broken(got) if isinstance(got, str) else got


class _Required:
    """The default of a key that must be given."""


_REQUIRED: Final = _Required()


class _Key:
    """What a section needs of each of its fields, whatever the field's type."""

    __slots__ = ("key", "secret")

    def __init__(self, *, secret: bool) -> None:
        self.key = ""  # the attribute name in the schema class (__set_name__)
        self.secret = secret

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def problem(self, table: Mapping[object, object], where: str) -> Problem | None:
        raise NotImplementedError


class _Field(_Key, Generic[T_co, D_co]):
    """One key of a section: read as T_co (its kind, then each of its rules) or D_co when absent."""

    __slots__ = ("default", "parse")

    def __init__(
        self, kind: _Parse[T_co], default: D_co | _Required, *checks: _Check[T_co], secret: bool = False
    ) -> None:
        super().__init__(secret=secret)
        self.default = default

        def parse(v: object) -> T_co | _Broken:
            got = kind(v)
            if isinstance(got, _Broken):
                return got
            broken = next((rule for check in checks if (rule := check(got)) is not None), None)
            return got if broken is None else _Broken(broken)

        self.parse = parse

    def problem(self, table: Mapping[object, object], where: str) -> Problem | None:
        got = self.read(table)
        if not isinstance(got, _Broken):
            return None
        value = table.get(self.key)
        return Problem(where, _ABSENT if value is None else _SECRET if self.secret else value, got.rule)

    def read(self, table: Mapping[object, object]) -> T_co | D_co | _Broken:
        value = table.get(self.key)
        default = self.default
        if value is not None:
            return self.parse(value)
        return _Broken("is required") if isinstance(default, _Required) else default


def _required(kind: _Parse[T], *checks: _Check[T], secret: bool = False) -> _Field[T, Never]:
    return _Field(kind, _REQUIRED, *checks, secret=secret)


class _Schema:
    """A mapping in the file: its typed fields (checked in the order declared) and its nested keys."""

    nested: ClassVar[tuple[str, ...]] = ()
    fields: ClassVar[tuple[_Key, ...]] = ()

    def __init_subclass__(cls) -> None:
        declared: dict[str, _Key] = {}
        for klass in reversed(cls.__mro__):  # a subclass may override a field; it keeps its place
            declared.update((k, v) for k, v in vars(klass).items() if isinstance(v, _Key))
        cls.fields = tuple(declared.values())

    @classmethod
    def allowed(cls) -> set[str]:
        return {f.key for f in cls.fields} | set(cls.nested)


class _Section:
    """One mapping, opened against its schema: `ok` when none of its fields broke a rule."""

    def __init__(self, table: Mapping[object, object], ok: bool) -> None:
        self.table = table
        self.ok = ok

    def get(self, f: _Field[T, D]) -> T | D:
        """The value of a field of a section that is ok."""
        got = f.read(self.table)
        if isinstance(got, _Broken):
            raise AssertionError(f"{f.key} read from a section with problems")
        return got

    def peek(self, f: _Field[T, D]) -> T | D | None:
        """The value, or None when that field is broken (for checks across fields)."""
        got = f.read(self.table)
        return None if isinstance(got, _Broken) else got


def _between(low: float, high: float) -> _Check[float]:
    def check(v: float) -> str | None:
        return None if low <= v <= high else f"must be between {low:g} and {high:g}"  # NaN fails too

    return check


# rules: each returns None when the value passes, else the rule it breaks ---------


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _check_name(v: str) -> str | None:
    return None if _ROUTE_NAME.fullmatch(v) else "must be 1-64 letters, digits, '_', '.', '-'"


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


def _check_verify_prefix(v: str) -> str | None:
    return None if v == "" else _check_path_prefix(v)


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


# the sections ---------------------------------------------------------------------------

_LOGGING: Final = LoggingConfig()
_LIMITS: Final = LimitsConfig()


class _Root(_Schema):
    nested = ("listen", "admin", "redis", "cache", "keys", "routes", "logging", "lifecycle", "limits",
              "trusted_proxies", "verify")  # fmt: skip


class _Listen(_Schema):
    host = _Field(_string, "0.0.0.0", _check_host)
    port = _Field(_integer, 8080, _check_port)


class _AdminListen(_Listen):
    host = _Field(_string, "127.0.0.1", _check_host)
    port = _Field(_integer, 8081, _check_port)


class _VerifyListen(_Listen):
    host = _Field(_string, "127.0.0.1", _check_host)
    port = _Field(_integer, 8082, _check_port)


class _Verify(_Schema):
    nested = ("listen",)
    path_prefix = _Field(_string, "", _check_verify_prefix)


class _Admin(_Schema):
    nested = ("listen", "tokens")
    propagation_timeout_seconds = _Field(_number, 1.0, _between(0, 30))


class _Token(_Schema):
    id = _Field(_string, None, _check_token_id)
    name = _required(_string, _check_name)
    role: _Field[Role, Never] = _required(_choice(_string, _ROLES))
    hash = _required(_string, _check_argon2id, secret=True)


class _Redis(_Schema):
    url = _Field(_string, "embedded", _check_redis_url, secret=True)
    prefix = _Field(_string, "gw:", _check_prefix)
    channel_secret = _Field(_string, None, _check_secret, secret=True)
    data_dir = _Field(_string, "./.gateway-data", _nonempty)
    health_check_seconds = _Field(_number, 1.0, _between(0.05, 60))
    lease_seconds = _Field(_number, 1.0, _between(0.05, 60))


class _Cache(_Schema):
    ttl_seconds = _Field(_number, 30.0, _between(0, 86400))
    negative_ttl_seconds = _Field(_number, 2.0, _between(0, 3600))
    max_entries = _Field(_integer, 100_000, _between(1, 100_000_000))
    serve_stale_seconds = _Field(_number, 0.0, _between(0, 3600))
    key_filter = _Field(_flag, True)


class _Keys(_Schema):
    allow_reenable = _Field(_flag, True)
    disabled_status: _Field[DisabledStatus, DisabledStatus] = _Field(_choice(_integer, DISABLED_STATUSES), 403)


class _Logging(_Schema):
    level: _Field[LogLevel, LogLevel] = _Field(_choice(_string, LOG_LEVELS), _LOGGING.level)
    format: _Field[LogFormat, LogFormat] = _Field(_choice(_string, LOG_FORMATS), _LOGGING.format)


class _Lifecycle(_Schema):
    drain_seconds = _Field(_number, 20.0, _between(0, 3600))


class _Limits(_Schema):
    header_timeout_seconds = _Field(_number, _LIMITS.header_timeout_seconds, _between(0.1, 3600))
    max_header_bytes = _Field(_integer, _LIMITS.max_header_bytes, _between(1024, 1024 * 1024))
    max_headers = _Field(_integer, _LIMITS.max_headers, _between(8, 10_000))
    max_connections = _Field(_integer, _LIMITS.max_connections, _between(1, 1_000_000))
    body_timeout_seconds = _Field(_number, _LIMITS.body_timeout_seconds, _between(0.1, 3600))
    keepalive_seconds = _Field(_number, _LIMITS.keepalive_seconds, _between(0.1, 3600))


class _Route(_Schema):
    name = _required(_string, _check_name)
    path_prefix = _required(_string, _check_path_prefix)
    mode: _Field[RouteMode, RouteMode] = _Field(_choice(_string, ROUTE_MODES), "proxy")
    upstream = _Field(_string, None, _check_upstream)  # required in mode proxy, absent in mode verify
    strip_prefix = _Field(_flag, False)
    methods = _Field(_methods, None)
    auth: _Field[RouteAuth, RouteAuth] = _Field(_choice(_string, ROUTE_AUTHS), "required")
    scopes: _Field[tuple[str, ...], tuple[str, ...]] = _Field(_scopes, ())
    timeout_seconds = _Field(_number, 30.0, _between(0.001, 3600))
    forward_authorization = _Field(_flag, False)
    max_body_bytes = _Field(_integer, DEFAULT_MAX_BODY_BYTES, _between(0, MAX_SAFE_LENGTH))
    ratelimits: _Field[tuple[RateLimit, ...], tuple[RateLimit, ...]] = _Field(_ratelimits, ())
    cost = _Field(_integer, 1, _between(0, MAX_COST))


class _Validator:
    """Opens each section against its schema once, appending a Problem for every violation."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        self.admin_port: int | None = None  # for the check across listeners

    def bad(self, path: str, value: object, rule: str) -> None:
        self.problems.append(Problem(path, value, rule))

    def open(self, raw: object, path: str, schema: type[_Schema]) -> _Section:
        """Unknown keys first, then each declared field in order; `ok` when no field broke a rule."""
        if raw is None:
            raw = {}
        if not _is_table(raw):  # reported; its fields take their defaults
            self.bad(path, type(raw).__name__, "must be a mapping")
            raw = {}
        allowed = schema.allowed()
        for key in raw:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.bad(where, _NOT_SHOWN, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        before = len(self.problems)
        for f in schema.fields:
            problem = f.problem(raw, f"{path}.{f.key}" if path else f.key)
            if problem is not None:
                self.problems.append(problem)
        return _Section(raw, ok=len(self.problems) == before)

    def config(self, raw: Mapping[object, object], source: str) -> Config | None:
        self.open(raw, "", _Root)
        listen, port = self.listen(raw.get("listen"), "listen", _Listen)
        admin = self.admin(raw.get("admin"), port)
        redis = self.redis(raw.get("redis"))
        cache = self.cache(raw.get("cache"))
        keys = self.keys(raw.get("keys"))
        routes = self.routes(raw.get("routes"))
        logs = self.logging(raw.get("logging"))
        lifecycle = self.lifecycle(raw.get("lifecycle"))
        limits = self.limits(raw.get("limits"))
        trusted = self.trusted_proxies(raw.get("trusted_proxies"))
        verify = self.verify(raw.get("verify"), {"listen.port": port, "admin.listen.port": self.admin_port})
        for i, route in enumerate(routes):
            if route.mode == "verify" and verify is None and "verify" not in raw:
                self.bad(
                    f"routes[{i}].mode", "verify", "a verify route needs the verify listener: add a verify: section"
                )
        if self.problems:
            return None
        assert listen and admin and redis and cache and keys and logs and lifecycle and limits
        return Config(listen, admin, redis, cache, keys, routes, source, logs, lifecycle, limits, trusted, verify)

    def verify(self, raw: object, other_ports: dict[str, int | None]) -> VerifyConfig | None:
        if raw is None:
            return None
        s = self.open(raw, "verify", _Verify)
        listen, port = self.listen(s.table.get("listen"), "verify.listen", _VerifyListen)
        for where, other in other_ports.items():
            if port is not None and port == other != 0:
                self.bad("verify.listen.port", port, f"must differ from {where}: each listener has a port of its own")
        if listen is None or not s.ok:
            return None
        return VerifyConfig(listen, s.get(_Verify.path_prefix))

    def listen(self, raw: object, path: str, schema: type[_Listen]) -> tuple[Listen | None, int | None]:
        """The listener, and its port when that is valid (for the check across listeners)."""
        s = self.open(raw, path, schema)
        return Listen(s.get(schema.host), s.get(schema.port)) if s.ok else None, s.peek(schema.port)

    def admin(self, raw: object, proxy_port: int | None) -> AdminConfig | None:
        s = self.open(raw, "admin", _Admin)
        listen, port = self.listen(s.table.get("listen"), "admin.listen", _AdminListen)
        self.admin_port = port
        tokens = self.tokens(s.table.get("tokens") or [])
        if port is not None and port == proxy_port != 0:
            self.bad(
                "admin.listen.port", port, "must differ from listen.port: the admin API never shares the proxy port"
            )
        if listen is None or not s.ok:
            return None
        return AdminConfig(listen, tokens, s.get(_Admin.propagation_timeout_seconds))

    def tokens(self, raw: object) -> tuple[AdminToken, ...]:
        if not _is_list(raw):
            self.bad("admin.tokens", type(raw).__name__, "must be a list of {name, role, hash}")
            return ()
        tokens: list[AdminToken] = []
        names: set[str] = set()
        ids: set[str] = set()
        for i, item in enumerate(raw):
            path = f"admin.tokens[{i}]"
            if not _is_table(item):
                self.bad(path, type(item).__name__, "must be a mapping")
                continue
            s = self.open(item, path, _Token)
            token_id = s.peek(_Token.id)
            if token_id is not None:
                if token_id in ids:
                    self.bad(f"{path}.id", token_id, "duplicate token id")
                ids.add(token_id)
            name = s.peek(_Token.name)
            if name is not None:
                if name in names:
                    self.bad(f"{path}.name", name, "duplicate token name")
                names.add(name)
            if s.ok:
                tokens.append(AdminToken(name=s.get(_Token.name), role=s.get(_Token.role),
                                         hash=s.get(_Token.hash), id=s.get(_Token.id)))  # fmt: skip
        return tuple(tokens)

    def redis(self, raw: object) -> RedisConfig | None:
        s = self.open(raw, "redis", _Redis)
        if not s.ok:
            return None
        url = s.get(_Redis.url)
        return RedisConfig(
            url=None if url == "embedded" else url,
            prefix=s.get(_Redis.prefix),
            channel_secret=s.get(_Redis.channel_secret),
            data_dir=Path(s.get(_Redis.data_dir)),
            health_check_seconds=s.get(_Redis.health_check_seconds),
            lease_seconds=s.get(_Redis.lease_seconds),
        )

    def cache(self, raw: object) -> CacheConfig | None:
        s = self.open(raw, "cache", _Cache)
        if not s.ok:
            return None
        return CacheConfig(
            ttl_seconds=s.get(_Cache.ttl_seconds),
            negative_ttl_seconds=s.get(_Cache.negative_ttl_seconds),
            max_entries=s.get(_Cache.max_entries),
            serve_stale_seconds=s.get(_Cache.serve_stale_seconds),
            key_filter=s.get(_Cache.key_filter),
        )

    def keys(self, raw: object) -> KeysConfig | None:
        s = self.open(raw, "keys", _Keys)
        return KeysConfig(s.get(_Keys.allow_reenable), s.get(_Keys.disabled_status)) if s.ok else None

    def logging(self, raw: object) -> LoggingConfig | None:
        s = self.open(raw, "logging", _Logging)
        return LoggingConfig(s.get(_Logging.level), s.get(_Logging.format)) if s.ok else None

    def lifecycle(self, raw: object) -> LifecycleConfig | None:
        s = self.open(raw, "lifecycle", _Lifecycle)
        return LifecycleConfig(s.get(_Lifecycle.drain_seconds)) if s.ok else None

    def limits(self, raw: object) -> LimitsConfig | None:
        s = self.open(raw, "limits", _Limits)
        if not s.ok:
            return None
        return LimitsConfig(
            header_timeout_seconds=s.get(_Limits.header_timeout_seconds),
            max_header_bytes=s.get(_Limits.max_header_bytes),
            max_headers=s.get(_Limits.max_headers),
            max_connections=s.get(_Limits.max_connections),
            body_timeout_seconds=s.get(_Limits.body_timeout_seconds),
            keepalive_seconds=s.get(_Limits.keepalive_seconds),
        )

    def trusted_proxies(self, raw: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        if raw is None:
            return ()
        if isinstance(raw, str):  # GATEWAY_TRUSTED_PROXIES="10.0.0.0/8, 192.168.0.0/16"
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not _is_list(raw):
            self.bad("trusted_proxies", type(raw).__name__, "must be a list of CIDR networks")
            return ()
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for i, item in enumerate(raw):
            try:
                out.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                self.bad(f"trusted_proxies[{i}]", item, "must be a CIDR network such as 10.0.0.0/8 or an address")
        return tuple(out)

    def routes(self, raw: object) -> tuple[Route, ...]:
        if raw is None:
            self.bad("routes", _ABSENT, "is required: a list of at least one route")
            return ()
        if not _is_list(raw) or not raw:
            self.bad("routes", raw if not _is_list(raw) else [], "must be a non-empty list of routes")
            return ()
        routes: list[Route] = []
        names: set[str] = set()  # one namespace for both modes: metrics and logs name routes
        prefixes: set[tuple[str, str]] = set()  # a proxy route and a verify route may share a prefix
        for i, item in enumerate(raw):
            route = self.route(item, f"routes[{i}]")
            if route is None:
                continue
            if route.name in names:
                self.bad(f"routes[{i}].name", route.name, "duplicate route name")
            if (route.mode, route.path_prefix) in prefixes:
                self.bad(
                    f"routes[{i}].path_prefix",
                    route.path_prefix,
                    f"duplicate path_prefix: another {route.mode} route already claims it",
                )
            names.add(route.name)
            prefixes.add((route.mode, route.path_prefix))
            routes.append(route)
        return tuple(routes)

    def route(self, raw: object, path: str) -> Route | None:
        if not _is_table(raw):
            self.bad(path, type(raw).__name__, "must be a mapping")
            return None
        s = self.open(raw, path, _Route)
        auth, scopes = s.peek(_Route.auth), s.peek(_Route.scopes)
        if auth == "none" and scopes:
            self.bad(f"{path}.scopes", raw.get("scopes"), "a public route (auth: none) cannot require scopes")
            return None
        if auth == "none" and raw.get("ratelimits"):
            self.bad(f"{path}.ratelimits", _NOT_SHOWN, "a public route (auth: none) has no key to limit")
            return None
        mode = s.peek(_Route.mode)
        if mode == "verify":
            # What only forwarding uses has no meaning here: refused rather than silently ignored.
            for key in ("upstream", "strip_prefix", "timeout_seconds", "forward_authorization", "max_body_bytes"):
                if key in raw:
                    self.bad(f"{path}.{key}", _NOT_SHOWN if key == "upstream" else raw[key],
                             "a verify route forwards nothing: the proxy in front of the gateway does")  # fmt: skip
                    return None
        elif mode == "proxy" and "upstream" not in raw:
            self.bad(f"{path}.upstream", _ABSENT, "is required")
            return None
        if not s.ok:  # a broken route takes no part in the duplicate checks
            return None
        return Route(
            name=s.get(_Route.name),
            path_prefix=s.get(_Route.path_prefix),
            upstream=(s.get(_Route.upstream) or "").rstrip("/"),
            strip_prefix=s.get(_Route.strip_prefix),
            methods=s.get(_Route.methods),
            auth=s.get(_Route.auth),
            scopes=s.get(_Route.scopes),
            timeout_seconds=s.get(_Route.timeout_seconds),
            forward_authorization=s.get(_Route.forward_authorization),
            max_body_bytes=s.get(_Route.max_body_bytes),
            mode=s.get(_Route.mode),
            ratelimits=s.get(_Route.ratelimits),
            cost=s.get(_Route.cost),
        )
