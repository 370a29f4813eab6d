# Entry points. Every target builds .venv from scratch if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pip install with its output in results/pip/; a failure is one line naming the package.
PIP_INSTALL := bash scripts/pip_install.sh
MCORE_VERSION ?= 0.16.1
TORCH_VERSION ?= 2.13.0

.PHONY: test demo experiment bench lint test-matrix test-latest clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned (megatron-core would pick its own). Where the pip index holds the CPU
	# wheel of this version (CI's does) that is what installs; elsewhere see the README.
	$(PIP_INSTALL) $(PY) torch==$(TORCH_VERSION)
	$(PIP_INSTALL) $(PY) megatron-core==$(MCORE_VERSION) pytest ruff numpy
	# Editable in compat mode: a .pth puts the checkout on sys.path, so its non-shipped packages
	# (megatron_cpu, examples, benchmarks) import from any directory in this venv; a wheel
	# (pip install .) still holds megatron_densemixer only.
	$(PIP_INSTALL) $(PY) --no-deps --config-settings editable_mode=compat -e .
	touch $@

$(VENV)/.demo-deps: $(VENV)/.installed
	$(PIP_INSTALL) $(PY) matplotlib tqdm
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest tests -q

demo: $(VENV)/.demo-deps
	$(PY) -m examples.demo

# Post-training A/B (pretrain on A, fine-tune on B in five arms, 8 seeds, 2 worker processes).
experiment: $(VENV)/.demo-deps
	$(PY) -m examples.experiment

# One MoE layer, conventional vs DenseMixer vs the reference approach, on CPU;
# `make bench BENCH_ARGS="--shapes quick"` for the quick shapes (seconds).
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(PY) -m benchmarks --json results/bench.json $(BENCH_ARGS)

# The suite on megatron-core 0.16.1 (Python 3.11: `make test`, first) and 0.17.1, 0.18.2, 0.19.2
# (Python 3.12, with Megatron-Bridge and verl), then a passed/failed/skipped/seconds table per
# lane, also in results/matrix/summary.md. This is what CI runs (.ci/run).
test-matrix:
	bash scripts/test_matrix.sh

# The newest megatron-core lane alone (0.19.2, Python 3.12, Megatron-Bridge 0.6.2).
test-latest:
	MATRIX_VERSIONS=0.19.2 bash scripts/test_matrix.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check megatron_densemixer megatron_cpu tests examples benchmarks
	$(VENV)/bin/ruff format --check megatron_densemixer megatron_cpu tests examples benchmarks

clean:
	rm -rf $(VENV) results
