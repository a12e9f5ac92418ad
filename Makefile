# pipekit: `make setup` once (idempotent), then `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)
	@command -v dot >/dev/null 2>&1 || { \
	  echo "installing Debian's graphviz (the 'dot' binary)"; \
	  $(if $(shell command -v sudo 2>/dev/null),sudo,) apt-get update -qq && \
	  $(if $(shell command -v sudo 2>/dev/null),sudo,) apt-get install -y -qq graphviz >/dev/null; }

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
