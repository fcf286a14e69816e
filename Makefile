# The documented entry points: `make run` and `make test` (README).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint install redis clean bench-propagation

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

lint: install
	$(VENV)/bin/ruff check gateway tests scripts benchmarks
	$(VENV)/bin/ruff format --check gateway tests scripts benchmarks
	$(VENV)/bin/mypy

test: install redis lint
	$(VENV)/bin/pytest

# Disable -> refused on all 3 replicas, over 200 disables (prints p50/p99/max).
bench-propagation: install redis
	$(PY) benchmarks/propagation.py --disables 200

clean:
	rm -rf $(VENV) .gateway-data .pytest_cache .mypy_cache .ruff_cache
