"""DenseMixer router gradients for Megatron Core MoE layers.

Turn on ``moe_dense_router_grad`` in a DenseMixerTransformerConfig and build the model with a
spec passed through ``densemixer_spec``.
"""

from megatron_densemixer.autograd import (
    DenseRouterGradCommBytes,
    DenseRouterGradFunction,
    dense_router_grad,
    dense_router_grad_comm_bytes,
)
from megatron_densemixer.config import DenseMixerTransformerConfig, validate_dense_router_grad
from megatron_densemixer.moe_layer import DenseMixerMoELayer
from megatron_densemixer.router import DenseMixerTopKRouter, dense_router_probs
from megatron_densemixer.spec import densemixer_spec

__all__ = [
    "DenseMixerMoELayer",
    "DenseMixerTopKRouter",
    "DenseMixerTransformerConfig",
    "DenseRouterGradCommBytes",
    "DenseRouterGradFunction",
    "dense_router_grad",
    "dense_router_grad_comm_bytes",
    "dense_router_probs",
    "densemixer_spec",
    "validate_dense_router_grad",
]
