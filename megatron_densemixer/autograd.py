"""The fused DenseMixer straight-through function and the backward's dense reduction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class ExpertWeights(NamedTuple):
    """One local expert, E_e(x) = fc2_weight @ act(fc1_weight @ x + fc1_bias) + fc2_bias.

    Weights use torch.nn.Linear's [out, in] layout: fc1_weight [F1, H] (F1 = 2F for gated
    units), fc2_weight [H, F]. Under expert tensor parallelism they are this rank's F slice.
    """

    fc1_weight: torch.Tensor
    fc1_bias: Optional[torch.Tensor]
    fc2_weight: torch.Tensor
    fc2_bias: Optional[torch.Tensor]


def expert_activation(fc1_output: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """act(a), or act(a_glu) * (a_linear + glu_linear_offset) for gated linear units.

    Mirrors megatron.core.transformer.mlp.MLP's unfused activation, clamping included.
    """
    if not config.gated_linear_unit:
        return config.activation_func(fc1_output)
    a_glu, a_linear = torch.chunk(fc1_output, 2, dim=-1)
    clamp = getattr(config, "activation_func_clamp_value", None)
    if clamp is not None:
        a_glu = a_glu.clamp(min=None, max=clamp)
        a_linear = a_linear.clamp(min=-clamp, max=clamp)
    return config.activation_func(a_glu) * (a_linear + getattr(config, "glu_linear_offset", 0.0))


def expert_output_scores(
    hidden: torch.Tensor,
    grad: torch.Tensor,
    experts: Sequence[ExpertWeights],
    config: TransformerConfig,
    chunk_size: int,
    add_fc2_bias: bool = True,
    pairs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """G[t, e] = <g_t, E_e(x_t)> for every token and local expert, chunk by chunk.

    For E_e(x) = W2 h + b2 with h = act(W1 x + b1):

        G[t, e] = <W2^T g_t, h_t> + <g_t, b2>

    so each expert costs two dense GEMMs over the shared tokens (x W1^T and g W2) and a
    row-wise dot product; no permutation. Only one chunk of h and W2^T g is alive at a time.

    Precision notes: the GEMMs run in the expert weights' dtype, as the conventional expert
    forward does; the dot products accumulate in fp32 (fp64 for fp64 weights).

    Args:
        hidden: Expert input x, [num_tokens, H].
        grad: Gradient g of the MoE output, [num_tokens, H].
        experts: The local experts' weights.
        config: The layer's config (activation function, gated linear unit).
        chunk_size: Tokens per chunk.
        add_fc2_bias: Add <g, b2>; False on all but one rank of an expert-TP group, since b2
            is replicated there while the W2 slices' partial scores are summed.
        pairs: Optional bool [num_tokens, len(experts)]: compute only these (token, expert)
            pairs (gathering their tokens), leaving 0 elsewhere. None computes every pair.

    Returns:
        G, [num_tokens, len(experts)], in the accumulation dtype.
    """
    num_tokens = hidden.shape[0]
    accumulate = torch.promote_types(experts[0].fc2_weight.dtype, torch.float32)
    shape, device = (num_tokens, len(experts)), hidden.device
    new = torch.empty if pairs is None else torch.zeros
    scores = new(shape, dtype=accumulate, device=device)
    for e, w in enumerate(experts):
        rows = None if pairs is None else pairs[:, e].nonzero().squeeze(1)
        count = num_tokens if rows is None else rows.numel()
        for start in range(0, count, chunk_size):
            index = slice(start, min(start + chunk_size, count))
            if rows is not None:
                index = rows[index]
            scores[index, e] = _expert_scores(hidden[index], grad[index], w, config, add_fc2_bias)
    return scores


def _expert_scores(
    x: torch.Tensor,
    g: torch.Tensor,
    w: ExpertWeights,
    config: TransformerConfig,
    add_fc2_bias: bool,
) -> torch.Tensor:
    """<W2^T g_t, h_t> (+ <g_t, b2>) for one block of tokens and one expert, [C]."""
    accumulate = torch.promote_types(w.fc2_weight.dtype, torch.float32)
    x = x.to(w.fc1_weight.dtype)
    g = g.to(w.fc2_weight.dtype)
    h = expert_activation(F.linear(x, w.fc1_weight, w.fc1_bias), config)  # [C, F]
    u = g @ w.fc2_weight  # [C, F]
    scores = torch.linalg.vecdot(h.to(accumulate), u.to(accumulate))
    if add_fc2_bias and w.fc2_bias is not None:
        scores += g.to(accumulate) @ w.fc2_bias.to(accumulate)
    return scores


@dataclass
class DenseReduction:
    """What the backward needs to turn g into the router's dense gradient on this rank.

    Parallel layout: tokens are gathered over ``tp_ep_group`` (expert-TP x EP ranks, whose
    group rank is ep_rank * expert_tp_size + expert_tp_rank, the order Megatron's
    dispatchers assume), whose members jointly hold every expert's full F. Each member scores
    its local experts on all gathered tokens; an all-to-all returns each token's
    [tokens, local experts] block to the token's rank, where the expert-TP partial scores are
    summed. Only scalars travel back, never hidden vectors. Members may hold different
    numbers of tokens (the all-to-all dispatcher allows it): the gathers pad to the largest.
    """

    config: TransformerConfig
    local_experts: Callable[[], Sequence[ExpertWeights]]
    chunk_size: int
    tp_ep_group: Optional[dist.ProcessGroup] = None
    expert_tp_size: int = 1
    expert_tp_rank: int = 0
    local_expert_offset: int = 0

    def scores(
        self, hidden: torch.Tensor, grad: torch.Tensor, pairs: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """G for this rank's tokens and all experts, [num_local_tokens, num_experts], fp32.

        ``pairs`` (bool [num_local_tokens, num_experts]) restricts the work to those pairs.
        """
        group, group_size = self.tp_ep_group, _group_size(self.tp_ep_group)
        num_tokens = hidden.shape[0]
        if group_size > 1:
            counts = _token_counts(num_tokens, group, hidden.device)
            hidden = _all_gather_tokens(hidden, group, counts)
            grad = _all_gather_tokens(grad, group, counts)
            if pairs is not None:
                pairs = _all_gather_tokens(pairs.to(torch.uint8), group, counts).bool()
        experts = self.local_experts()
        if pairs is not None:
            pairs = pairs[:, self.local_expert_offset : self.local_expert_offset + len(experts)]
        partial = expert_output_scores(
            hidden,
            grad,
            experts,
            self.config,
            self.chunk_size,
            add_fc2_bias=self.expert_tp_rank == 0,
            pairs=pairs,
        )  # [group tokens, local experts]
        if group_size == 1:
            return partial
        # Send member i the rows of its tokens; block i received: member i's partial scores
        # of this rank's tokens, for member i's local experts (or its F-slice of them).
        num_local_experts = partial.shape[1]
        received = partial.new_empty((group_size * num_tokens, num_local_experts))
        dist.all_to_all_single(
            received,
            partial.contiguous(),
            output_split_sizes=[num_tokens] * group_size,
            input_split_sizes=counts,
            group=group,
        )
        ep_size = group_size // self.expert_tp_size
        received = received.view(ep_size, self.expert_tp_size, num_tokens, num_local_experts)
        return received.sum(dim=1).permute(1, 0, 2).reshape(num_tokens, -1)


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
    approximate = (
        getattr(config, "moe_dense_router_grad_topm", None) is not None
        or getattr(config, "moe_dense_router_grad_token_fraction", 1.0) < 1.0
    )
    hidden = others * num_tokens_per_rank * config.hidden_size * element
    return DenseRouterGradCommBytes(
        all_gather_hidden=hidden,
        all_gather_grad=hidden,
        all_to_all_scores=others * num_tokens_per_rank * (num_experts // ep) * 4,
        all_gather_pairs=others * num_tokens_per_rank * num_experts if approximate else 0,
        all_gather_token_counts=others * 8,
    )


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _token_counts(num_tokens: int, group: dist.ProcessGroup, device: torch.device) -> List[int]:
    """Every group member's token count, in group-rank order.

    One tiny all-gather, plus a device-to-host copy to size the next collectives (the same
    kind of sync the all-to-all dispatcher makes for its split sizes).
    """
    count = torch.tensor([num_tokens], dtype=torch.int64, device=device)
    counts = count.new_empty(dist.get_world_size(group))
    dist.all_gather_into_tensor(counts, count, group=group)
    return counts.tolist()


def _all_gather_tokens(
    tensor: torch.Tensor, group: dist.ProcessGroup, counts: List[int]
) -> torch.Tensor:
    """Concatenates the members' [tokens, ...] blocks along tokens, in group-rank order.

    Uneven blocks are padded to the largest for the all-gather, then trimmed.
    """
    size, largest = len(counts), max(counts)
    if tensor.shape[0] < largest:
        padding = tensor.new_zeros((largest - tensor.shape[0],) + tuple(tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    output = tensor.new_empty((size * largest,) + tuple(tensor.shape[1:]))
    dist.all_gather_into_tensor(output, tensor.contiguous(), group=group)
    if min(counts) == largest:
        return output
    return torch.cat([block[:n] for block, n in zip(output.split(largest), counts, strict=True)])


class DenseRouterGradFunction(torch.autograd.Function):
    """Identity on the MoE output; in the backward, DenseMixer's gradient for the dense weights.

    Forward: y -> y (bitwise; the conventional output is the forward value).

    Backward, with g = dL/dy and G[t, e] = <g_t, E_e(x_t)> for every expert e:

        dL/dy         = g                          (passed through to the conventional path)
        dL/dw_dense_e = G_e                        for e not in K   ("partscale")
        dL/dw_dense_e = G_e - sum_{j in K} (w_j / c) G_j   for e not in K   ("gated")
        dL/dw_dense_e = 0                          for e in K (the conventional probs carry it)

    With the opt-in approximations, G is computed only on ``pairs`` (the top-M experts by
    score) and on a random fraction f of the tokens, whose gradients are scaled by 1/f so
    their sum over tokens stays unbiased.

    where w are the conventional top-k probs, K the selected set and c the top-k scaling
    factor. The experts' weights and the path from x through the experts receive nothing here,
    so they keep exactly their conventional gradients.
    """

    @staticmethod
    def forward(
        ctx,
        output: torch.Tensor,
        dense_probs: torch.Tensor,
        hidden_states: torch.Tensor,
        probs: torch.Tensor,
        routing_map: torch.Tensor,
        pairs: Optional[torch.Tensor],
        reduction: DenseReduction,
        variant: str,
        token_fraction: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(hidden_states.detach(), probs.detach(), routing_map, pairs)
        ctx.reduction = reduction
        ctx.variant = variant
        ctx.token_fraction = token_fraction
        return output

    @staticmethod
    def backward(
        ctx, grad_output: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], None, None, None, None, None, None, None]:
        hidden_states, probs, routing_map, pairs = ctx.saved_tensors
        grad_dense = None
        if ctx.needs_input_grad[1]:
            hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
            with torch.no_grad():
                scores = ctx.reduction.scores(hidden, grad_output.reshape(hidden.shape), pairs)
                if ctx.variant == "gated":
                    scale = ctx.reduction.config.moe_router_topk_scaling_factor or 1.0
                    baseline = (probs.float() * scores).sum(dim=-1, keepdim=True) / scale
                    scores = scores - baseline
                grad_dense = scores.masked_fill(routing_map, 0.0)
                if ctx.token_fraction < 1.0:
                    grad_dense /= ctx.token_fraction
        return (
            grad_output,  # output
            grad_dense,  # dense_probs
            None,  # hidden_states
            None,  # probs
            None,  # routing_map
            None,  # pairs
            None,  # reduction
            None,  # variant
            None,  # token_fraction
        )


def dense_router_grad(
    output: torch.Tensor,
    dense_probs: torch.Tensor,
    hidden_states: torch.Tensor,
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    reduction: DenseReduction,
    variant: str = "partscale",
    pairs: Optional[torch.Tensor] = None,
    token_fraction: float = 1.0,
) -> torch.Tensor:
    """Attaches DenseMixer's router gradient to the MoE output; see DenseRouterGradFunction.

    Args:
        output: The conventional MoE output, [s, b, H]; returned unchanged.
        dense_probs: Dense weights of the non-selected experts, [num_tokens, num_experts].
        hidden_states: The MoE input x, [s, b, H].
        probs: The conventional top-k probs, [num_tokens, num_experts].
        routing_map: The selected experts, bool [num_tokens, num_experts].
        reduction: How to compute G on this rank.
        variant: "partscale" or "gated".
        pairs: Optional bool [num_tokens, num_experts]: the (token, expert) pairs to score.
        token_fraction: The fraction of tokens ``pairs`` samples (their grads scale by 1/f).
    """
    return DenseRouterGradFunction.apply(
        output,
        dense_probs,
        hidden_states,
        probs,
        routing_map,
        pairs,
        reduction,
        variant,
        token_fraction,
    )
