"""Rewrites Megatron layer and block specs to use DenseMixerMoELayer."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_densemixer import compat
from megatron_densemixer.moe_layer import DenseMixerMoELayer
from megatron_densemixer.router import DenseMixerTopKRouter

Spec = TypeVar("Spec")


def densemixer_spec(spec: Spec) -> Spec:
    """Returns ``spec`` with every MoE layer made a DenseMixerMoELayer with its router.

    Accepts what Megatron's spec functions return: a TransformerLayer ModuleSpec, a
    TransformerBlockSubmodules (its ``layer_specs``), or the MoE spec itself
    (``ModuleSpec(module=MoELayer, ...)`` up to 0.17, ``functools.partial(MoELayer, ...)`` from
    0.18). Dense layers, the experts, shared experts and every parameter name stay as they
    are. Whether DenseMixer is on is still up to ``moe_dense_router_grad`` in the config.

    Example:
        >>> spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
        >>> model = GPTModel(config, transformer_layer_spec=densemixer_spec(spec), ...)
    """
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
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(
            spec, layer_specs=[densemixer_spec(layer) for layer in spec.layer_specs]
        )
    if isinstance(spec, ModuleSpec) and spec.submodules is not None:
        mlp = getattr(spec.submodules, "mlp", None)
        if mlp is None:
            return spec
        return dataclasses.replace(
            spec, submodules=dataclasses.replace(spec.submodules, mlp=densemixer_spec(mlp))
        )
    return spec
