# pipekit: `make setup` once (idempotent), then `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint format bench clean airflow

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

test: setup airflow
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -n 2 --dist loadfile  # two workers, one test file each at a time

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Apache Airflow in its own virtual environment (its pins clash with ML libraries), with
# pipekit installed into it: tests/test_airflow.py runs `airflow dags test` there.
AIRFLOW_VERSION := 3.3.2
AIRFLOW_VENV    := .airflow-venv
AIRFLOW_STAMP   := $(AIRFLOW_VENV)/.installed-$(AIRFLOW_VERSION)

airflow: $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP): pyproject.toml
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install -q "apache-airflow==$(AIRFLOW_VERSION)" -e ".[tracking,cache]" graphviz
	rm -f $(AIRFLOW_VENV)/.installed-*
	touch $@

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) .pipekit outputs multirun mlruns mlflow.db .pytest_cache
