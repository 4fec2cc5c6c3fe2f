# Two entry points (see README): `make dev` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install dev test test-fast bench faults acceptance browser-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make dev: install, then run the whole stack on the embedded broker + ClickHouse with demo traffic
dev: install
	$(VENV)/bin/spendstream dev --demo

## make test: install, then run every test (unit, integration, e2e, faults at CI size, browser)
test: install browser-deps
	$(PY) -m pytest -q -p no:cacheprovider

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

clean:
	rm -rf $(VENV) .spendstream .pytest_cache
