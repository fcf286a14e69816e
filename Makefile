# The documented entry points: `make run` and `make test` (README).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint install redis deploy-tools clean bench bench-propagation

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# redis-server from PATH, or from Debian's packages when we are root.
redis:
	@bash scripts/ensure-redis.sh

# A demo: embedded Redis, a demo upstream, a demo admin token and key, curl lines.
run: install redis
	$(PY) scripts/demo.py

# hadolint, kubernetes-validate and checkov for tests/test_deploy.py, in .venv-tools/ (checkov pins
# many libraries; it must not touch .venv).
deploy-tools:
	@bash scripts/install-deploy-tools.sh

lint: install
	$(VENV)/bin/ruff check gateway tests scripts benchmarks
	$(VENV)/bin/ruff format --check gateway tests scripts benchmarks
	$(VENV)/bin/mypy

test: install redis deploy-tools lint
	$(VENV)/bin/pytest

# Disable -> refused on all 3 replicas, over 200 disables (prints p50/p99/max).
bench-propagation: install redis
	$(PY) benchmarks/propagation.py --disables 200

# The gateway against nginx, a naive aiohttp proxy and itself, with wrk (installs nginx, wrk and
# matplotlib when missing); prints a table, writes benchmarks/results/bench.json and docs/bench.png.
bench: install redis
	bash scripts/ensure-bench-tools.sh
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) .venv-tools .gateway-data .pytest_cache .mypy_cache .ruff_cache
