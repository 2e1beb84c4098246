# Developer and CI entry points. `make help` lists them.

PY ?= python3
PYTEST_ARGS ?=
BENCH_ARGS ?=
TEST_WORKERS ?= 2

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TYPED_PACKAGES := kessai kessai_cli migrations/__init__.py command_service query_service projector reconciler rewards bench

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
.PHONY: help venv run test services tools lint bench clean

help:
	@echo 'make venv      create .venv and install the project with its dev extras'
	@echo 'make run       start the whole system (embedded defaults): .venv/bin/kessai up'
	@echo 'make test      bring up MariaDB/Redis, install nginx/wrk if missing, run pytest (PYTEST_ARGS=...)'
	@echo 'make services  bring up MariaDB (127.0.0.1:3306) and Redis (127.0.0.1:6379)'
	@echo 'make tools     install the OS programs the tests drive when missing (nginx, wrk)'
	@echo 'make lint      ruff check, ruff format --check, mypy, lint-imports (the layers)'
	@echo 'make bench     the benchmark suite on the local MariaDB (BENCH_ARGS=--size full, --db-url sqlite ...)'
	@echo 'make clean     remove .venv, .kessai and caches'

venv: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstalled only when pyproject.toml changes (the install is editable, so code changes need
# nothing). Order-only on the interpreter: its mtime is that of the base Python it links to.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	touch $@

run: venv
	$(BIN)/kessai up

services:
	bash .ci/services

tools:
	bash .ci/tools

# Two pytest workers (pytest-xdist), one test file at a time each: most tests wait on brokers,
# databases and subprocesses, so two workers halve the suite's time on two cores. COLUMNS makes
# the CLI's tables as wide in a worker as in a terminal, so the tests read whole cells.
test: venv services tools
	COLUMNS=200 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(TYPED_PACKAGES)
	$(BIN)/lint-imports

# Needs MariaDB/MySQL at 127.0.0.1:3306 (make services); see docs/BENCHMARKS.md.
bench: venv services
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .kessai .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
