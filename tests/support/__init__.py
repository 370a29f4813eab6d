"""Shared test support: the CPU shim for Megatron Core, the float64 reference of DenseMixer,
and the config, layer and metrics helpers that several test modules (and the demo and the
benchmark) use. No test module imports another; what they share lives here.
"""
