#!/usr/bin/env bash
# Make sure redis-server and redis-sentinel exist: PATH first, then Debian's packages when root.
# (The Sentinel failover tests run redis-sentinel; `redis-server --sentinel` is the same program.)
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "${missing[*]} not found: installing Debian's package(s)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # The packages may start system services on 6379/26379; the gateway and its tests never use them.
  exit 0
fi
if command -v redis-server >/dev/null 2>&1; then
  echo "redis-sentinel not found: the Sentinel tests run 'redis-server --sentinel' instead" >&2
  exit 0
fi
echo "redis-server not found: install it (Debian/Ubuntu: sudo apt-get install redis-server redis-sentinel; macOS: brew install redis)" >&2
exit 1
