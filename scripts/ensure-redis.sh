#!/usr/bin/env bash
# Make sure a redis-server binary exists: PATH first, then Debian's package when root.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's redis-server package" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  # The package may start a system service on 6379; the gateway and its tests never use it.
  exit 0
fi
echo "redis-server not found: install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)" >&2
exit 1
