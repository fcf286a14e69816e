"""Real nginx and Caddy in front of the gateway's verifier, for the verify-mode tests.

docs/verify-proxies.md explains these configurations line by line; the text here is the
same text, with the test's addresses in place of `gateway-verify:8082` and `upstream:9000`
(`site_nginx` and `site_caddy` render it for any addresses, so the two can be compared).

`running_nginx` and `running_caddy` write a configuration into a work directory, start the
real binary in the foreground on a free 127.0.0.1 port, wait until it accepts connections,
yield its base URL (`http://127.0.0.1:PORT`), and stop it on the way out. Both ask the
verifier at the path `VERIFY_PATH` under the verifier URL (`<verify_url>/verify`) and
forward allowed requests to the upstream URL with the original request target unchanged.

What the verifier is expected to do (the contract both configurations rely on):
- read the original request from `X-Forwarded-Method` and `X-Forwarded-Uri` (both proxies
  overwrite whatever the client sent under those names; nginx also sends `X-Original-URI`
  and `X-Original-Method`, but Caddy passes a client's `X-Original-URI` through untouched);
- allow with status 200 and all four of `X-Gateway-Key-Id`, `X-Gateway-Key-Owner`,
  `X-Gateway-Key-Scopes` (space-separated, empty when none) and `X-Request-Id`;
- refuse with the refusal's status, its JSON body, and the same body bytes in the
  `X-Gateway-Error-Body` response header. nginx cannot read a verifier's body, so it answers
  the client with that header's value; Caddy passes the body itself and drops the header.

Nothing here needs the gateway: tests can point these at any verifier and upstream.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.conftest import free_port  # outside the ephemeral range: see there

VERIFY_PATH = "/verify"
DEFAULT_VERIFY_TIMEOUT_S = 5  # how long either proxy waits for the verifier's answer
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

# The nginx `http {}` content the docs show: the verifier and the API as upstreams, two maps,
# and the server. __VERIFY__, __UPSTREAM__, __VERIFY_PATH__, __LISTEN__ and __TIMEOUT__ are
# filled in by `site_nginx`.
NGINX_SITE = """\
upstream gateway_verify {
    server __VERIFY__;
    keepalive 16;
}

upstream api {
    server __UPSTREAM__;
    keepalive 16;
}

# The verifier's status as auth_request saw it (the last one if nginx retried a stale connection).
map $gw_upstream_status $gw_status {
    "~(?<last>[0-9]+)$" $last;
    default             "";
}

# The request id of a refusal: the verifier's, else nginx's own.
map $gw_request_id $gw_reply_request_id {
    ""      $request_id;
    default $gw_request_id;
}

server {
    listen __LISTEN__;

    location / {
        auth_request /_gateway_verify;
        auth_request_set $gw_upstream_status $upstream_status;
        auth_request_set $gw_key_id          $upstream_http_x_gateway_key_id;
        auth_request_set $gw_key_owner       $upstream_http_x_gateway_key_owner;
        auth_request_set $gw_key_scopes      $upstream_http_x_gateway_key_scopes;
        auth_request_set $gw_request_id      $upstream_http_x_request_id;
        auth_request_set $gw_error_body      $upstream_http_x_gateway_error_body;
        auth_request_set $gw_retry_after     $upstream_http_retry_after;
        auth_request_set $gw_allow           $upstream_http_allow;
        # auth_request answers 401 or 403 for those statuses and 500 for every other refusal.
        error_page 401 403 500 = @gateway_refusal;

        # Set from the verifier's answer; a client's header of the same name is never passed,
        # and an empty value sends no header at all.
        proxy_set_header X-Gateway-Key-Id     $gw_key_id;
        proxy_set_header X-Gateway-Key-Owner  $gw_key_owner;
        proxy_set_header X-Gateway-Key-Scopes $gw_key_scopes;
        proxy_set_header X-Request-Id         $gw_request_id;
        proxy_set_header Host                 $http_host;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # The request goes upstream as it arrives, not once its whole body is buffered: a key
        # disabled while a slow upload comes in must not be forwarded after the disable answered.
        proxy_request_buffering off;
        # No URI part: the upstream gets the request target exactly as the client sent it,
        # the same bytes the verifier saw in X-Forwarded-Uri.
        proxy_pass http://api;
    }

    location = /_gateway_verify {
        internal;
        proxy_pass http://gateway_verify__VERIFY_PATH__;
        proxy_method GET;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_set_header Transfer-Encoding "";
        # A refusal's body in X-Gateway-Error-Body only: nginx keeps its connection to the verifier
        # only after an answer without a body.
        proxy_set_header X-Gateway-Refusal-Body header;
        # The original request; set here, so a client's headers of these names never reach the verifier.
        proxy_set_header X-Forwarded-Method $request_method;
        proxy_set_header X-Forwarded-Uri    $request_uri;
        proxy_set_header X-Forwarded-Host   $http_host;
        proxy_set_header X-Forwarded-Proto  $scheme;
        proxy_set_header X-Forwarded-For    $remote_addr;
        proxy_set_header X-Original-Method  $request_method;
        proxy_set_header X-Original-URI     $request_uri;
        proxy_set_header Host               $http_host;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_connect_timeout 2s;
        proxy_send_timeout __TIMEOUT__s;
        proxy_read_timeout __TIMEOUT__s;
    }

    # Every refusal ends here and never reaches proxy_pass: the answer is built from the
    # verifier's status and X-Gateway-Error-Body, or is a 503 when there is no such answer.
    location @gateway_refusal {
        default_type application/json;
        add_header X-Request-Id  $gw_reply_request_id always;
        add_header Cache-Control "no-store" always;
        add_header Retry-After   $gw_retry_after always;
        add_header Allow         $gw_allow always;
        if ($gw_error_body = "") {
            return 503 '{"meta":{"requestId":"$gw_reply_request_id"},"error":{"code":"auth_unavailable","title":"Service Unavailable","detail":"The key verifier could not be reached or gave no answer","status":503,"type":"https://gateway.dev/errors/auth_unavailable"}}';
        }
        if ($gw_status = 400) { return 400 $gw_error_body; }
        if ($gw_status = 401) { return 401 $gw_error_body; }
        if ($gw_status = 403) { return 403 $gw_error_body; }
        if ($gw_status = 404) { return 404 $gw_error_body; }
        if ($gw_status = 405) { return 405 $gw_error_body; }
        if ($gw_status = 408) { return 408 $gw_error_body; }
        if ($gw_status = 413) { return 413 $gw_error_body; }
        if ($gw_status = 429) { return 429 $gw_error_body; }
        if ($gw_status = 431) { return 431 $gw_error_body; }
        if ($gw_status = 500) { return 500 $gw_error_body; }
        if ($gw_status = 502) { return 502 $gw_error_body; }
        if ($gw_status = 503) { return 503 $gw_error_body; }
        if ($gw_status = 504) { return 504 $gw_error_body; }
        return 503 '{"meta":{"requestId":"$gw_reply_request_id"},"error":{"code":"auth_unavailable","title":"Service Unavailable","detail":"The key verifier could not be reached or gave no answer","status":503,"type":"https://gateway.dev/errors/auth_unavailable"}}';
    }
}
"""  # noqa: E501

# The process-level frame the tests add around NGINX_SITE: everything nginx writes goes into
# the work directory. __USER__ is `user root;` when running as root, so workers can write
# request bodies into a work directory that only root may enter.
NGINX_FRAME = """\
__USER__worker_processes 1;
pid __DIR__/nginx.pid;
error_log __DIR__/error.log info;
events {
    worker_connections 256;
}
http {
    access_log __DIR__/access.log;
    client_body_temp_path __DIR__/temp/client_body;
    proxy_temp_path __DIR__/temp/proxy;
    fastcgi_temp_path __DIR__/temp/fastcgi;
    uwsgi_temp_path __DIR__/temp/uwsgi;
    scgi_temp_path __DIR__/temp/scgi;

__SITE__}
"""

# The Caddyfile route the docs show. __VERIFY__, __UPSTREAM__, __VERIFY_PATH__ and __TIMEOUT__
# are filled in by `site_caddy`.
CADDY_ROUTE = """\
	route {
		# Drop every identity header the client sent before anything reads the request.
		request_header -X-Gateway-*
		request_header -X_Gateway_*
		request_header -X-Gateway_*
		request_header -X_Gateway-*
		forward_auth __VERIFY__ {
			uri __VERIFY_PATH__
			copy_headers X-Gateway-Key-Id X-Gateway-Key-Owner X-Gateway-Key-Scopes X-Request-Id
			# forward_auth sets X-Forwarded-Method and X-Forwarded-Uri; a client's X-Original-* would pass.
			header_up -X-Original-*
			header_down -X-Gateway-Error-Body
			transport http {
				dial_timeout 2s
				response_header_timeout __TIMEOUT__s
			}
		}
		# Caddy 2.6 copies a header the verifier did not send as its literal placeholder: drop those.
		@unset_key_id header X-Gateway-Key-Id "{http.reverse_proxy.header.*"
		request_header @unset_key_id -X-Gateway-Key-Id
		@unset_key_owner header X-Gateway-Key-Owner "{http.reverse_proxy.header.*"
		request_header @unset_key_owner -X-Gateway-Key-Owner
		@unset_key_scopes header X-Gateway-Key-Scopes "{http.reverse_proxy.header.*"
		request_header @unset_key_scopes -X-Gateway-Key-Scopes
		@unset_request_id header X-Request-Id "{http.reverse_proxy.header.*"
		request_header @unset_request_id -X-Request-Id
		reverse_proxy __UPSTREAM__
	}
"""

# The frame the tests add: no admin endpoint, no certificates, plain HTTP on loopback.
CADDY_FRAME = """\
{
	admin off
	auto_https off
}

http://:__PORT__ {
	bind 127.0.0.1
__ROUTE__}
"""


@dataclass(frozen=True, slots=True)
class Target:
    """Where an HTTP URL points: `host:port` and the path in front of anything we add."""

    hostport: str
    base_path: str


def parse_target(url: str) -> Target:
    """Split a plain-HTTP URL into the `host:port` a proxy dials and its path, without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http:// URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"expected a URL without query or fragment, got {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Target(f"{host}:{parts.port or 80}", parts.path.rstrip("/"))


_PLACEHOLDER = re.compile(r"__[A-Z][A-Z_]*__")


def _fill(template: str, values: dict[str, str]) -> str:
    """`template` with each `__NAME__` replaced; a name left unfilled is a bug in this module."""
    for name, value in values.items():
        template = template.replace(f"__{name}__", value)
    leftover = _PLACEHOLDER.search(template)
    if leftover is not None:
        raise AssertionError(f"unfilled placeholder {leftover.group()} in a proxy config")
    return template


def site_nginx(
    verify: str,
    upstream: str,
    listen: str,
    *,
    verify_path: str = VERIFY_PATH,
    verify_timeout_s: int = DEFAULT_VERIFY_TIMEOUT_S,
) -> str:
    """The nginx `http {}` content for a verifier at `verify` and an API at `upstream` (both `host:port`)."""
    return _fill(
        NGINX_SITE,
        {
            "VERIFY": verify,
            "UPSTREAM": upstream,
            "LISTEN": listen,
            "VERIFY_PATH": verify_path,
            "TIMEOUT": str(verify_timeout_s),
        },
    )


def site_caddy(
    verify: str, upstream: str, *, verify_path: str = VERIFY_PATH, verify_timeout_s: int = DEFAULT_VERIFY_TIMEOUT_S
) -> str:
    """The Caddyfile `route {}` block for a verifier at `verify` and an API at `upstream` (both `host:port`)."""
    return _fill(
        CADDY_ROUTE,
        {"VERIFY": verify, "UPSTREAM": upstream, "VERIFY_PATH": verify_path, "TIMEOUT": str(verify_timeout_s)},
    )


def nginx_binary() -> str | None:
    """The nginx executable, or None when it is missing or lacks the auth_request module."""
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if path is None:
        return None
    built = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10, check=False)
    return path if "--with-http_auth_request_module" in built.stdout + built.stderr else None


def caddy_binary() -> str | None:
    """The caddy executable, or None when it is not installed."""
    return shutil.which("caddy")


def _tail(path: Path, limit: int = 4000) -> str:
    """The last `limit` characters of a log file, or a note that there is none."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return f"(no log at {path})"


def _wait_until_accepting(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Return once 127.0.0.1:`port` accepts a connection; raise if the process exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with status {proc.returncode} before listening:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"proxy did not accept connections on 127.0.0.1:{port} within {START_TIMEOUT_S}s:\n{_tail(log)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a proxy started in its own session: SIGTERM (nginx's master then waits for its workers),
    and SIGKILL to the whole process group only if it is still there after STOP_TIMEOUT_S."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def _running(argv: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `argv` in the foreground in its own session, yield its base URL once it listens, then stop it."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_until_accepting(proc, port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@contextlib.contextmanager
def running_nginx(
    workdir: Path, verify_url: str, upstream_url: str, *, verify_timeout_s: int = DEFAULT_VERIFY_TIMEOUT_S
) -> Iterator[str]:
    """Real nginx with the docs' auth_request configuration, on a free 127.0.0.1 port.

    The verifier is asked at `<verify_url>/verify`; allowed requests go to `upstream_url`
    (its host and port only: nginx forwards the client's request target unchanged). The
    configuration, pid file, logs and temp files all live in `workdir`. Yields the base URL.
    """
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx with the auth_request module is not installed")
    verify, upstream = parse_target(verify_url), parse_target(upstream_url)
    if upstream.base_path:
        raise ValueError(
            f"nginx forwards the client's path unchanged; give the upstream without a path: {upstream_url!r}"
        )
    workdir = workdir.resolve()
    (workdir / "temp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    site = site_nginx(
        verify.hostport,
        upstream.hostport,
        f"127.0.0.1:{port}",
        verify_path=verify.base_path + VERIFY_PATH,
        verify_timeout_s=verify_timeout_s,
    )
    indented = "".join(f"    {line}\n" if line else "\n" for line in site.splitlines())
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(_fill(NGINX_FRAME, {"USER": user, "DIR": str(workdir), "SITE": indented}))
    log = workdir / "nginx.out"
    argv = [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log"), "-g", "daemon off;"]
    with _running(argv, port, log) as url:
        yield url


@contextlib.contextmanager
def running_caddy(
    workdir: Path, verify_url: str, upstream_url: str, *, verify_timeout_s: int = DEFAULT_VERIFY_TIMEOUT_S
) -> Iterator[str]:
    """Real Caddy with the docs' forward_auth configuration, on a free 127.0.0.1 port.

    The verifier is asked at `<verify_url>/verify` (Caddy keeps the client's query string on
    that request); allowed requests go to `upstream_url` (host and port only). The admin
    endpoint is off, and HOME and the XDG directories point into `workdir`, so Caddy writes
    nothing outside it. Yields the base URL.
    """
    binary = caddy_binary()
    if binary is None:
        raise RuntimeError("caddy is not installed")
    verify, upstream = parse_target(verify_url), parse_target(upstream_url)
    if upstream.base_path:
        raise ValueError(
            f"Caddy forwards the client's path unchanged; give the upstream without a path: {upstream_url!r}"
        )
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    route = site_caddy(
        verify.hostport,
        upstream.hostport,
        verify_path=verify.base_path + VERIFY_PATH,
        verify_timeout_s=verify_timeout_s,
    )
    caddyfile = workdir / "Caddyfile"
    caddyfile.write_text(_fill(CADDY_FRAME, {"PORT": str(port), "ROUTE": route}))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CADDY", "XDG_"))}
    env.update(
        HOME=str(workdir),
        XDG_CONFIG_HOME=str(workdir / "config"),
        XDG_DATA_HOME=str(workdir / "data"),
        XDG_CACHE_HOME=str(workdir / "cache"),
    )
    argv = [binary, "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
    with _running(argv, port, workdir / "caddy.log", env) as url:
        yield url
