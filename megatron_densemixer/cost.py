"""What the dense backward costs: bytes on the wire and chunk memory, per rank and layer.

Formulas only, no collectives: the reduction sizes its chunks with them, and the benchmark and
cost models read them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer.options import approximates, dense_router_grad_options


class DenseRouterGradCommBytes(NamedTuple):
    """Bytes one rank receives in the dense backward of one MoE layer (``DenseReduction``).

    Each collective is symmetric, so a rank also sends as many bytes as it receives.
    """

    all_gather_hidden: int
    """All-gather of the MoE input x over the expert-TP x EP group."""
    all_gather_grad: int
    """All-gather of g = dL/dy over the same group."""
    all_to_all_scores: int
    """All-to-all returning the fp32 partial scores G of each rank's tokens."""
    all_gather_pairs: int
    """All-gather of the uint8 (token, expert) mask; only with the opt-in approximations."""
    all_gather_token_counts: int
    """All-gather of the members' int64 token counts."""

    @property
    def total(self) -> int:
        """All five together."""
        return sum(self)


def dense_router_grad_comm_bytes(
    config: TransformerConfig,
    num_tokens_per_rank: int,
    dtype: Optional[torch.dtype] = None,
    expert_model_parallel_size: Optional[int] = None,
    expert_tensor_parallel_size: Optional[int] = None,
) -> DenseRouterGradCommBytes:
    """Communication volume of ``DenseReduction.scores`` per rank and MoE layer.

    With P = ETP * EP ranks in the expert-TP x EP group, T tokens per rank (the MoE input's
    s * b on that rank), hidden size H, E experts, L = E / EP local experts and b bytes per
    element of x and g:

        all_gather_hidden = all_gather_grad = (P - 1) T H b
        all_to_all_scores       = (P - 1) T L 4   (fp32 partial scores)
        all_gather_pairs        = (P - 1) T E     (uint8; 0 unless moe_dense_router_grad_topm
                                                   or moe_dense_router_grad_token_fraction
                                                   is set)
        all_gather_token_counts = (P - 1) 8

    all zero when P = 1. When members hold different token counts, the all-gathers pad every
    block to the largest count, so T_max replaces T there; in the all-to-all each rank still
    receives (P - 1) T L 4 bytes for its own T.

    Args:
        config: The layer's config (hidden size, experts, parallel sizes, params dtype).
        num_tokens_per_rank: T, the tokens entering the MoE layer on one rank.
        dtype: dtype of x and g; defaults to ``config.params_dtype``.
        expert_model_parallel_size: EP; defaults to ``config.expert_model_parallel_size``.
        expert_tensor_parallel_size: ETP; defaults to ``config.expert_tensor_parallel_size``
            (which Megatron sets to the tensor-parallel size when left unset).

    Returns:
        The bytes of each collective; ``.total`` sums them.
    """
    ep = expert_model_parallel_size or config.expert_model_parallel_size
    etp = expert_tensor_parallel_size or config.expert_tensor_parallel_size
    etp = etp or config.tensor_model_parallel_size
    element = torch.empty((), dtype=dtype or config.params_dtype).element_size()
    others = ep * etp - 1
    num_experts = config.num_moe_experts
    approximate = approximates(dense_router_grad_options(config))
    hidden = others * num_tokens_per_rank * config.hidden_size * element
    return DenseRouterGradCommBytes(
        all_gather_hidden=hidden,
        all_gather_grad=hidden,
        all_to_all_scores=others * num_tokens_per_rank * (num_experts // ep) * 4,
        all_gather_pairs=others * num_tokens_per_rank * num_experts if approximate else 0,
        all_gather_token_counts=others * 8,
    )


def dense_chunk_bytes_per_token(
    config: TransformerConfig, ffn_size: int, dtype: torch.dtype
) -> int:
    """Activation bytes per token of one chunk of the dense reduction, for one expert.

    W1 x (F1 values), h and W2^T g (F each) in the weights' dtype, plus h and W2^T g in fp32.
    """
    f1 = 2 * ffn_size if config.gated_linear_unit else ffn_size
    element = torch.empty((), dtype=dtype).element_size()
    return element * (f1 + 2 * ffn_size) + 4 * 2 * ffn_size
