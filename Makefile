# cnllm developer tasks. `make demo` and `make test` are the two commands of the README quick start.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch on these machines; set TORCH="torch" (or a CUDA wheel spec) elsewhere.
TORCH ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: install test test-all demo bench completions clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

test-all: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -m ""

demo: install
	$(BIN)/cnllm demo -o cnllm-demo

bench: install
	$(BIN)/python bench/bench_cli_startup.py
	$(BIN)/python bench/bench_checksum.py

completions: install
	$(BIN)/python -m cnllm.cli.completions

clean:
	rm -rf $(VENV) cnllm-demo .pytest_cache
