"""Runnable examples. Run them as modules from the repository root, so that the package and
the CPU shim in tests/support are importable:

    .venv/bin/python -m examples.demo
    .venv/bin/python -m examples.experiment
"""

import os

# Same figures on any x86-64 CPU: MKL (GEMMs) and ATen (elementwise kernels, reductions) pick
# their code path by CPU, and AVX-512 paths round differently from AVX2 ones. Pin both to AVX2,
# which every x86-64 CPU of the last decade has. Read when torch loads, so this must run before
# it is imported (``python -m examples.demo`` imports this package first); set the variables
# yourself to override.
os.environ.setdefault("MKL_CBWR", "AVX2")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
