"""Rewrites Megatron layer and block specs to use DenseMixerMoELayer."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional, TypeVar

from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlockSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_densemixer import compat
from megatron_densemixer.moe_layer import DenseMixerMoELayer
from megatron_densemixer.router import DenseMixerTopKRouter

Spec = TypeVar("Spec")

# Spec containers holding a list of layer specs: the decoder block's and the MTP block's.
_BLOCK_SUBMODULES = (TransformerBlockSubmodules, MultiTokenPredictionBlockSubmodules)


def densemixer_spec(spec: Spec) -> Spec:
    """Returns ``spec`` with every MoE layer made a DenseMixerMoELayer with its router.

    Accepts every form Megatron and the frameworks on it hand to GPTModel: a TransformerLayer
    ModuleSpec, a TransformerBlockSubmodules (its ``layer_specs``), a multi-token-prediction
    block spec (``MultiTokenPredictionBlockSubmodules``, GPTModel's ``mtp_block_spec``, or one
    MTP layer's ModuleSpec), a
    ``ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules)`` (a valid
    Megatron-LM ``--spec`` target), the MoE spec itself (``ModuleSpec(module=MoELayer, ...)``
    up to 0.17, ``functools.partial(MoELayer, ...)`` from 0.18), or a spec *function* taking
    the model config (Megatron-LM >= 0.19, Megatron-Bridge providers), which comes back as a
    ``DenseMixerSpecFunction``. Non-MoE MLPs, the experts, shared experts and every parameter
    name stay as they are. Whether DenseMixer is on is still up to ``moe_dense_router_grad``
    in the config.

    Raises:
        ValueError: an MoE spec names a router other than TopKRouter.

    Example:
        >>> spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
        >>> model = GPTModel(config, transformer_layer_spec=densemixer_spec(spec), ...)
    """
    compat.quiet_subclass_mlp_warning()
    moe = compat.moe_spec_parts(spec)
    if moe is not None:
        _, submodules = moe
        if submodules.router is TopKRouter:
            submodules = compat.replace_router(submodules, DenseMixerTopKRouter)
        elif not issubclass(submodules.router, DenseMixerTopKRouter):
            raise ValueError(
                f"densemixer_spec: the MoE spec uses router {submodules.router.__name__}; "
                "only TopKRouter can be rewritten to DenseMixerTopKRouter."
            )
        return compat.replace_moe_spec(spec, DenseMixerMoELayer, submodules)
    if isinstance(spec, _BLOCK_SUBMODULES):
        if spec.layer_specs is None:
            return spec
        return dataclasses.replace(
            spec, layer_specs=[densemixer_spec(layer) for layer in spec.layer_specs]
        )
    if isinstance(spec, ModuleSpec) and isinstance(spec.submodules, _BLOCK_SUBMODULES):
        return dataclasses.replace(spec, submodules=densemixer_spec(spec.submodules))
    if isinstance(spec, ModuleSpec) and spec.submodules is not None:
        # A TransformerLayer's MLP, or the layer inside a multi-token-prediction layer.
        name = compat.mtp_inner_layer_field(spec.submodules) or "mlp"
        inner = getattr(spec.submodules, name, None)
        if inner is None:
            return spec
        return dataclasses.replace(
            spec,
            submodules=dataclasses.replace(spec.submodules, **{name: densemixer_spec(inner)}),
        )
    if isinstance(spec, DenseMixerSpecFunction):
        return spec
    if callable(spec) and not isinstance(spec, (ModuleSpec, functools.partial, type)):
        return DenseMixerSpecFunction(spec)
    return spec


def call_spec_function(function: Callable[..., Any], config: Any, vp_stage: Optional[int]) -> Any:
    """Calls a layer-spec function with ``vp_stage`` when it takes one (newer Megatron)."""
    if "vp_stage" in inspect.signature(function).parameters:
        return function(config, vp_stage=vp_stage)
    return function(config)


class DenseMixerSpecFunction:
    """A layer-spec function whose specs come back through ``densemixer_spec``.

    Megatron-LM >= 0.19's ``GPTModelConfig.transformer_layer_spec`` and Megatron-Bridge
    providers may hold a function of the model config (and ``vp_stage``), called per model
    chunk at build time; this wraps one. Module-level and holding only ``base``, so it pickles.
    """

    def __init__(self, base: Callable[..., Any]) -> None:
        self.base = base

    def __call__(self, config: Any, vp_stage: Optional[int] = None) -> Any:
        return densemixer_spec(call_spec_function(self.base, config, vp_stage))
