"""Shared test support: the float64 reference of DenseMixer, the GPU stand-ins, and the run,
reference and metrics helpers that several test modules use. No test module imports another;
what they share lives here. The CPU runtime for Megatron and the config and layer builders
live in the top-level ``megatron_cpu`` package.
"""
