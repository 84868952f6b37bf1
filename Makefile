# Two-command set-up: `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
# The torch build installed first (the CPU build on this project's machines); override with any pip
# requirement, e.g. `make test TORCH_SPEC='torch==2.13.0'` pointing pip at your own CUDA index.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quackae-installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/quackae demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check quackae tests benchmarks
	$(VENV)/bin/ruff format --check quackae tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/quackae bench --what train
	$(VENV)/bin/quackae bench --what prepare
	$(VENV)/bin/quackae bench --what encode
	$(VENV)/bin/quackae bench --what store --items 100000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
