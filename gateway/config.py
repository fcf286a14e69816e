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

import base64
import binascii
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final, Generic, Literal, Never, TypeAlias, TypeGuard, TypeVar
from urllib.parse import unquote, urlsplit

import yaml

# The vocabulary: each Literal below and the tuple of its values, least privileged role first.
Role: TypeAlias = Literal["viewer", "developer", "admin"]
RouteAuth: TypeAlias = Literal["required", "none"]
RouteMode: TypeAlias = Literal["proxy", "verify"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error"]
LogFormat: TypeAlias = Literal["json", "text"]
DisabledStatus: TypeAlias = Literal[401, 403]
PolicyRule: TypeAlias = Literal["distinct_addresses", "refusals", "requests"]
PolicyAction: TypeAlias = Literal["disable", "report"]
OnStoreError: TypeAlias = Literal["deny", "allow"]  # a rate limit's answer while Redis cannot be reached (spec 12)

_ROLES: Final[tuple[Role, ...]] = ("viewer", "developer", "admin")
ROLES: Final[tuple[str, ...]] = _ROLES  # admin/auth.py ranks roles (str) by their position here
ROUTE_AUTHS: Final[tuple[RouteAuth, ...]] = ("required", "none")
ROUTE_MODES: Final[tuple[RouteMode, ...]] = ("proxy", "verify")
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("json", "text")
DISABLED_STATUSES: Final[tuple[DisabledStatus, ...]] = (401, 403)
POLICY_RULES: Final[tuple[PolicyRule, ...]] = ("distinct_addresses", "refusals", "requests")
POLICY_ACTIONS: Final[tuple[PolicyAction, ...]] = ("disable", "report")
# The refusals a policy can count: those given once the key is known (gateway/usage counts per key).
POLICY_CODES: Final = ("key_disabled", "key_revoked", "key_expired", "insufficient_permissions",
                       "upstream_unavailable", "upstream_timeout", "rate_limited", "usage_exceeded")  # fmt: skip
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
class ConsoleConfig:
    """The operator console on the admin listener (spec 11): its sessions."""

    enabled: bool = True
    secure_cookies: bool = False  # the session cookie is Secure anyway when the request came over TLS
    idle_timeout_seconds: float = 900.0  # a session unused this long is gone
    absolute_timeout_seconds: float = 8 * 3600.0  # and every session ends this long after sign-in
    max_sessions_per_token: int = 20  # more sign-ins with one token end its oldest sessions


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen
    tokens: tuple[AdminToken, ...]
    propagation_timeout_seconds: float = 1.0
    console: ConsoleConfig = ConsoleConfig()


@dataclass(frozen=True, slots=True)
class SentinelConfig:
    """Find the master through Redis Sentinel (spec 13) and follow its failovers."""

    master_name: str
    sentinels: tuple[tuple[str, int], ...]
    password: str | None = field(default=None, repr=False)  # the sentinels' own AUTH, if any
    tls: bool = False  # TLS to the sentinels and to the master


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str | None  # None: embedded, unless `sentinel` is set
    prefix: str
    channel_secret: str | None = field(repr=False)
    data_dir: Path
    health_check_seconds: float = 1.0
    # Trust in the cache is a lease (spec 8): a PING sent at t whose reply came back on the
    # subscription lets the replica answer from its cache until t + lease_seconds.
    lease_seconds: float = 1.0
    # Redis's password (AUTH), instead of one in the URL; from GATEWAY_REDIS_PASSWORD(_FILE).
    password: str | None = field(default=None, repr=False)
    sentinel: SentinelConfig | None = None  # from redis.sentinel or a redis+sentinel:// URL
    # Acknowledged means durable (spec 13): a change counts once this many Redis replicas hold it
    # (WAIT, up to min_replicas_timeout_seconds); fewer -> 503 store_unavailable. 0: no WAIT.
    min_replicas_acked: int = 0
    min_replicas_timeout_seconds: float = 0.5

    @property
    def embedded(self) -> bool:
        return self.url is None and self.sentinel is None


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


# Key events a webhook endpoint can subscribe to (spec 10; gateway/webhooks/events.py makes them).
WEBHOOK_EVENTS: Final[tuple[str, ...]] = (
    "key.created", "key.disabled", "key.enabled", "key.revoked", "key.rotated", "key.auto_disabled",
    "key.expiring_soon",
)  # fmt: skip
WEBHOOK_SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the standard's prefix, not a secret


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    name: str  # metrics and logs name the endpoint by this, never by its URL
    url: str = field(repr=False)  # may carry credentials (sent as basic auth)
    events: frozenset[str]
    secret: bytes = field(repr=False)  # the key of a `whsec_<base64>` secret, decoded


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    """Signed key events (spec 10), queued in Redis; gateway/webhooks/ delivers them."""

    endpoints: tuple[WebhookEndpoint, ...]
    expiring_soon_seconds: float = 7 * 86400.0  # key.expiring_soon this long before a key's expires_at
    check_seconds: float = 60.0  # how often keys are checked for key.expiring_soon
    timeout_seconds: float = 10.0  # one delivery attempt, connect to last byte of the answer's head
    concurrency: int = 4  # attempts in flight at once, per endpoint and replica
    max_queue: int = 100_000  # events waiting per endpoint; past it a new event for it is dropped (and counted)
    retry_initial_seconds: float = 5.0  # the first retry's delay; each next one doubles, with jitter
    retry_max_interval_seconds: float = 3600.0  # no delay between attempts is longer than this
    retry_hours: float = 24.0  # attempts go on at least this long after the event, then it is dropped


@dataclass(frozen=True, slots=True)
class UsageConfig:
    """Per-key usage counting (spec 10, gateway/usage/): aggregated in memory, written in batches."""

    flush_seconds: float = 10.0  # one pipelined write per replica this often (at most 5 s with policies)
    max_keys: int = 100_000  # keys counted per flush interval; requests of further keys are not counted per key
    max_addresses: int = 1_000  # distinct client addresses remembered per key per flush interval
    enabled: bool = True  # false: nothing is counted (no Counter, no Flusher), no policies, no usage endpoint


@dataclass(frozen=True, slots=True)
class Policy:
    """A rule over a key's usage in a window (spec 10): crossed, the key is disabled or reported."""

    name: str
    rule: PolicyRule
    above: int  # the rule is crossed when the measured value is greater than this
    window_seconds: int  # whole minutes up to an hour, or whole hours up to a day
    action: PolicyAction = "disable"
    dry_run: bool = False  # report what it would have done, change nothing
    code: str | None = None  # the refusal code counted, with rule: refusals


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
    webhooks: WebhooksConfig | None = None  # None: no webhooks
    usage: UsageConfig = UsageConfig()
    policies: tuple[Policy, ...] = ()  # reloaded on SIGHUP

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
    "GATEWAY_ADMIN_CONSOLE_ENABLED": ("admin", "console", "enabled"),
    "GATEWAY_ADMIN_CONSOLE_SECURE_COOKIES": ("admin", "console", "secure_cookies"),
    "GATEWAY_REDIS_URL": ("redis", "url"),
    "GATEWAY_REDIS_PASSWORD": ("redis", "password"),
    "GATEWAY_REDIS_MIN_REPLICAS_ACKED": ("redis", "min_replicas_acked"),
    "GATEWAY_REDIS_MIN_REPLICAS_TIMEOUT_SECONDS": ("redis", "min_replicas_timeout_seconds"),
    "GATEWAY_REDIS_SENTINEL_MASTER_NAME": ("redis", "sentinel", "master_name"),
    "GATEWAY_REDIS_SENTINEL_SENTINELS": ("redis", "sentinel", "sentinels"),
    "GATEWAY_REDIS_SENTINEL_PASSWORD": ("redis", "sentinel", "password"),
    "GATEWAY_REDIS_SENTINEL_TLS": ("redis", "sentinel", "tls"),
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
    "GATEWAY_USAGE_FLUSH_SECONDS": ("usage", "flush_seconds"),
    "GATEWAY_USAGE_MAX_KEYS": ("usage", "max_keys"),
    "GATEWAY_USAGE_MAX_ADDRESSES": ("usage", "max_addresses"),
    "GATEWAY_USAGE_ENABLED": ("usage", "enabled"),
}
# Values that are secrets: never echoed in a problem report.
_SECRET_PATHS: Final = {
    ("redis", "channel_secret"), ("redis", "url"), ("redis", "password"), ("redis", "sentinel", "password"),
}  # fmt: skip
# Values taken verbatim, not as YAML: a secret like "123" stays a string.
_VERBATIM_PATHS: Final = {
    ("redis", "url"), ("redis", "channel_secret"), ("redis", "prefix"), ("redis", "password"),
    ("redis", "sentinel", "password"), ("redis", "sentinel", "master_name"),
}  # fmt: skip
# Secrets that may come from a file instead, as Kubernetes mounts a Secret: GATEWAY_X_FILE names
# the file, whose text (less one trailing newline) is taken as GATEWAY_X would be. Never both.
FILE_VARIANTS: Final = (
    "GATEWAY_REDIS_URL",
    "GATEWAY_REDIS_PASSWORD",
    "GATEWAY_REDIS_SENTINEL_PASSWORD",
    "GATEWAY_REDIS_CHANNEL_SECRET",
    "GATEWAY_ADMIN_TOKENS",
)
MAX_SECRET_FILE: Final = 1024 * 1024  # bytes a *_FILE may hold (an admin token list is the largest)


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
    config = _Validator(problems, environ or {}).config(raw, source)
    if problems:
        raise ConfigError(source, [_noting_env(p, from_env) for p in problems])
    assert config is not None
    return config


def _noting_env(problem: Problem, from_env: Mapping[str, str]) -> Problem:
    """The problem with "(from GATEWAY_X)" after its path when that variable set the value or a parent of it
    (or made the section it is in): the variable of the longest such path."""
    for key_path, var in sorted(from_env.items(), key=lambda item: -len(item[0])):
        if problem.path == key_path or problem.path.startswith((f"{key_path}.", f"{key_path}[")):
            return Problem(f"{problem.path} (from {var})", problem.value, problem.rule)
    return problem


def _read_secret_files(environ: Mapping[str, str], problems: list[Problem]) -> dict[str, tuple[str, str]]:
    """GATEWAY_X -> (its text, the variable it came from) for each GATEWAY_X_FILE given."""
    found: dict[str, tuple[str, str]] = {}
    for var in FILE_VARIANTS:
        file_var = var + "_FILE"
        if file_var not in environ:
            continue
        where = environ[file_var]
        if var in environ:
            problems.append(Problem(file_var, where, f"set {var} or {file_var}, not both"))
            continue
        try:  # non-blocking: a FIFO or a device must be refused, not block the start until a writer comes
            fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    problems.append(Problem(file_var, where, "must be a regular file"))
                    continue
                data = f.read(MAX_SECRET_FILE + 1)
        except OSError as exc:
            problems.append(Problem(file_var, where, f"cannot be read: {exc.strerror}"))
            continue
        if len(data) > MAX_SECRET_FILE:
            problems.append(Problem(file_var, where, f"must hold at most {MAX_SECRET_FILE} bytes"))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(Problem(file_var, where, "must hold UTF-8 text"))
            continue
        found[var] = (text.removesuffix("\n").removesuffix("\r"), file_var)
    return found


def _apply_env(raw: dict[object, object], environ: Mapping[str, str], problems: list[Problem]) -> dict[str, str]:
    """Write overrides into the raw mapping; returns key path -> the variable that set it."""
    applied: dict[str, str] = {}
    from_files = _read_secret_files(environ, problems)
    for var, path in ENV_OVERRIDES.items():
        if var in from_files:
            text, var = from_files[var]
        elif var in environ:
            text = environ[var]
        else:
            continue
        value: object
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            # Never the text of a file (a secret's) nor of the token list (argon2id hashes).
            hidden = path in _SECRET_PATHS or path == ("admin", "tokens") or var.endswith("_FILE")
            shown: object = _SECRET if hidden else text
            problems.append(Problem(var, shown, "not a valid value"))
            continue
        if path in _VERBATIM_PATHS:
            value = text
        node = raw
        for depth, part in enumerate(path[:-1], 1):
            child = node.get(part)
            if not _is_table(child):
                child = {}
                node[part] = child
                if depth > 1:  # a section only this variable gives (not a top-level one like `redis`)
                    applied.setdefault(".".join(path[:depth]), var)
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
    if v.startswith(SENTINEL_SCHEMES):
        got = parse_sentinel_url(v)
        return got.rule if isinstance(got, _Broken) else None
    parts = urlsplit(v)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "must be 'embedded' or a redis://, rediss://, unix:// or redis+sentinel:// URL"
    if parts.scheme != "unix" and not parts.hostname:
        return "must name a host"
    return None


SENTINEL_SCHEMES: Final = ("redis+sentinel://", "rediss+sentinel://")
DEFAULT_SENTINEL_PORT: Final = 26379


def _address(text: str, default_port: int) -> tuple[str, int] | None:
    """'host:port', '[v6]:port' or 'host' -> (host, port); None when it is not one."""
    text = text.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^:\[\]]+)(?::(\d{1,5}))?", text)
    if match is None:
        return None
    host = match[1] or match[3]
    port = int(match[2] or match[4] or default_port)
    if _check_host(host) is not None or not 0 < port <= 65535:
        return None
    return host, port


def _sentinels(v: object) -> tuple[tuple[str, int], ...] | _Broken:
    """A list of 'host:port' (or one comma-separated string, as an environment variable gives it)."""
    items = v.split(",") if isinstance(v, str) else v
    rule = "must list sentinel addresses as host:port (a YAML list, or one comma-separated string)"
    if not _is_list(items) or not items:
        return _Broken(rule)
    found = [_address(item, DEFAULT_SENTINEL_PORT) if isinstance(item, str) else None for item in items]
    addresses = tuple(a for a in found if a is not None)
    return addresses if len(addresses) == len(items) else _Broken(rule)


def parse_sentinel_url(v: str) -> tuple[SentinelConfig, str | None] | _Broken:
    """redis+sentinel://[user:password@]host[:port][,host[:port]...]/master_name (rediss+sentinel:
    TLS): the Sentinel settings and the master's password. The URL form has no sentinel password;
    give it as redis.sentinel.password."""
    scheme, _, rest = v.partition("://")
    netloc, _, path = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    if not at:
        credentials, hosts = "", netloc
    master = path.strip("/")
    if "?" in master or "#" in master or _check_name(master) is not None:
        return _Broken("must end with /<master name> (1-64 letters, digits, '_', '.', '-'), without a query")
    addresses = _sentinels(hosts)
    if isinstance(addresses, _Broken):
        return addresses
    if credentials.partition(":")[0]:  # a user would be dropped (there is no redis.username)
        return _Broken("must not name a user: give the master's password as :<password>@, or in redis.password")
    password = unquote(credentials.partition(":")[2]) or None
    return SentinelConfig(master, addresses, None, scheme.startswith("rediss")), password


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


def _window(v: object) -> int | _Broken:
    """A policy's window in seconds: "<n>m" (1 to 60 minutes) or "<n>h" (1 to 24 hours)."""
    rule = "must be a window such as 10m or 1h: 1m to 60m, or 1h to 24h"
    match = re.fullmatch(r"([0-9]{1,3})([mh])", v) if isinstance(v, str) else None
    if match is None:
        return _Broken(rule)
    n, unit = int(match[1]), match[2]
    if not (1 <= n <= 60 if unit == "m" else 1 <= n <= 24):
        return _Broken(rule)
    return n * (60 if unit == "m" else 3600)


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
_USAGE: Final = UsageConfig()


class _Root(_Schema):
    nested = ("listen", "admin", "redis", "cache", "keys", "routes", "logging", "lifecycle", "limits",
              "trusted_proxies", "verify", "webhooks", "usage", "policies")  # fmt: skip


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
    nested = ("listen", "tokens", "console")
    propagation_timeout_seconds = _Field(_number, 1.0, _between(0, 30))


_CONSOLE: Final = ConsoleConfig()


class _Console(_Schema):
    enabled = _Field(_flag, _CONSOLE.enabled)
    secure_cookies = _Field(_flag, _CONSOLE.secure_cookies)
    idle_timeout_seconds = _Field(_number, _CONSOLE.idle_timeout_seconds, _between(1, 86400))
    absolute_timeout_seconds = _Field(_number, _CONSOLE.absolute_timeout_seconds, _between(1, 7 * 86400))
    max_sessions_per_token = _Field(_integer, _CONSOLE.max_sessions_per_token, _between(1, 1000))


class _Token(_Schema):
    id = _Field(_string, None, _check_token_id)
    name = _required(_string, _check_name)
    role: _Field[Role, Never] = _required(_choice(_string, _ROLES))
    hash = _required(_string, _check_argon2id, secret=True)


class _Sentinel(_Schema):
    master_name = _required(_string, _check_name)
    sentinels = _required(_sentinels)
    password = _Field(_string, None, _nonempty, secret=True)
    tls = _Field(_flag, False)


class _Redis(_Schema):
    nested = ("sentinel",)
    url = _Field(_string, "embedded", _check_redis_url, secret=True)
    prefix = _Field(_string, "gw:", _check_prefix)
    channel_secret = _Field(_string, None, _check_secret, secret=True)
    data_dir = _Field(_string, "./.gateway-data", _nonempty)
    health_check_seconds = _Field(_number, 1.0, _between(0.05, 60))
    lease_seconds = _Field(_number, 1.0, _between(0.05, 60))
    password = _Field(_string, None, _nonempty, secret=True)
    min_replicas_acked = _Field(_integer, 0, _between(0, 16))
    # Below the command timeout (2 s, runtime/connect.py): WAIT blocks its connection that long.
    min_replicas_timeout_seconds = _Field(_number, 0.5, _between(0.01, 1.5))


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


class _Usage(_Schema):
    flush_seconds = _Field(_number, _USAGE.flush_seconds, _between(0.05, 300))
    max_keys = _Field(_integer, _USAGE.max_keys, _between(1, 10_000_000))
    max_addresses = _Field(_integer, _USAGE.max_addresses, _between(1, 100_000))
    enabled = _Field(_flag, _USAGE.enabled)


class _Policy(_Schema):
    name = _required(_string, _check_name)
    rule: _Field[PolicyRule, Never] = _required(_choice(_string, POLICY_RULES))
    above = _required(_integer, _between(0, 10**12))
    window = _required(_window)
    code = _Field(_choice(_string, POLICY_CODES), None)
    action: _Field[PolicyAction, PolicyAction] = _Field(_choice(_string, POLICY_ACTIONS), "disable")
    dry_run = _Field(_flag, False)


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


def _webhook_events(v: object) -> frozenset[str] | _Broken:
    if v == "all":
        return frozenset(WEBHOOK_EVENTS)
    rule = "must be 'all' or a non-empty list of events from: " + ", ".join(WEBHOOK_EVENTS)
    if not _is_list(v) or not v or not all(isinstance(e, str) and e in WEBHOOK_EVENTS for e in v):
        return _Broken(rule)
    return frozenset(e for e in v if isinstance(e, str))


def webhook_key(secret: str) -> bytes | None:
    """The HMAC key of a Standard Webhooks secret (`whsec_` and base64 of 24 to 64 random bytes), or None."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return None
    text = secret[len(WEBHOOK_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if 24 <= len(key) <= 64 else None


_WEBHOOK_SECRET_RULE: Final = (
    "must be a Standard Webhooks secret: whsec_ then the base64 of 24 to 64 random bytes "  # noqa: S105 - a rule
    "(make one: python -c \"import base64,os; print('whsec_'+base64.b64encode(os.urandom(32)).decode())\")"
)


def _check_webhook_secret(v: str) -> str | None:
    return None if webhook_key(v) is not None else _WEBHOOK_SECRET_RULE


def _check_webhook_url(v: str) -> str | None:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.fragment or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in v):
        return "must not carry a fragment, spaces or control characters"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "has an invalid port"
    return None


def _check_env_name(v: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", v) else "must be an environment variable's name"


def without_credentials(url: str) -> str:
    """A URL as a problem report or a log may show it: user and password replaced."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1(credentials)@", url)


class _UrlField(_Field[str, Never]):
    """A required URL that may carry credentials: a problem shows it without them."""

    def problem(self, table: Mapping[object, object], where: str) -> Problem | None:
        problem = super().problem(table, where)
        if problem is None or not isinstance(problem.value, str):
            return problem
        return Problem(problem.path, without_credentials(problem.value), problem.rule)


class _WebhookEndpoint(_Schema):
    name = _required(_string, _check_name)
    url = _UrlField(_string, _REQUIRED, _check_webhook_url)
    events = _Field(_webhook_events, frozenset(WEBHOOK_EVENTS))
    # Exactly one of: the secret itself, a file holding it (a mounted Kubernetes Secret), an environment variable.
    secret = _Field(_string, None, _check_webhook_secret, secret=True)
    secret_file = _Field(_string, None, _nonempty)
    secret_env = _Field(_string, None, _check_env_name)


_WEBHOOKS: Final = WebhooksConfig(())


class _Webhooks(_Schema):
    nested = ("endpoints",)
    expiring_soon_seconds = _Field(_number, _WEBHOOKS.expiring_soon_seconds, _between(1, 366 * 86400))
    check_seconds = _Field(_number, _WEBHOOKS.check_seconds, _between(0.05, 86400))
    timeout_seconds = _Field(_number, _WEBHOOKS.timeout_seconds, _between(0.05, 300))
    concurrency = _Field(_integer, _WEBHOOKS.concurrency, _between(1, 256))
    max_queue = _Field(_integer, _WEBHOOKS.max_queue, _between(1, 10_000_000))
    retry_initial_seconds = _Field(_number, _WEBHOOKS.retry_initial_seconds, _between(0.01, 3600))
    retry_max_interval_seconds = _Field(_number, _WEBHOOKS.retry_max_interval_seconds, _between(0.01, 86400))
    # Standard Webhooks receivers expect retries for a day: no shorter horizon is accepted.
    retry_hours = _Field(_number, _WEBHOOKS.retry_hours, _between(24, 24 * 31))


class _Validator:
    """Opens each section against its schema once, appending a Problem for every violation."""

    def __init__(self, problems: list[Problem], environ: Mapping[str, str] | None = None) -> None:
        self.problems = problems
        self.admin_port: int | None = None  # for the check across listeners
        self.environ: Mapping[str, str] = environ or {}  # for webhooks.endpoints[].secret_env
        self.max_addresses: int | None = _USAGE.max_addresses  # for the policies' check

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
        webhooks = self.webhooks(raw.get("webhooks"))
        usage = self.usage(raw.get("usage"))
        policies = self.policies(raw.get("policies"))
        if usage is not None and not usage.enabled and policies:
            self.bad("policies", f"{len(policies)} policies", "need usage counting: usage.enabled is false")
        for i, route in enumerate(routes):
            if route.mode == "verify" and verify is None and "verify" not in raw:
                self.bad(
                    f"routes[{i}].mode", "verify", "a verify route needs the verify listener: add a verify: section"
                )
        if self.problems:
            return None
        assert listen and admin and redis and cache and keys and logs and lifecycle and limits and usage
        return Config(listen, admin, redis, cache, keys, routes, source, logs, lifecycle, limits, trusted, verify,
                      webhooks=webhooks, usage=usage, policies=policies)  # fmt: skip

    def webhooks(self, raw: object) -> WebhooksConfig | None:
        if raw is None:
            return None
        s = self.open(raw, "webhooks", _Webhooks)
        endpoints = self.webhook_endpoints(s.table.get("endpoints"))
        initial, most = s.peek(_Webhooks.retry_initial_seconds), s.peek(_Webhooks.retry_max_interval_seconds)
        if initial is not None and most is not None and most < initial:
            self.bad("webhooks.retry_max_interval_seconds", most, "must be at least retry_initial_seconds")
            return None
        if not s.ok or endpoints is None:
            return None
        return WebhooksConfig(
            endpoints=endpoints,
            expiring_soon_seconds=s.get(_Webhooks.expiring_soon_seconds),
            check_seconds=s.get(_Webhooks.check_seconds),
            timeout_seconds=s.get(_Webhooks.timeout_seconds),
            concurrency=s.get(_Webhooks.concurrency),
            max_queue=s.get(_Webhooks.max_queue),
            retry_initial_seconds=s.get(_Webhooks.retry_initial_seconds),
            retry_max_interval_seconds=s.get(_Webhooks.retry_max_interval_seconds),
            retry_hours=s.get(_Webhooks.retry_hours),
        )

    def webhook_endpoints(self, raw: object) -> tuple[WebhookEndpoint, ...] | None:
        path = "webhooks.endpoints"
        if not _is_list(raw) or not raw:
            shown = _ABSENT if raw is None else raw if not _is_list(raw) else []
            self.bad(path, shown, "must be a non-empty list of endpoints {name, url, events, secret}")
            return None
        endpoints: list[WebhookEndpoint] = []
        names: set[str] = set()
        ok = True
        for i, item in enumerate(raw):
            where = f"{path}[{i}]"
            if not _is_table(item):
                self.bad(where, type(item).__name__, "must be a mapping")
                ok = False
                continue
            s = self.open(item, where, _WebhookEndpoint)
            name = s.peek(_WebhookEndpoint.name)
            if name is not None:
                if name in names:
                    self.bad(f"{where}.name", name, "duplicate endpoint name")
                    ok = False
                names.add(name)
            key = self.webhook_secret(item, where) if s.ok else None
            if key is None:
                ok = False
                continue
            endpoints.append(WebhookEndpoint(s.get(_WebhookEndpoint.name), s.get(_WebhookEndpoint.url),
                                             s.get(_WebhookEndpoint.events), key))  # fmt: skip
        return tuple(endpoints) if ok else None

    def webhook_secret(self, item: Mapping[object, object], where: str) -> bytes | None:
        """The endpoint's HMAC key from exactly one of secret, secret_file and secret_env."""
        given = [k for k in ("secret", "secret_file", "secret_env") if item.get(k) is not None]
        if len(given) != 1:
            shown = ", ".join(given) if given else _ABSENT
            self.bad(f"{where}.secret", shown, "give exactly one of secret, secret_file, secret_env")
            return None
        source = given[0]
        value = item[source]
        assert isinstance(value, str)  # the field checks passed
        if source == "secret_file":
            try:
                text = Path(value).read_text(encoding="utf-8").strip()
            except OSError as exc:
                self.bad(f"{where}.secret_file", value, f"cannot be read: {exc.strerror}")
                return None
            except UnicodeDecodeError:
                self.bad(f"{where}.secret_file", value, "is not UTF-8 text")
                return None
            rule = f"the file's content {_WEBHOOK_SECRET_RULE}"
        elif source == "secret_env":
            if value not in self.environ:
                self.bad(f"{where}.secret_env", value, "names an environment variable that is not set")
                return None
            text = self.environ[value].strip()
            rule = f"the variable's value {_WEBHOOK_SECRET_RULE}"
        else:
            text, rule = value, _WEBHOOK_SECRET_RULE
        key = webhook_key(text)
        if key is None:
            self.bad(f"{where}.{source}", _SECRET if source == "secret" else value, rule)
        return key

    def usage(self, raw: object) -> UsageConfig | None:
        s = self.open(raw, "usage", _Usage)
        self.max_addresses = s.peek(_Usage.max_addresses)
        if not s.ok:
            return None
        return UsageConfig(s.get(_Usage.flush_seconds), s.get(_Usage.max_keys), s.get(_Usage.max_addresses),
                           s.get(_Usage.enabled))  # fmt: skip

    def policies(self, raw: object) -> tuple[Policy, ...]:
        if raw is None:
            return ()
        if not _is_list(raw):
            self.bad("policies", type(raw).__name__, "must be a list of {name, rule, above, window, action}")
            return ()
        out: list[Policy] = []
        names: set[str] = set()
        for i, item in enumerate(raw):
            path = f"policies[{i}]"
            if not _is_table(item):
                self.bad(path, type(item).__name__, "must be a mapping")
                continue
            s = self.open(item, path, _Policy)
            name, rule, code = s.peek(_Policy.name), s.peek(_Policy.rule), s.peek(_Policy.code)
            above = s.peek(_Policy.above)
            if name is not None:
                if name in names:
                    self.bad(f"{path}.name", name, "duplicate policy name")
                names.add(name)
            if rule == "refusals" and "code" not in item:
                self.bad(f"{path}.code", _ABSENT, "is required with rule: refusals (the refusal code counted)")
                continue
            if rule in ("distinct_addresses", "requests") and "code" in item:
                self.bad(f"{path}.code", item["code"], "only rule: refusals counts a code")
                continue
            limit = self.max_addresses
            if rule == "distinct_addresses" and limit is not None and above is not None and above >= limit:
                self.bad(f"{path}.above", above, f"must be below usage.max_addresses ({limit}): "
                         "a replica remembers at most that many addresses per key per flush")  # fmt: skip
                continue
            if s.ok and name is not None and rule is not None:
                out.append(Policy(name, rule, s.get(_Policy.above), s.get(_Policy.window), s.get(_Policy.action),
                                  s.get(_Policy.dry_run), code))  # fmt: skip
        return tuple(out)

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
        console = self.console(s.table.get("console"))
        if listen is None or not s.ok or console is None:
            return None
        return AdminConfig(listen, tokens, s.get(_Admin.propagation_timeout_seconds), console)

    def console(self, raw: object) -> ConsoleConfig | None:
        s = self.open(raw, "admin.console", _Console)
        idle, absolute = s.peek(_Console.idle_timeout_seconds), s.peek(_Console.absolute_timeout_seconds)
        if idle is not None and absolute is not None and idle > absolute:
            rule = "must not exceed admin.console.absolute_timeout_seconds"
            self.bad("admin.console.idle_timeout_seconds", idle, rule)
            return None
        if not s.ok:
            return None
        return ConsoleConfig(
            enabled=s.get(_Console.enabled),
            secure_cookies=s.get(_Console.secure_cookies),
            idle_timeout_seconds=s.get(_Console.idle_timeout_seconds),
            absolute_timeout_seconds=s.get(_Console.absolute_timeout_seconds),
            max_sessions_per_token=s.get(_Console.max_sessions_per_token),
        )

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
        sentinel = self.sentinel(s.table.get("sentinel"))
        if not s.ok or ("sentinel" in s.table and sentinel is None):
            return None
        url = s.get(_Redis.url)
        password = s.get(_Redis.password)
        if url.startswith(SENTINEL_SCHEMES):
            parsed = parse_sentinel_url(url)
            assert not isinstance(parsed, _Broken)
            if "sentinel" in s.table:
                self.bad("redis.sentinel", _NOT_SHOWN, "give a redis+sentinel:// URL or redis.sentinel, not both")
            sentinel, from_url = parsed
            if from_url is not None and password is not None:
                self.bad("redis.password", _SECRET, "give the password in redis.url or redis.password, not both")
            password = password or from_url
        elif url != "embedded":
            if password is not None and urlsplit(url).password:
                self.bad("redis.password", _SECRET, "give the password in redis.url or redis.password, not both")
            if "sentinel" in s.table:
                self.bad("redis.sentinel", _NOT_SHOWN, "give redis.url or redis.sentinel, not both")
        single = None if url == "embedded" or url.startswith(SENTINEL_SCHEMES) else url
        external = single is not None or sentinel is not None
        if not external and password is not None:
            self.bad("redis.password", _SECRET, "is for an external Redis (redis.url or redis.sentinel)")
        acked = s.get(_Redis.min_replicas_acked)
        if not external and acked > 0:
            self.bad("redis.min_replicas_acked", acked, "needs an external Redis with replicas, not the embedded one")
        return RedisConfig(
            url=single,
            prefix=s.get(_Redis.prefix),
            channel_secret=s.get(_Redis.channel_secret),
            data_dir=Path(s.get(_Redis.data_dir)),
            health_check_seconds=s.get(_Redis.health_check_seconds),
            lease_seconds=s.get(_Redis.lease_seconds),
            password=password,
            sentinel=sentinel,
            min_replicas_acked=acked,
            min_replicas_timeout_seconds=s.get(_Redis.min_replicas_timeout_seconds),
        )

    def sentinel(self, raw: object) -> SentinelConfig | None:
        if raw is None:
            return None
        s = self.open(raw, "redis.sentinel", _Sentinel)
        if not s.ok:
            return None
        return SentinelConfig(
            master_name=s.get(_Sentinel.master_name),
            sentinels=s.get(_Sentinel.sentinels),
            password=s.get(_Sentinel.password),
            tls=s.get(_Sentinel.tls),
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
