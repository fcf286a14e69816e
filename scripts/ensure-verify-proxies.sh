#!/usr/bin/env bash
# nginx (with the auth_request module) and Caddy for tests/test_verify_proxies.py, which runs both in
# front of the gateway's verify listener (docs/verify-proxies.md). Installs Debian's `nginx` and
# `caddy` packages when missing and we are root; otherwise says what to install and exits 0 (those
# tests then skip). The tests start their own nginx and caddy: if a package starts or enables its
# system service, it is stopped and disabled again here.
set -euo pipefail

nginx_path() {
  command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true
}

nginx_ok() {
  local nginx built
  nginx=$(nginx_path)
  [ -n "$nginx" ] || return 1
  built=$("$nginx" -V 2>&1 || true)
  case "$built" in
    *http_auth_request_module*) return 0 ;;
    *) return 1 ;;
  esac
}

caddy_ok() {
  command -v caddy >/dev/null 2>&1
}

missing=()
nginx_ok || missing+=(nginx)
caddy_ok || missing+=(caddy)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ -n "$(nginx_path)" ] && ! nginx_ok; then
  echo "verify-proxies: $(nginx_path) lacks the auth_request module (nginx -V has no --with-http_auth_request_module)" >&2
fi

if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "verify-proxies: missing ${missing[*]}: tests/test_verify_proxies.py skips them. Install them" \
    "(Debian/Ubuntu: sudo apt-get install ${missing[*]}; macOS: brew install ${missing[*]})," \
    "or run 'make test' as root" >&2
  exit 0
fi

# nginx and caddy processes already running (someone else's: never touched), to tell them from a
# daemon the install starts.
running_before=" $(pgrep -d ' ' -x 'nginx|caddy' || true) "
nginx_pid_before=$(cat /run/nginx.pid 2>/dev/null || true)

echo "verify-proxies: installing Debian packages: ${missing[*]}" >&2
# The package lists are refreshed only when they do not know a package (or an install from them fails).
updated=0
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  updated=1
fi
# policy-rc.d exit 101: the packages' maintainer scripts may not start their services.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  made_policy=1
fi
install_missing() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
status=0
install_missing || status=$?
if [ "$status" != "0" ] && [ "$updated" = "0" ]; then
  echo "verify-proxies: install failed; refreshing the package lists and trying again" >&2
  status=0
  { apt-get update -qq && install_missing; } || status=$?
fi
if [ "$made_policy" = "1" ]; then
  rm -f "$policy"
fi
[ "$status" = "0" ] || { echo "verify-proxies: apt-get install ${missing[*]} failed" >&2; exit "$status"; }

# No system service of what we installed may stay running or enabled: the tests run their own, on
# free ports. Without systemd, a daemon the package started is found by its own marks (Debian's pid
# file for nginx, the packaged Caddyfile for caddy) among the processes that were not running before.
systemctl disable --now "${missing[@]}" >/dev/null 2>&1 || true
nginx_pid=$(cat /run/nginx.pid 2>/dev/null || true)
for pid in $(pgrep -x 'nginx|caddy' || true); do
  case "$running_before" in *" $pid "*) continue ;; esac
  args=$(ps -o args= -p "$pid" 2>/dev/null || true)
  packaged=0
  [ "$pid" = "$nginx_pid" ] && [ "$nginx_pid" != "$nginx_pid_before" ] && packaged=1
  [[ "$args" == *caddy*/etc/caddy/Caddyfile* ]] && packaged=1
  if [ "$packaged" = "1" ]; then
    echo "verify-proxies: stopping the service the install started: $pid $args" >&2
    kill -TERM "$pid" 2>/dev/null || true
  fi
done

nginx_ok || { echo "verify-proxies: nginx with the auth_request module is still missing after the install" >&2; exit 1; }
caddy_ok || { echo "verify-proxies: caddy is still missing after the install" >&2; exit 1; }
