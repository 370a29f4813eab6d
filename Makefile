# Test and demo entry points. `make test` builds .venv from scratch if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MCORE_VERSION ?= 0.16.1
TORCH_VERSION ?= 2.13.0

.PHONY: test demo lint clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	# torch first: this exact version is the local CPU wheel; anything else pulls CUDA builds.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q megatron-core==$(MCORE_VERSION) pytest ruff numpy
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest tests -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check megatron_densemixer tests examples
	$(VENV)/bin/ruff format --check megatron_densemixer tests examples

clean:
	rm -rf $(VENV) results
