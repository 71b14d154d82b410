# One-command set-up: every target creates .venv (python3) and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test services lint typecheck docs bench ci clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loopguard demo

test: $(STAMP) services
	$(BIN)/python -m pytest

# PostgreSQL and Redis servers for the blocking-guard catalogue tests (installed if root).
services:
	@bash scripts/services.sh

lint: $(STAMP)
	$(BIN)/ruff check loopguard integrations tests benchmarks smoke examples noxfile.py
	$(BIN)/ruff format --check loopguard integrations tests benchmarks smoke examples noxfile.py

typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

ci:
	bash .ci/run

clean:
	rm -rf $(VENV) .nox site .mypy_cache .ruff_cache .pytest_cache
