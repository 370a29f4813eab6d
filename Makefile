# Entry points. Every target builds .venv from scratch if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MCORE_VERSION ?= 0.16.1
TORCH_VERSION ?= 2.13.0

.PHONY: test demo experiment bench lint test-latest clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	# torch first: this exact version is the local CPU wheel; anything else pulls CUDA builds.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q megatron-core==$(MCORE_VERSION) pytest ruff numpy
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.demo-deps: $(VENV)/.installed
	$(PY) -m pip install -q matplotlib
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest tests -q

demo: $(VENV)/.demo-deps
	$(PY) -m examples.demo

experiment: $(VENV)/.demo-deps
	$(PY) -m examples.experiment --arms conventional,densemixer,frozen

bench: $(VENV)/.installed
	$(PY) -m benchmarks --json results/bench.json

# megatron-core 0.19.x on Python 3.12 (torch comes as the large CUDA build; runs on CPU).
test-latest:
	bash scripts/test_latest.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check megatron_densemixer tests examples benchmarks
	$(VENV)/bin/ruff format --check megatron_densemixer tests examples benchmarks

clean:
	rm -rf $(VENV) results
