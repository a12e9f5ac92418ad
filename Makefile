# pipekit: `make setup` once (idempotent), then `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint format bench clean

# Debian packages: graphviz (the `dot` binary) and, for the browser test, chromium.
SYSTEM_PACKAGES := $(if $(shell command -v dot),,graphviz) $(if $(shell command -v chromium),,chromium)
SUDO := $(if $(shell command -v sudo 2>/dev/null),sudo,)

setup: $(STAMP)
	@if [ -n "$(strip $(SYSTEM_PACKAGES))" ]; then \
	  echo "installing Debian packages: $(strip $(SYSTEM_PACKAGES))"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: setup
	$(BIN)/pipekit run

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pipekit outputs multirun mlruns mlflow.db .pytest_cache
