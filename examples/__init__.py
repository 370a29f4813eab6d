"""Runnable examples. Run them as modules from the repository root, so that the package and
the CPU shim in tests/support are importable:

    .venv/bin/python -m examples.demo
    .venv/bin/python -m examples.experiment
"""
