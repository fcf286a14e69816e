# The documented entry points: `make run` and `make test` (README).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-lowest lint install redis deploy-tools clean bench bench-propagation bench-verify bench-ratelimit bench-scale

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
	$(VENV)/bin/lint-imports

# The suite on the newest allowed dependencies (.venv), then on the lowest ones (test-lowest); both in
# parallel, one pytest-xdist worker per CPU (addopts in pyproject.toml; `pytest -n 0` runs it serially).
test: install redis deploy-tools lint
	@bash scripts/ensure-verify-proxies.sh
	@bash scripts/ensure-console-browser.sh
	@bash scripts/ensure-schemathesis.sh
	$(VENV)/bin/pytest
	$(MAKE) --no-print-directory test-lowest

# The lowest version of every dependency pyproject.toml allows (constraints/lowest.txt), in a
# virtualenv of its own: a declared minimum is one the suite has passed on. No lint here (old ruff
# and mypy judge differently; `make lint` runs in .venv). Rebuilt from scratch when either file changes.
LOWEST       := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed

$(LOWEST_STAMP): pyproject.toml constraints/lowest.txt
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	printf '*\n' > $(LOWEST)/.gitignore
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST)/bin/python -m pip install --quiet -c constraints/lowest.txt -e '.[dev]'
	touch $(LOWEST_STAMP)

test-lowest: $(LOWEST_STAMP) redis deploy-tools
	$(LOWEST)/bin/python scripts/lowest-versions.py constraints/lowest.txt
	$(LOWEST)/bin/pytest -p no:cacheprovider

# Disable -> refused on all 3 replicas, over 200 disables (prints p50/p99/max).
bench-propagation: install redis
	$(PY) benchmarks/propagation.py --disables 200

# The key table at 10k / 100k / 1M keys (issue 15): Redis bytes a key, replica ready time, gateway RSS a
# key, import keys/s, proxied p50/p99; prints the table of docs/scale.md (about 4 min; SIZES= to change).
SIZES ?= 10000,100000,1000000
bench-scale: install redis
	$(PY) benchmarks/scale.py --sizes $(SIZES)

# The gateway against nginx, a naive aiohttp proxy and itself, with wrk (installs nginx, wrk and
# matplotlib when missing); prints a table, writes benchmarks/results/bench.json, docs/bench.png and the results
# section of docs/performance.md (median over interleaved rounds, with the range; disturbed rounds flagged).
bench: install redis
	bash scripts/ensure-bench-tools.sh
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/verify.py

# Rate limits across 3 replicas (spec 12): admitted per window vs the limit for 10 to 10,000 a window,
# even and 90/10 load, the first 429 point, 100 credits under 1,000 concurrent requests, and the
# hot-path cost of a limit (about 4.5 min; `--quick` about 2.5; prints a table, exits 1 on a miss).
bench-ratelimit: install redis
	$(PY) benchmarks/ratelimit.py

# Verify mode: front nginx with the shipped auth_request config to the gateway's verify listener,
# against the same nginx with auth_request to a static 200 (the mechanism's floor), same run; p99 at
# 5,000 verifications/s (about 3 min; prints a table, writes benchmarks/results/verify.json).
bench-verify: install redis
	bash scripts/ensure-bench-tools.sh
	$(PY) benchmarks/verify.py

clean:
	rm -rf $(VENV) $(LOWEST) .venv-tools .venv-schemathesis artifacts .gateway-data .pytest_cache .mypy_cache .ruff_cache
