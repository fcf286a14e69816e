#!/usr/bin/env bash
# Tools `make bench` needs beyond the project's venv: nginx and wrk (Debian's packages) and
# matplotlib (into .venv). Installs what is missing when root; otherwise says what to install.
# nginx is only ever run by benchmarks/bench.py as its own child: if the package starts the
# system service, it is stopped and disabled again here.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq
    # policy-rc.d exit 101: the package's maintainer scripts may not start services.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy"
      chmod +x "$policy"
      made_policy=1
    fi
    status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
    if [ "$made_policy" = "1" ]; then
      rm -f "$policy"
    fi
    [ "$status" = "0" ] || { echo "bench: apt-get install ${missing[*]} failed" >&2; exit "$status"; }
    # Belt and braces: no nginx system service may stay running or enabled.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl stop nginx >/dev/null 2>&1 || true
      systemctl disable nginx >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/nginx ]; then
      /etc/init.d/nginx stop >/dev/null 2>&1 || true
    fi
  else
    echo "bench: missing ${missing[*]}: install them (Debian/Ubuntu: sudo apt-get install ${missing[*]};" \
      "macOS: brew install nginx wrk), or run 'make bench' as root" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "bench: .venv is missing: run 'make install' first" >&2
  exit 1
fi
if ! .venv/bin/python -c "import matplotlib" >/dev/null 2>&1; then
  echo "bench: installing matplotlib into .venv" >&2
  .venv/bin/pip install -q matplotlib
fi
