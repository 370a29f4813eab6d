"""DenseMixer router gradients for Megatron Core MoE layers.

Turn on ``moe_dense_router_grad`` in a DenseMixerTransformerConfig and build the model with a
spec passed through ``densemixer_spec``. Importing the package installs the build-time watch
of ``megatron_densemixer.check`` (a module-registration hook; nothing runs per step).
"""

from megatron_densemixer.autograd import (
    DenseBackwardInputs,
    DenseRouterGradCall,
    DenseRouterGradFunction,
    DenseWeightGradFunction,
    dense_router_grad,
    dense_weight_grad,
)
from megatron_densemixer.check import check_dense_router_grad_applied, watch_moe_layers
from megatron_densemixer.config import (
    DenseMixerMLATransformerConfig,
    DenseMixerTransformerConfig,
    densemixer_config,
)
from megatron_densemixer.cost import DenseRouterGradCommBytes, dense_router_grad_comm_bytes
from megatron_densemixer.moe_layer import DenseMixerMoELayer
from megatron_densemixer.options import DenseMixerOptions, validate_dense_router_grad
from megatron_densemixer.router import DenseMixerTopKRouter, dense_router_probs
from megatron_densemixer.spec import densemixer_spec

__version__ = "0.3.0"

watch_moe_layers()

__all__ = [
    "DenseBackwardInputs",
    "DenseRouterGradCall",
    "DenseWeightGradFunction",
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
    "dense_weight_grad",
    "dense_router_grad_comm_bytes",
    "dense_router_probs",
    "densemixer_config",
    "densemixer_spec",
    "validate_dense_router_grad",
]
