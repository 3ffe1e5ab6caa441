# maskloom — `make demo` runs the main job, `make test` runs the tests. Both create .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import maskloom, torch, torchaudio, ray, numba" && touch $(STAMP)

demo: $(STAMP)
	$(BIN)/maskloom demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check maskloom tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf runs demo_data .pytest_cache
