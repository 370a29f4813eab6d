"""The ``moe_dense_router_grad`` flag, its options, and their validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer import compat

DENSE_ROUTER_GRAD_VARIANTS = ("partscale", "gated")
SUPPORTED_DISPATCHERS = ("allgather", "alltoall")


@dataclass
class DenseMixerTransformerConfig(TransformerConfig):
    """TransformerConfig with DenseMixer router gradients for MoE layers."""

    moe_dense_router_grad: bool = False
    """Give the MoE router a straight-through gradient from every expert's output (DenseMixer).
    The forward value, the experts' gradients and inference stay exactly conventional."""

    moe_dense_router_grad_variant: Literal["partscale", "gated"] = "partscale"
    """Normalisation of the dense weights of non-selected experts. "partscale" (the DenseMixer
    reference): w_e = p_e / stopgrad(S). "gated": the non-selected experts also subtract the
    selected experts' baseline, dL/dp_j = (G_j - sum_K w_e G_e) / S. "gated" needs
    renormalised top-k weights."""

    moe_dense_router_grad_chunk_size: Optional[int] = None
    """Tokens per chunk of the backward's dense reduction. None derives it from
    moe_dense_router_grad_chunk_budget_mb."""

    moe_dense_router_grad_chunk_budget_mb: float = 256.0
    """Memory budget, in MiB, for the activations of one chunk of the dense reduction; used
    when moe_dense_router_grad_chunk_size is None."""

    moe_dense_router_grad_topm: Optional[int] = None
    """Approximation, off by default: give the dense gradient only to the top-M experts by
    router score (M > moe_router_topk); the others get the conventional zero."""

    moe_dense_router_grad_token_fraction: float = 1.0
    """Approximation, off at 1.0: compute the dense gradient on this random fraction f of the
    tokens and scale theirs by 1/f (an unbiased estimate of the router weight gradient)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_dense_router_grad(self)


def validate_dense_router_grad(config: TransformerConfig) -> None:
    """Raises ValueError for every combination the dense router gradient does not cover.

    Works on any TransformerConfig carrying the ``moe_dense_router_grad*`` attributes, so
    frameworks that build their own config class can call it too.
    """
    if not getattr(config, "moe_dense_router_grad", False):
        return

    def fail(message: str) -> None:
        raise ValueError(f"moe_dense_router_grad=True: {message}")

    if not config.num_moe_experts:
        fail("requires an MoE model; set num_moe_experts.")
    variant = getattr(config, "moe_dense_router_grad_variant", "partscale")
    if variant not in DENSE_ROUTER_GRAD_VARIANTS:
        fail(
            f"moe_dense_router_grad_variant must be one of {DENSE_ROUTER_GRAD_VARIANTS}, "
            f"got {variant!r}."
        )
    chunk_size = getattr(config, "moe_dense_router_grad_chunk_size", None)
    if chunk_size is not None and chunk_size <= 0:
        fail(f"moe_dense_router_grad_chunk_size must be a positive integer, got {chunk_size}.")
    budget = getattr(config, "moe_dense_router_grad_chunk_budget_mb", 256.0)
    if budget <= 0:
        fail(f"moe_dense_router_grad_chunk_budget_mb must be positive, got {budget}.")

    topm = getattr(config, "moe_dense_router_grad_topm", None)
    if topm is not None and not config.moe_router_topk < topm <= config.num_moe_experts:
        fail(
            f"moe_dense_router_grad_topm={topm} must satisfy moe_router_topk "
            f"({config.moe_router_topk}) < M <= num_moe_experts ({config.num_moe_experts}); "
            "set it to None for the exact gradient."
        )
    fraction = getattr(config, "moe_dense_router_grad_token_fraction", 1.0)
    if not 0.0 < fraction <= 1.0:
        fail(
            f"moe_dense_router_grad_token_fraction={fraction} must be in (0, 1]; "
            "1.0 gives the exact gradient."
        )

    # Sinkhorn's probs are not a function of per-expert scores that top-k merely masks.
    if config.moe_router_load_balancing_type == "sinkhorn":
        fail(
            "moe_router_load_balancing_type='sinkhorn' is not supported; use 'aux_loss', "
            "'seq_aux_loss', 'global_aux_loss' or 'none'."
        )
    score_functions = compat.supported_score_functions()
    if config.moe_router_score_function not in score_functions:
        fail(
            f"moe_router_score_function={config.moe_router_score_function!r} is not supported; "
            f"use one of {score_functions}."
        )
    if variant == "gated" and not _renormalises_topk(config):
        # Without renormalisation there is no shared denominator S to carry a baseline.
        fail(
            "moe_dense_router_grad_variant='gated' requires renormalised top-k weights "
            "(softmax with moe_router_pre_softmax=False, or sigmoid/sqrtsoftplus with "
            f"moe_router_topk > 1); got score function {config.moe_router_score_function!r}, "
            f"moe_router_pre_softmax={config.moe_router_pre_softmax}, "
            f"moe_router_topk={config.moe_router_topk}. Use 'partscale' instead."
        )
    # Dropped tokens leave K but keep their share of S: the dense weights are then undefined.
    if config.moe_expert_capacity_factor is not None:
        fail(
            f"moe_expert_capacity_factor={config.moe_expert_capacity_factor} (token dropping) "
            "is not supported; set moe_expert_capacity_factor=None."
        )
    # With probs applied on the input, E_e(w x) is not linear in w and G_e is not dL/dw_e.
    if config.moe_apply_probs_on_input:
        fail("moe_apply_probs_on_input=True is not supported; set it to False.")
    if getattr(config, "moe_latent_size", None):
        fail("moe_latent_size (latent MoE projections) is not supported; set it to None.")
    if config.moe_token_dispatcher_type not in SUPPORTED_DISPATCHERS:
        fail(
            f"moe_token_dispatcher_type={config.moe_token_dispatcher_type!r} is not supported; "
            f"use one of {SUPPORTED_DISPATCHERS}."
        )
    if config.fp8 or getattr(config, "fp4", None):
        fail(
            "fp8/fp4 expert weights are not supported by the dense reduction yet; "
            "train in bf16 or fp32 (unset fp8/fp4)."
        )
    # CUDA graphs and the fine-grained A2A overlap drive MoELayer's step methods on their own
    # schedule; the dense path has not been validated there.
    if getattr(config, "cuda_graph_impl", "none") != "none":
        fail(f"cuda_graph_impl={config.cuda_graph_impl!r} is not supported; set it to 'none'.")
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        fail("overlap_moe_expert_parallel_comm=True is not supported yet; set it to False.")


def _renormalises_topk(config: TransformerConfig) -> bool:
    """Whether the top-k weights are divided by S, the sum of the selected scores."""
    if config.moe_router_score_function == "softmax":
        return not config.moe_router_pre_softmax
    return config.moe_router_topk > 1


def dense_router_grad_enabled(config: TransformerConfig) -> bool:
    """Whether ``config`` asks for DenseMixer router gradients."""
    return bool(getattr(config, "moe_dense_router_grad", False))
