"""Runnable examples, on CPU through the repository's ``megatron_cpu`` runtime. Run them in the
``.venv`` that ``make`` builds (its editable install makes these packages importable), as
modules or as scripts:

    .venv/bin/python -m examples.demo
    .venv/bin/python examples/experiment.py
"""

import os

# Same figures on any x86-64 CPU: MKL (GEMMs) and ATen (elementwise kernels, reductions) pick
# their code path by CPU, and AVX-512 paths round differently from AVX2 ones. Pin both to AVX2,
# which every x86-64 CPU of the last decade has. Read when torch loads, so this must run before
# it is imported (the demo and the experiment import this package first, as modules or as
# scripts); set the variables yourself to override.
os.environ.setdefault("MKL_CBWR", "AVX2")
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
