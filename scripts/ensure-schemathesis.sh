#!/usr/bin/env bash
# Schemathesis for tests/test_openapi.py, which fuzzes the admin API against its OpenAPI document.
# It goes into a virtual environment of its own, .venv-schemathesis/, because it needs newer pytest
# and hypothesis than the lowest versions the suite is also run on (constraints/lowest.txt); the
# test runs its command-line tool from there, so both suites run it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-schemathesis
PIN="schemathesis==4.32.5"
STAMP="$VENV/.installed"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PIN" ] && "$VENV/bin/schemathesis" --version >/dev/null 2>&1; then
  exit 0
fi
echo "installing $PIN into $VENV/" >&2
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  printf '*\n' >"$VENV/.gitignore"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$VENV/bin/python" -m pip install -qq --upgrade pip
"$VENV/bin/python" -m pip install -qq "$PIN"
"$VENV/bin/schemathesis" --version >/dev/null
echo "$PIN" >"$STAMP"
