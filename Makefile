# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   create .venv, install lumos, run the main job (writes an HTML report)
#   make test   install the test dependencies and run lint, format check and the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install install-test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/lumos demo

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -n 2 --dist loadgroup -q

bench: install-test
	$(BIN)/python benchmarks/bench_integrated_gradients.py

clean:
	rm -rf $(VENV) lumos-report .pytest_cache .ruff_cache
