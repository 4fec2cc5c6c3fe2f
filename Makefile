# Two entry points (see README): `make dev` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install dev test test-fast lint format bench faults acceptance browser-deps clean lock update-prices

# Installs come only from the lock (requirements/*.txt: exact versions and sha256 hashes, compiled
# by pip-tools from pyproject.toml): pip's hash-checking mode refuses anything not pinned there, and
# the project itself is installed without resolving anything (--no-deps, build backend from the lock).
# A new release of any package changes nothing until `make lock` or `make update-prices` is run.
LOCK := requirements/dev.txt
PIP_COMPILE := $(VENV)/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras

$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

## make dev: install, then run the whole stack on the embedded broker + ClickHouse with demo traffic
dev: install
	$(VENV)/bin/spendstream dev --demo

## make test: install, then run every test (unit, integration, e2e, faults at CI size, browser)
test: install browser-deps
	$(PY) -m pytest -q -p no:cacheprovider --durations=30

## make lint: ruff's linter and formatter check (config in pyproject.toml); `make format` applies the formatter
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## fast feedback while developing: pure unit tests only
test-fast: install
	$(PY) -m pytest -q tests/unit

## headless Chromium for the dashboard test (Debian package; skipped when not root and absent)
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will be skipped"; }

bench: install
	$(PY) -m bench

faults: install
	SPENDSTREAM_FAULTS_EVENTS=1000000 $(PY) -m pytest -q -m faults tests/faults

## full-size pipeline runs: 100k events gateway -> pricing -> sink, 200k-event sink SIGKILL test
acceptance: install
	SPENDSTREAM_E2E_EVENTS=100000 SPENDSTREAM_SINK_CRASH_EVENTS=200000 $(PY) -m pytest -q -p no:cacheprovider tests/e2e/test_pipeline.py tests/integration/test_sink.py

## make lock: re-resolve every dependency to its newest allowed version (on purpose, then review the diff)
lock: install
	$(PIP_COMPILE) --upgrade -o requirements/main.txt pyproject.toml requirements/build.in
	$(PIP_COMPILE) --upgrade --extra dev -c requirements/main.txt -o requirements/dev.txt pyproject.toml requirements/build.in
	$(MAKE) install

## make update-prices: bump only genai-prices (the price catalog), regenerate the fixtures that derive
## from it, and print which models' prices changed
update-prices: install
	$(PY) tests/fixtures/catalog_prices.py dump $(VENV)/catalog-before.json
	$(PIP_COMPILE) --upgrade-package genai-prices -o requirements/main.txt pyproject.toml requirements/build.in
	$(PIP_COMPILE) --upgrade-package genai-prices --extra dev -c requirements/main.txt -o requirements/dev.txt pyproject.toml requirements/build.in
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) tests/fixtures/make_pricing_corpus.py
	$(PY) tests/fixtures/catalog_prices.py dump $(VENV)/catalog-after.json
	$(PY) tests/fixtures/catalog_prices.py diff $(VENV)/catalog-before.json $(VENV)/catalog-after.json

clean:
	rm -rf $(VENV) .spendstream .pytest_cache
