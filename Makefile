# Both targets work on a fresh machine with only Python and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test lint typecheck check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(BIN)/inbox dev

test: $(STAMP_TEST)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest --cov --cov-report=term $(PYTEST_ARGS)

lint: $(STAMP_TEST)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP_TEST)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.ingest_cpu
	$(BIN)/python -m bench.visible
	$(BIN)/python -m bench.replay
	$(BIN)/python -m bench.webhooks
	$(BIN)/python -m bench.smtp
	$(BIN)/python -m bench.routing
	$(BIN)/python -m bench.inbox_api
	$(BIN)/python -m bench.stream
	$(BIN)/python -m bench.voice
	$(BIN)/python -m bench.metrics
	$(BIN)/python -m bench.aggregates
	$(BIN)/python -m bench.restart

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .coverage
