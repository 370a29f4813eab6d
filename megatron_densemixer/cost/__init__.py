"""What the dense backward costs per rank and MoE layer: bytes on the wire, memory, FLOPs.

Formulas only, no collectives: the reduction sizes its chunks with them, and the benchmarks,
the tests and the cluster model (``python -m megatron_densemixer.cost``, ``cluster.py``) read
them. Each formula is written once, on plain numbers (``MoELayerShape``); the ``config``
functions only read a layer's numbers from its TransformerConfig.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

from megatron_densemixer.options import approximates, dense_router_grad_options

if TYPE_CHECKING:  # plain arithmetic: neither torch nor Megatron is imported to run it
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

WEIGHT_GRAD_BYTES = 4
"""Bytes of one partial G[t, e]: the reduction accumulates in fp32."""


class MoELayerShape(NamedTuple):
    """One MoE layer as one rank of its expert-TP x EP group sees it, in plain numbers."""

    num_experts: int
    """E, routed experts."""
    topk: int
    """k, experts per token."""
    hidden: int
    """H."""
    ffn: int
    """F of one expert, whole (each expert-TP rank holds F / expert_tp)."""
    tokens: int
    """T, tokens entering the layer on this rank (s * b / (TP if SP) / CP)."""
    gated: bool = True
    """Gated linear unit (SwiGLU): fc1 is 2F wide."""
    ep: int = 1
    """Expert-parallel size."""
    etp: int = 1
    """Expert-tensor-parallel size."""
    element_size: int = 2
    """Bytes per element of x, g and the expert weights (2 for bf16)."""
    approximate: bool = False
    """An opt-in approximation is on, so the uint8 (token, expert) mask travels too."""

    @property
    def group_size(self) -> int:
        """P = EP x expert TP, the ranks that exchange tokens in the dense backward."""
        return self.ep * self.etp

    @property
    def num_local_experts(self) -> int:
        """L = E / EP."""
        return self.num_experts // self.ep

    @property
    def local_ffn(self) -> int:
        """This rank's F-slice of each local expert."""
        return self.ffn // self.etp


def layer_shape(
    config: TransformerConfig,
    num_tokens_per_rank: int,
    dtype: Optional[torch.dtype] = None,
    expert_model_parallel_size: Optional[int] = None,
    expert_tensor_parallel_size: Optional[int] = None,
) -> MoELayerShape:
    """A TransformerConfig's MoE layer as a ``MoELayerShape``.

    Args:
        config: The layer's config (hidden size, experts, FFN, parallel sizes, params dtype).
        num_tokens_per_rank: T, the tokens entering the MoE layer on one rank.
        dtype: dtype of x and g; defaults to ``config.params_dtype``.
        expert_model_parallel_size: EP; defaults to ``config.expert_model_parallel_size``.
        expert_tensor_parallel_size: ETP; defaults to ``config.expert_tensor_parallel_size``
            (which Megatron sets to the tensor-parallel size when left unset).

    Returns:
        The shape.
    """
    ep = expert_model_parallel_size or config.expert_model_parallel_size
    etp = expert_tensor_parallel_size or config.expert_tensor_parallel_size
    return MoELayerShape(
        num_experts=config.num_moe_experts,
        topk=config.moe_router_topk,
        hidden=config.hidden_size,
        ffn=config.moe_ffn_hidden_size,
        tokens=num_tokens_per_rank,
        gated=config.gated_linear_unit,
        ep=ep,
        etp=etp or config.tensor_model_parallel_size,
        element_size=(dtype or config.params_dtype).itemsize,
        approximate=approximates(dense_router_grad_options(config)),
    )


class DenseRouterGradCommBytes(NamedTuple):
    """Bytes one rank receives in the dense backward of one MoE layer (``TokenRing``).

    Every rank receives from its neighbour rank - 1 what it sends to rank + 1 (the token
    blocks), and as many partial G as it returns, so it sends as many bytes as it
    receives.
    """

    hidden: int
    """The other members' blocks of the MoE input x, passed around the ring."""
    grad: int
    """Their blocks of g = dL/dy, alongside."""
    weight_grads: int
    """The fp32 partial G of this rank's tokens, returned by each other member."""
    pairs: int
    """The uint8 (token, expert) masks, alongside x; only with the opt-in approximations."""
    token_counts: int
    """All-gather of the members' int64 token counts."""

    @property
    def total(self) -> int:
        """All five together."""
        return sum(self)


def comm_bytes(shape: MoELayerShape) -> DenseRouterGradCommBytes:
    """``dense_router_grad_comm_bytes`` on plain numbers; see there."""
    others, tokens = shape.group_size - 1, shape.tokens
    block = others * tokens * shape.hidden * shape.element_size
    return DenseRouterGradCommBytes(
        hidden=block,
        grad=block,
        weight_grads=others * tokens * shape.num_local_experts * WEIGHT_GRAD_BYTES,
        pairs=others * tokens * shape.num_experts if shape.approximate else 0,
        token_counts=others * 8,
    )


def dense_router_grad_comm_bytes(
    config: TransformerConfig,
    num_tokens_per_rank: int,
    dtype: Optional[torch.dtype] = None,
    expert_model_parallel_size: Optional[int] = None,
    expert_tensor_parallel_size: Optional[int] = None,
) -> DenseRouterGradCommBytes:
    """Communication volume of ``TokenRing.routing_weight_grads`` per rank and MoE layer.

    With P = ETP * EP ranks in the expert-TP x EP group, T tokens per rank (the MoE input's
    s * b on that rank), hidden size H, E experts, L = E / EP local experts and b bytes per
    element of x and g:

        hidden = grad     = (P - 1) T H b     (every other member's block, once each)
        weight_grads      = (P - 1) T L 4     (fp32 partial G)
        pairs             = (P - 1) T E       (uint8; 0 unless moe_dense_router_grad_topm
                                               or moe_dense_router_grad_token_fraction
                                               is set)
        token_counts      = (P - 1) 8

    all zero when P = 1. When members hold different token counts, each block travels with
    its own count: a rank receives the sum of the other members' T instead of (P - 1) T.

    Args:
        config: The layer's config (hidden size, experts, parallel sizes, params dtype).
        num_tokens_per_rank: T, the tokens entering the MoE layer on one rank.
        dtype: dtype of x and g; defaults to ``config.params_dtype``.
        expert_model_parallel_size: EP; defaults to ``config.expert_model_parallel_size``.
        expert_tensor_parallel_size: ETP; defaults to ``config.expert_tensor_parallel_size``
            (which Megatron sets to the tensor-parallel size when left unset).

    Returns:
        The bytes of each transfer; ``.total`` sums them.
    """
    return comm_bytes(
        layer_shape(
            config,
            num_tokens_per_rank,
            dtype,
            expert_model_parallel_size,
            expert_tensor_parallel_size,
        )
    )


class DenseRouterGradMemoryBytes(NamedTuple):
    """Peak extra memory of one rank's dense backward of one MoE layer (``TokenRing``)."""

    blocks: int
    """Received token blocks alive at once: min(P - 1, 2) blocks of x and g (and of the
    pair mask), plus this rank's own mask as uint8."""
    chunk: int
    """One chunk's activations; under the approximations also the chunk's gathered rows of
    x and g, the local bool mask and the row indices."""
    weight_grads: int
    """fp32 G, [T, E], and (P > 1) three [T, L] partial-G buffers: the one being
    computed, the previous one being returned, and the one arriving."""

    @property
    def total(self) -> int:
        """All three together: the budget that does not grow with P."""
        return sum(self)


def chunk_bytes_per_token(ffn: int, gated: bool, element_size: int) -> int:
    """Activation bytes per token of one chunk of the dense reduction, for one expert.

    W1 x (F1 values, F1 = 2F gated), h and W2^T g (F each) in the weights' dtype, plus h and
    W2^T g in fp32.

    Args:
        ffn: F of the expert (its slice on this rank under expert TP).
        gated: Gated linear unit.
        element_size: Bytes per element of the expert weights.
    """
    f1 = 2 * ffn if gated else ffn
    return element_size * (f1 + 2 * ffn) + 4 * 2 * ffn


def chunk_tokens(config: object, ffn: int, gated: bool, element_size: int) -> int:
    """Tokens per chunk of the dense reduction.

    ``moe_dense_router_grad_chunk_size`` if set; otherwise the most tokens whose chunk
    activations (``chunk_bytes_per_token``) fit ``moe_dense_router_grad_chunk_budget_mb``.

    Args:
        config: Any object that may carry the ``moe_dense_router_grad*`` options.
        ffn: F of one expert on this rank (its slice under expert TP).
        gated: Gated linear unit.
        element_size: Bytes per element of the expert weights.
    """
    options = dense_router_grad_options(config)
    if options.moe_dense_router_grad_chunk_size:
        return options.moe_dense_router_grad_chunk_size
    budget = options.moe_dense_router_grad_chunk_budget_mb * 2**20
    return max(1, int(budget // chunk_bytes_per_token(ffn, gated, element_size)))


def memory_bytes(shape: MoELayerShape, chunk_tokens: int) -> DenseRouterGradMemoryBytes:
    """The extra memory of ``TokenRing.routing_weight_grads`` per rank and MoE layer.

    With P, T, H, E, L, b as in ``dense_router_grad_comm_bytes``, m = E if the pair mask
    travels (else 0) and C = min(chunk_tokens, T) tokens per chunk:

        blocks = min(P - 1, 2) T (2 H b + m) + T m
        chunk  = C bytes_per_token  (+ C (2 H b + 8) + T L under the approximations)
        weight_grads = 4 T E  (+ 3 x 4 T L when P > 1)

    None of them grows with P: the all-gather it replaces held 2 P T H b.

    Args:
        shape: The layer on this rank.
        chunk_tokens: Tokens per chunk of the reduction (``TokenRing.chunk_size``).

    Returns:
        The bytes of each part; ``.total`` sums them.
    """
    tokens, local = shape.tokens, shape.num_local_experts
    mask = shape.num_experts if shape.approximate else 0
    in_flight = min(shape.group_size - 1, 2)
    chunk = min(chunk_tokens, tokens)
    gathered = chunk * (2 * shape.hidden * shape.element_size + 8) + tokens * local
    partials = 3 * tokens * local * WEIGHT_GRAD_BYTES if shape.group_size > 1 else 0
    return DenseRouterGradMemoryBytes(
        blocks=in_flight * tokens * (2 * shape.hidden * shape.element_size + mask) + tokens * mask,
        chunk=chunk * chunk_bytes_per_token(shape.local_ffn, shape.gated, shape.element_size)
        + (gathered if shape.approximate else 0),
        weight_grads=tokens * shape.num_experts * WEIGHT_GRAD_BYTES + partials,
    )


def dense_router_grad_memory_bytes(
    config: TransformerConfig,
    num_tokens_per_rank: int,
    chunk_tokens: int,
    dtype: Optional[torch.dtype] = None,
    expert_model_parallel_size: Optional[int] = None,
    expert_tensor_parallel_size: Optional[int] = None,
) -> DenseRouterGradMemoryBytes:
    """``memory_bytes`` for a TransformerConfig's layer; arguments as in
    ``dense_router_grad_comm_bytes``, plus ``chunk_tokens`` (the reduction's chunk size)."""
    shape = layer_shape(
        config, num_tokens_per_rank, dtype, expert_model_parallel_size, expert_tensor_parallel_size
    )
    return memory_bytes(shape, chunk_tokens)


def dense_flops(shape: MoELayerShape) -> int:
    """FLOPs of one rank's dense reduction per MoE layer (exact DenseMixer, every pair).

    The rank evaluates its L local experts, on its F-slice F_l = F / ETP, on all P T tokens of
    the group: per (token, expert) two GEMMs, x W1^T (2 H F1_l with F1_l = 2 F_l gated) and
    g W2 (2 H F_l), and the dot product (2 F_l):

        P T L (2 H (F1_l + F_l) + 2 F_l)  =  T E (2 H (F1 + F) + 2 F)

    the same per rank at any EP and ETP (biases and the activation are left out).
    """
    ffn = shape.local_ffn
    f1 = 2 * ffn if shape.gated else ffn
    per_pair = 2 * shape.hidden * (f1 + ffn) + 2 * ffn
    return shape.group_size * shape.tokens * shape.num_local_experts * per_pair


def dense_chunk_bytes_per_token(
    config: TransformerConfig, ffn_size: int, dtype: torch.dtype
) -> int:
    """``chunk_bytes_per_token`` for a config's experts with weights of ``dtype``."""
    return chunk_bytes_per_token(ffn_size, config.gated_linear_unit, dtype.itemsize)
