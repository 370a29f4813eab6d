"""The three layers under test, built on CPU with one set of weights."""

from __future__ import annotations

from typing import Any

from benchmarks.reference_layer import ReferenceDenseMoE
from benchmarks.shapes import Shape
from megatron_cpu import models
from megatron_densemixer import DenseMixerTransformerConfig


def make_config(shape: Shape, **overrides: Any) -> DenseMixerTransformerConfig:
    """A DenseMixer config for ``shape``: fp32, SwiGLU experts, no biases, allgather.

    The shared defaults also leave out the aux loss: it costs the same in all three layers
    and would only add noise.

    Args:
        shape: Sets the hidden size, expert FFN size, experts, top-k and chunk size.
        **overrides: Further config fields (the approximations' flags); these win.

    Returns:
        The validated config.
    """
    fields: dict[str, Any] = dict(
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn,
        moe_ffn_hidden_size=shape.ffn,
        num_moe_experts=shape.experts,
        moe_router_topk=shape.topk,
        moe_dense_router_grad_chunk_size=shape.chunk_size,
    )
    fields.update(overrides)
    return models.make_config(**fields)


def build_layers(shape: Shape, seed: int = 0) -> tuple[Any, Any, ReferenceDenseMoE]:
    """(conventional MoELayer, DenseMixerMoELayer, reference), all with the same weights.

    The reference shares the DenseMixer layer's router and experts (same Parameters);
    every step clears the grads first, so sharing changes nothing in what is measured.
    Megatron's parallel state must be initialised (``init_model_parallel``).

    Args:
        shape: The layer shape.
        seed: Seeds the DenseMixer layer's initial weights, which the conventional one copies.

    Returns:
        The three layers.
    """
    densemixer, conventional = models.build_pair(make_config(shape), seed)
    return conventional, densemixer, ReferenceDenseMoE(densemixer)
