"""The configs and MoE layers that the tests, the demo and the benchmarks build on CPU.

``make_config`` is the one config builder: a small SwiGLU MoE (hidden 16, FFN 24, 8 experts,
top-2, allgather dispatcher, no aux loss, fp32 router, CPU init) with DenseMixer on. Every
field can be overridden. ``build_moe_layer`` builds a Megatron ``MoELayer`` from the local
(non-TE) spec; ``build_dense_layer`` and ``build_pair`` build DenseMixer layers (and a
conventional twin with the same weights). Megatron's parallel state must be initialised
first (:func:`megatron_cpu.init_model_parallel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_cpu.shim import apply_cpu_shim
from megatron_densemixer import (
    DenseMixerMoELayer,
    DenseMixerTransformerConfig,
    compat,
    densemixer_spec,
)

__all__ = [
    "EXPERTS",
    "FFN",
    "HIDDEN",
    "TOPK",
    "build_dense_layer",
    "build_moe_layer",
    "build_pair",
    "local_moe_spec",
    "make_config",
    "rel_err",
]

HIDDEN, FFN, EXPERTS, TOPK = 16, 24, 8, 2


def make_config(**overrides: Any) -> DenseMixerTransformerConfig:
    """The small MoE config with DenseMixer on.

    Args:
        **overrides: Any ``DenseMixerTransformerConfig`` field; these win over the defaults.

    Returns:
        The validated config.
    """
    fields = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_attention_heads=4,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        use_cpu_initialization=True,
        moe_dense_router_grad=True,
    )
    fields.update(overrides)
    return DenseMixerTransformerConfig(**fields)


def local_moe_spec(config: DenseMixerTransformerConfig) -> Any:
    """The installed megatron-core's local (non-TE) MoE spec for ``config``'s expert count."""
    return get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)


def build_moe_layer(
    config: Any,
    spec_kind: str = "sequential",
    *,
    spec: Any = None,
    layer_cls: type | None = None,
    layer_number: int = 1,
    pg_collection: Any = None,
) -> Any:
    """Build a Megatron ``MoELayer`` (or ``layer_cls``) on CPU from the local spec.

    ``config`` is a ``TransformerConfig`` with ``num_moe_experts`` set.  ``spec_kind`` is
    ``"sequential"`` (``SequentialMLP`` experts) or ``"grouped"`` (legacy ``GroupedMLP``;
    needs ``grouped_gemm`` or :func:`install_grouped_gemm_fallback`, and bf16).  ``spec``
    (an MoE spec in either form: ``ModuleSpec`` up to 0.17, ``functools.partial`` builder
    from 0.18) overrides the spec entirely; ``layer_cls`` swaps the module class of the spec
    (e.g. a MoELayer subclass) while keeping its submodules.  Parallel state must be
    initialised (:func:`megatron_cpu.init_model_parallel`).
    """
    apply_cpu_shim()
    if spec_kind not in ("sequential", "grouped"):
        raise ValueError(f"spec_kind must be 'sequential' or 'grouped', not {spec_kind!r}")
    if spec is None:
        spec = get_moe_module_spec(
            use_te=False,
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=spec_kind == "grouped",
        )
    if layer_cls is not None:
        parts = compat.moe_spec_parts(spec)
        if parts is None:
            raise ValueError(f"layer_cls needs an MoE spec, got {spec!r}")
        spec = compat.replace_moe_spec(spec, layer_cls, parts[1])
    kwargs: dict[str, Any] = {"config": config, "layer_number": layer_number}
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    if isinstance(spec, ModuleSpec):
        return build_module(spec, **kwargs)
    # From 0.18 the spec is a builder (functools.partial) that TransformerLayer calls
    # directly; 0.19's build_module no longer accepts one.
    return spec(**kwargs)


def build_dense_layer(
    config: DenseMixerTransformerConfig, seed: Optional[int] = None
) -> DenseMixerMoELayer:
    """A DenseMixerMoELayer from the local spec.

    Args:
        config: The layer's config.
        seed: If given, ``torch.manual_seed(seed)`` runs right before the build.

    Returns:
        The layer.
    """
    if seed is not None:
        torch.manual_seed(seed)
    layer = build_moe_layer(config, spec=densemixer_spec(local_moe_spec(config)))
    assert type(layer) is DenseMixerMoELayer
    return layer


def build_pair(
    config: DenseMixerTransformerConfig, seed: int = 0
) -> Tuple[DenseMixerMoELayer, MoELayer]:
    """A DenseMixerMoELayer and a conventional MoELayer holding the same weights.

    Args:
        config: The DenseMixer layer's config; the conventional one gets the flag off.
        seed: Seeds the DenseMixer layer's initial weights, which the conventional one copies.

    Returns:
        (DenseMixer layer, conventional layer).
    """
    dense = build_dense_layer(config, seed)
    conventional = build_moe_layer(dataclasses.replace(config, moe_dense_router_grad=False))
    if dense.router.expert_bias is not None:
        with torch.no_grad():
            dense.router.expert_bias.copy_(torch.randn(config.num_moe_experts) * 0.05)
    # strict: the plugin keeps every parameter and buffer name of MoELayer.
    conventional.load_state_dict(dense.state_dict(), strict=True)
    assert type(dense) is DenseMixerMoELayer and type(conventional) is MoELayer
    return dense, conventional


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-relative error ||actual - expected|| / ||expected||, in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
