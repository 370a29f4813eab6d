"""DenseMixer router gradients for Megatron Core MoE layers.

Turn on ``moe_dense_router_grad`` in a DenseMixerTransformerConfig and build the model with a
spec passed through ``densemixer_spec``.
"""

from megatron_densemixer.autograd import (
    DenseBackwardInputs,
    DenseRouterGradFunction,
    dense_router_grad,
)
from megatron_densemixer.config import (
    DenseMixerMLATransformerConfig,
    DenseMixerTransformerConfig,
    densemixer_config,
)
from megatron_densemixer.cost import DenseRouterGradCommBytes, dense_router_grad_comm_bytes
from megatron_densemixer.moe_layer import DenseMixerMoELayer, check_dense_router_grad_applied
from megatron_densemixer.options import DenseMixerOptions, validate_dense_router_grad
from megatron_densemixer.router import DenseMixerTopKRouter, dense_router_probs
from megatron_densemixer.spec import densemixer_spec

__version__ = "0.2.0"

__all__ = [
    "DenseBackwardInputs",
    "DenseMixerMLATransformerConfig",
    "DenseMixerMoELayer",
    "DenseMixerOptions",
    "DenseMixerTopKRouter",
    "DenseMixerTransformerConfig",
    "DenseRouterGradCommBytes",
    "DenseRouterGradFunction",
    "__version__",
    "check_dense_router_grad_applied",
    "dense_router_grad",
    "dense_router_grad_comm_bytes",
    "dense_router_probs",
    "densemixer_config",
    "densemixer_spec",
    "validate_dense_router_grad",
]
