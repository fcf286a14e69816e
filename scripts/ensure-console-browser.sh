#!/usr/bin/env bash
# Chromium and chromedriver for tests/test_console_browser.py, which drives the operator console in
# a real headless browser through Selenium. Installs Debian's `chromium` and `chromium-driver` when
# missing and we are root; otherwise says what to install and exits 0 (those tests then skip, and
# say why).
set -euo pipefail

have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/bin/$1" ]
}

missing=()
have chromium || have chromium-browser || missing+=(chromium)
have chromedriver || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "console-browser: missing ${missing[*]}: tests/test_console_browser.py skips. Install them" \
    "(Debian/Ubuntu: sudo apt-get install chromium chromium-driver), or run 'make test' as root" >&2
  exit 0
fi

echo "console-browser: installing Debian packages: ${missing[*]}" >&2
updated=0
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  updated=1
fi
install_missing() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
status=0
install_missing || status=$?
if [ "$status" != "0" ] && [ "$updated" = "0" ]; then
  echo "console-browser: install failed; refreshing the package lists and trying again" >&2
  status=0
  { apt-get update -qq && install_missing; } || status=$?
fi
[ "$status" = "0" ] || { echo "console-browser: apt-get install ${missing[*]} failed" >&2; exit "$status"; }
have chromedriver || { echo "console-browser: chromedriver is still missing after the install" >&2; exit 1; }
