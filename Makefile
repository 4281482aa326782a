# Two commands a newcomer needs: `make run` (the embedded dev default) and `make test`.
# Both build the virtualenv they need on first use. HACKING.md explains the test tiers.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
# Linters for the deploy files (checkov, hadolint) and uv (for `make lock`) live in their own
# venv: checkov pins versions of libraries the relay also uses.
TOOLS_VENV  ?= .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed
# Every install of relay's dependencies comes from these (pinned, with hashes): see `make lock`.
LOCKS := requirements/build.txt requirements/image.txt requirements/test.txt
# The image test's inputs that need the network (Debian mirror, PyPI), made before the tests
# run in their loopback-only namespace: the debootstrap base and the wheels of the lock files.
IMAGE_CACHE ?= $(CURDIR)/.cache/image

.PHONY: run test test-fast lint typecheck bench bench-tools fuzz soak clean lock image-cache

# `make run` needs what the image ships (image.txt); `make test` adds the test tools (test.txt,
# the same pins plus pytest & co). Both refuse lock files older than pyproject.toml.
$(RUN_STAMP): pyproject.toml $(LOCKS)
	$(PYTHON) requirements/lock.py check
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements/image.txt -r requirements/build.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q --require-hashes -r requirements/test.txt
	$(PY) -m pip check
	touch $@

$(TOOLS_STAMP): requirements-tools.txt
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q --upgrade pip
	$(TOOLS_VENV)/bin/pip install -q -r requirements-tools.txt
	touch $@

run: $(RUN_STAMP)
	RELAY_DEV_DIR=$(CURDIR)/.relay-dev $(VENV)/bin/relay serve

# Everything: lint, format, types, then every test (the in-process tier, the process-level
# e2e tests and those that need system programs, the image and Terraform among them).
test: lint typecheck $(TOOLS_STAMP) image-cache
	RELAY_TOOLS_BIN=$(CURDIR)/$(TOOLS_VENV)/bin RELAY_IMAGE_CACHE=$(IMAGE_CACHE) \
	  tests/loopback-only $(PY) -m pytest $(PYTEST_ARGS)

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

# The TLS load client and its trivial TLS sink (C, OpenSSL: Debian's libssl-dev).
BENCH_BIN := bench/bin
bench-tools: $(BENCH_BIN)/tls_load $(BENCH_BIN)/tls_sink

$(BENCH_BIN)/%: bench/tls/%.c
	@mkdir -p $(BENCH_BIN)
	$(CC) -O2 -Wall -Wextra -o $@ $< -lssl -lcrypto -lpthread

# Refresh the lock files from pyproject.toml (needs PyPI). Existing pins are kept unless
# pyproject.toml rules them out; `make lock LOCK_ARGS=--upgrade` moves everything to the newest
# allowed. Run it after changing dependencies (or merging a branch that did) and commit
# requirements/*.txt with pyproject.toml: installs refuse lock files older than pyproject.toml.
UV_COMPILE = UV_NATIVE_TLS=1 $(TOOLS_VENV)/bin/uv pip compile --quiet --universal \
  --python-version 3.11 --generate-hashes $(LOCK_ARGS)
lock: $(TOOLS_STAMP)
	$(PYTHON) requirements/lock.py build-requires | $(UV_COMPILE) - -o requirements/build.txt
	$(UV_COMPILE) pyproject.toml $$($(PYTHON) requirements/lock.py image-extras) -o requirements/image.txt
	$(UV_COMPILE) pyproject.toml --all-extras -c requirements/image.txt -o requirements/test.txt
	$(PYTHON) requirements/lock.py stamp

# Root and the network: debootstrap (Debian mirror) and pip download (PyPI). Cached by recipe.
image-cache: $(STAMP)
	deploy/image/local-base.sh $(IMAGE_CACHE) >/dev/null
	deploy/image/wheelhouse.sh $(IMAGE_CACHE) $(PY) >/dev/null

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .pytest_cache .ruff_cache .relay-dev .cache
