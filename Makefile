# The two commands of the README's quick start.  Everything installs into ./.venv from the project's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast test-long bench setup setup-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# torch's CPU wheel first (a bare `torch` would pull the multi-GB CUDA build), then sp_server with the CHGNet oracle
TORCH ?= torch==2.13.0+cpu
setup: $(BIN)/python
	$(BIN)/pip install '$(TORCH)'
	$(BIN)/pip install -e '.[oracles]'

# multibinit (Debian's abinit 9.6.2) is the reference for the parity tests
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
setup-test: setup
	$(BIN)/pip install -e '.[test]'
	@command -v multibinit >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq abinit abinit-data; }

# 1) set-up + the main job
demo: setup
	$(BIN)/sp-server demo -o demo_output

# 2) test dependencies + the whole test suite (slow tests included; see README)
test: setup-test
	SP_SERVER_TEST_POSTGRES=$$(bash tools/ci_postgres.sh) $(BIN)/python -m pytest -ra --durations=15 -m "not long" tests

# the suite without the tests marked slow
test-fast: setup-test
	$(BIN)/python -m pytest -ra -m "not slow and not long" tests

# the exhaustive variants left out of `make test` (a few minutes)
test-long: setup-test
	SP_SERVER_TEST_POSTGRES=$$(bash tools/ci_postgres.sh) $(BIN)/python -m pytest -ra -m long tests

bench: setup
	$(BIN)/python tools/bench_eval.py
