"""The backward's dense reduction: G = <g, E_e(x)> for this rank's tokens and all experts.

Holds the parallel exchange (tokens gathered over the expert-TP x EP group, scalars returned
with one all-to-all), chunk sizing, and the opt-in (token, expert) pair sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer.cost import dense_chunk_bytes_per_token
from megatron_densemixer.experts import ExpertWeights, expert_output_scores
from megatron_densemixer.options import approximates, dense_router_grad_options


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
    chunk_size: int
    tp_ep_group: Optional[dist.ProcessGroup] = None
    expert_tp_size: int = 1
    expert_tp_rank: int = 0
    local_expert_offset: int = 0

    def scores(
        self,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        experts: Sequence[ExpertWeights],
        pairs: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """G for this rank's tokens and all experts, [num_local_tokens, num_experts], fp32.

        Args:
            hidden: This rank's MoE input x, [num_local_tokens, H].
            grad: g = dL/dy for the same tokens, [num_local_tokens, H].
            experts: This rank's local experts (its F slice of them under expert TP).
            pairs: Optional bool [num_local_tokens, num_experts]: score only these pairs.
        """
        group, group_size = self.tp_ep_group, _group_size(self.tp_ep_group)
        num_tokens = hidden.shape[0]
        if group_size > 1:
            counts = _token_counts(num_tokens, group, hidden.device)
            hidden = _all_gather_tokens(hidden, group, counts)
            grad = _all_gather_tokens(grad, group, counts)
            if pairs is not None:
                pairs = _all_gather_tokens(pairs.to(torch.uint8), group, counts).bool()
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


def dense_chunk_size(config: TransformerConfig, ffn_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk of the dense reduction.

    ``moe_dense_router_grad_chunk_size`` if set; otherwise the most tokens whose chunk
    activations (``dense_chunk_bytes_per_token``) fit ``moe_dense_router_grad_chunk_budget_mb``.
    """
    options = dense_router_grad_options(config)
    if options.moe_dense_router_grad_chunk_size:
        return options.moe_dense_router_grad_chunk_size
    budget = options.moe_dense_router_grad_chunk_budget_mb * 2**20
    return max(1, int(budget // dense_chunk_bytes_per_token(config, ffn_size, dtype)))


def dense_pairs(
    dense_probs: torch.Tensor, routing_map: torch.Tensor, config: TransformerConfig
) -> Optional[torch.Tensor]:
    """The (token, expert) pairs the backward scores under the opt-in approximations.

    None (every pair, the exact gradient) unless ``moe_dense_router_grad_topm`` or
    ``moe_dense_router_grad_token_fraction`` is set. Top-M keeps K plus the M - k
    non-selected experts with the highest scores (K stays in, as the gated baseline needs
    its G); the token fraction keeps each token with probability f.
    """
    options = dense_router_grad_options(config)
    topm = options.moe_dense_router_grad_topm
    fraction = options.moe_dense_router_grad_token_fraction
    if not approximates(options):
        return None
    pairs = torch.ones_like(routing_map)
    if topm is not None:
        extra = dense_probs.topk(topm - config.moe_router_topk, dim=-1).indices
        pairs = routing_map.clone().scatter_(1, extra, True)
    if fraction < 1.0:
        keep = torch.rand(routing_map.shape[0], device=routing_map.device) < fraction
        pairs &= keep.unsqueeze(1)
    return pairs


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
