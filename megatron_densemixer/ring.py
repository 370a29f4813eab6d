"""The token ring: G = <g, E_e(x)> for this rank's tokens and all experts, under EP and expert TP.

Holds the parallel exchange (token blocks streamed around the expert-TP x EP group in a ring,
scalars returned to each block's owner), chunk sizing, and the opt-in (token, expert) pair
sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer.cost import chunk_tokens
from megatron_densemixer.experts import ExpertFunctions, ExpertModule, expert_routing_weight_grads
from megatron_densemixer.options import DenseMixerOptions, approximates

_SCORES_TAG = 3
"""Point-to-point tag of the returned partial G; a block's tensors use tags 0 to 2."""


@dataclass
class TokenRing:
    """What the backward needs to turn g into the router's dense gradient on this rank.

    Parallel layout: ``tp_ep_group`` holds the expert-TP x EP ranks (group rank
    ep_rank * expert_tp_size + expert_tp_rank, the order Megatron's dispatchers assume), which
    jointly hold every expert's full F, so each member evaluates its local experts (its F-slice
    of them) on every member's tokens. The members' token blocks (x, g and, with the
    approximations, the pair mask) travel once around the group: in step s a rank evaluates the
    block of member rank - s while it passes that block on to rank + 1 and receives the next
    one from rank - 1, and returns the previous step's [tokens, local experts] partial
    G to their owner, which sums the expert-TP partials. At most two received blocks
    are alive at a time, whatever the group size (``dense_router_grad_memory_bytes``), and
    every transfer overlaps a block's GEMMs where the backend's point-to-point ops are
    asynchronous (NCCL, gloo). Only scalars travel back, never hidden vectors. Members may
    hold different numbers of tokens (the all-to-all dispatcher allows it).
    """

    config: TransformerConfig
    chunk_size: int
    tp_ep_group: Optional[dist.ProcessGroup] = None
    expert_tp_size: int = 1
    expert_tp_rank: int = 0
    local_expert_offset: int = 0

    def routing_weight_grads(
        self,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        experts: ExpertFunctions,
        pairs: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """G for this rank's tokens and all experts, [num_local_tokens, num_experts].

        fp32 (fp64 for fp64 expert weights), the accumulation dtype of
        ``expert_routing_weight_grads``.

        Args:
            hidden: This rank's MoE input x, [num_local_tokens, H].
            grad: g = dL/dy for the same tokens, [num_local_tokens, H].
            experts: This rank's local experts (its F slice of them under expert TP), as
                weights or as the experts module (``experts.local_experts``).
            pairs: Optional bool [num_local_tokens, num_experts]: compute only these pairs.
        """
        if _group_size(self.tp_ep_group) == 1:
            return self._block_weight_grads([hidden, grad, pairs], experts)
        return self._ring_weight_grads(hidden, grad, experts, pairs)

    def _block_weight_grads(
        self, block: List[Optional[torch.Tensor]], experts: ExpertFunctions
    ) -> torch.Tensor:
        """This rank's local experts on one member's block (x, g[, pairs]), [T_m, L]."""
        hidden, grad, pairs = block if len(block) == 3 else (*block, None)
        if pairs is not None:
            num_local = (
                experts.num_local_experts if isinstance(experts, ExpertModule) else len(experts)
            )
            pairs = pairs[:, self.local_expert_offset : self.local_expert_offset + num_local]
            pairs = pairs.bool()
        return expert_routing_weight_grads(
            hidden,
            grad,
            experts,
            self.config,
            self.chunk_size,
            add_fc2_bias=self.expert_tp_rank == 0,
            pairs=pairs,
        )

    def _ring_weight_grads(
        self,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        experts: ExpertFunctions,
        pairs: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``routing_weight_grads`` over a group of two or more members (the ring above)."""
        group = self.tp_ep_group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        counts = _token_counts(hidden.shape[0], group, hidden.device)
        block = [hidden.contiguous(), grad.contiguous()]
        if pairs is not None:
            block.append(pairs.to(torch.uint8))  # gloo and NCCL do not send bool
        receive_slots: List[List[torch.Tensor]] = []
        weight_grads = None  # [num_local_tokens, EP, local experts], summed over expert TP
        outgoing = None  # the previous step's partial G, still to be returned
        # Step `size` only returns the last partial G.
        for step in range(size + 1):
            ops, incoming, returned = [], None, None
            if step + 1 < size:
                sender = (rank - step - 1) % size  # whose block arrives for the next step
                incoming = _receive_buffers(receive_slots, step % 2, block, counts, sender)
                ops += _p2p_ops(dist.isend, block, (rank + 1) % size, group)
                ops += _p2p_ops(dist.irecv, incoming, (rank - 1) % size, group)
            if outgoing is not None:
                # In step - 1 this rank evaluated member `back`'s block, and member `ahead`
                # evaluated this rank's block.
                back, ahead = (rank - step + 1) % size, (rank + step - 1) % size
                returned = outgoing.new_empty((hidden.shape[0], outgoing.shape[1]))
                ops += _p2p_ops(dist.isend, [outgoing], back, group, _SCORES_TAG)
                ops += _p2p_ops(dist.irecv, [returned], ahead, group, _SCORES_TAG)
            works = dist.batch_isend_irecv(ops) if ops else []
            partial = self._block_weight_grads(block, experts) if step < size else None
            if weight_grads is None:
                ep_size = size // self.expert_tp_size
                weight_grads = partial.new_zeros((hidden.shape[0], ep_size, partial.shape[1]))
                weight_grads[:, rank // self.expert_tp_size] += partial
                partial = None
            for work in works:
                work.wait()
            if returned is not None:
                weight_grads[:, ahead // self.expert_tp_size] += returned
            block, outgoing = incoming, partial
        return weight_grads.flatten(1)


@dataclass(eq=False)
class ExactEstimator:
    """The exact estimator: every local expert recomputed on every token (``TokenRing``)."""

    ring: TokenRing
    experts: ExpertFunctions
    """This rank's local experts, as weights or as the module (``experts.local_experts``)."""

    def routing_weight_grads(
        self, hidden: torch.Tensor, grad: torch.Tensor, pairs: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``TokenRing.routing_weight_grads``: G for this rank's tokens and all experts."""
        return self.ring.routing_weight_grads(hidden, grad, self.experts, pairs)


def dense_chunk_size(config: TransformerConfig, ffn_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk of the dense reduction, for experts of F ``ffn_size`` in ``dtype``.

    ``moe_dense_router_grad_chunk_size`` if set; otherwise the most tokens whose chunk
    activations fit ``moe_dense_router_grad_chunk_budget_mb`` (``cost.chunk_tokens``).
    """
    element = torch.empty((), dtype=dtype).element_size()
    return chunk_tokens(config, ffn_size, config.gated_linear_unit, element)


def dense_pairs(
    dense_probs: torch.Tensor,
    routing_map: torch.Tensor,
    options: DenseMixerOptions,
    generator: Optional[torch.Generator] = None,
) -> Optional[torch.Tensor]:
    """The (token, expert) pairs the backward evaluates under the opt-in approximations.

    None (every pair, the exact gradient) unless ``moe_dense_router_grad_topm`` or
    ``moe_dense_router_grad_token_fraction`` is set. Top-M keeps M experts per token: K (kept
    in, as the gated baseline needs its G; fewer than k under token dropping) and the
    non-selected experts with the highest scores. The token fraction keeps each token with
    probability f, drawn from ``generator`` (a CPU generator; the global one when None): a
    private generator keeps the global RNG stream, and with it every dropout mask of an
    activation recompute, the same whether or not this draw happens.
    """
    topm = options.moe_dense_router_grad_topm
    fraction = options.moe_dense_router_grad_token_fraction
    if not approximates(options):
        return None
    pairs = torch.ones_like(routing_map)
    if topm is not None:
        ranking = dense_probs.masked_fill(routing_map, float("inf"))
        top = ranking.topk(topm, dim=-1).indices
        pairs = torch.zeros_like(routing_map).scatter_(1, top, True)
    if fraction < 1.0:
        draw = torch.rand(routing_map.shape[0], generator=generator)
        keep = draw.to(routing_map.device) < fraction
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


def _receive_buffers(
    slots: List[List[torch.Tensor]],
    slot: int,
    block: List[torch.Tensor],
    counts: List[int],
    sender: int,
) -> List[torch.Tensor]:
    """Views of ``counts[sender]`` rows into receive slot ``slot`` (0 or 1), shaped like
    ``block``'s tensors. Each slot is allocated once, for the largest count, so a step
    receives into the slot that the previous step's transfers have finished with."""
    if len(slots) == slot:
        largest = max(counts)
        slots.append([t.new_empty((largest,) + tuple(t.shape[1:])) for t in block])
    return [buffer[: counts[sender]] for buffer in slots[slot]]


def _p2p_ops(
    op: Callable[..., Any],
    tensors: List[torch.Tensor],
    peer: int,
    group: dist.ProcessGroup,
    first_tag: int = 0,
) -> List[dist.P2POp]:
    """One ``dist.P2POp`` per non-empty tensor, to or from group rank ``peer``.

    Both sides know every member's token count, so they skip the same empty tensors. Each
    tensor gets its own tag (first_tag, first_tag + 1, ...), so gloo matches them in any
    order; NCCL ignores tags and matches in issue order, which both sides share.
    """
    peer = dist.get_global_rank(group, peer)
    return [
        dist.P2POp(op, tensor, peer, group, first_tag + i)
        for i, tensor in enumerate(tensors)
        if tensor.numel() > 0
    ]
