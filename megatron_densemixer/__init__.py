"""DenseMixer router gradients for Megatron Core MoE layers.

Turn on ``moe_dense_router_grad`` in a DenseMixerTransformerConfig and build the model with a
spec passed through ``densemixer_spec``. Importing the package imports neither torch nor
Megatron; each name below loads its module on first use.
"""

import importlib
from typing import Any

__version__ = "0.3.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "DenseBackwardInputs": "autograd",
    "DenseRouterGradCall": "autograd",
    "DenseRouterGradFunction": "autograd",
    "DenseWeightGradFunction": "autograd",
    "dense_router_grad": "autograd",
    "dense_weight_grad": "autograd",
    "check_dense_router_grad_applied": "check",
    "DenseMixerMLATransformerConfig": "config",
    "DenseMixerTransformerConfig": "config",
    "densemixer_config": "config",
    "DenseRouterGradCommBytes": "cost",
    "dense_router_grad_comm_bytes": "cost",
    "DenseMixerMoELayer": "moe_layer",
    "DenseMixerOptions": "options",
    "validate_dense_router_grad": "options",
    "DenseMixerTopKRouter": "router",
    "dense_router_probs": "router",
    "densemixer_spec": "spec",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_densemixer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megatron_densemixer.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
