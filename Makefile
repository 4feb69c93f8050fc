# edgeloop: every target installs what it needs first, so each works on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgeloop-installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k framing"`.
PYTEST_ARGS ?=

.PHONY: help install demo test test-unit test-integration bench lint fmt clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

install: $(STAMP) ## Virtualenv, the package with all extras, Mosquitto, the Tansu broker binary
	@bash scripts/install-system.sh

$(STAMP): pyproject.toml uv.lock
	@bash scripts/install-python.sh "$(PYTHON)" "$(VENV)"
	@touch $(STAMP)

demo: install ## Run the embedded stack on this host and show its state
	$(BIN)/edgeloop demo

test: install lint ## Lint, then unit and integration tests (Tansu and Apache Kafka legs)
	$(BIN)/pytest tests $(PYTEST_ARGS)

test-unit: install ## Unit tests only: seconds, no services
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: install ## Integration and end-to-end tests against real services
	$(BIN)/pytest tests/integration tests/e2e $(PYTEST_ARGS)

bench: install ## Benchmarks: printed table and JSON under bench-results/
	$(BIN)/edgeloop bench --out bench-results

lint: install ## ruff, mypy --strict, import-linter layering contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: install ## Format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## Stop the embedded stack and remove local state (keeps the virtualenv)
	-$(BIN)/edgeloop infra down
	rm -rf .edgeloop bench-results .pytest_cache .mypy_cache .ruff_cache
