# Two commands set everything up on a fresh machine:
#   make demo   creates .venv if needed and runs the main demo
#   make test   creates .venv if needed and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,experiments,kernels]'
	$(PY) -c "import bptt_jax; print(bptt_jax.kernels().library)"  # builds the CPU kernels
	touch $(STAMP)

demo: $(STAMP)
	$(PY) experiments/char_lm.py --demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests  # one worker per core

lint: $(STAMP)
	$(VENV)/bin/ruff check bptt_jax tests experiments

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) experiments/benchmark.py

clean:
	rm -rf $(VENV) results
