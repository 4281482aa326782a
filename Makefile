# Two commands a newcomer needs: `make run` (the embedded dev default) and `make test`.
# Both build the virtualenv they need on first use. HACKING.md explains the test tiers.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Linters for the deploy files (checkov, hadolint) live in their own venv: checkov pins
# versions of libraries the relay also uses.
TOOLS_VENV  ?= .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed

.PHONY: run test test-fast lint typecheck bench fuzz soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,speed]'
	touch $@

$(TOOLS_STAMP): requirements-tools.txt
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q --upgrade pip
	$(TOOLS_VENV)/bin/pip install -q -r requirements-tools.txt
	touch $@

run: $(STAMP)
	RELAY_DEV_DIR=$(CURDIR)/.relay-dev $(VENV)/bin/relay serve

# Everything: lint, format, types, then every test (the in-process tier, the process-level
# e2e tests and those that need system programs).
test: lint typecheck $(TOOLS_STAMP)
	RELAY_TOOLS_BIN=$(CURDIR)/$(TOOLS_VENV)/bin tests/loopback-only $(PY) -m pytest $(PYTEST_ARGS)

# The fast tier: the relay in the test's event loop, unit tests; no process, no system
# program. Seconds, for the edit-test loop.
test-fast: $(STAMP)
	tests/loopback-only $(PY) -m pytest -q -m "not e2e and not binaries" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check relay tests bench
	$(PY) -m ruff format --check relay tests bench

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

# The property tests of tests/test_properties.py with many more examples (the SMTP edge over
# real sockets, the parser, the signer, linear work): ~20-40 min on 2 shared cores.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz tests/loopback-only $(PY) -m pytest -q -p no:cacheprovider --timeout 7200 tests/test_properties.py $(PYTEST_ARGS)

# 1,000 concurrent sessions for 10 minutes, misbehaving at random (bench/soak.py).
soak: $(STAMP)
	tests/loopback-only $(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .pytest_cache .ruff_cache .relay-dev
