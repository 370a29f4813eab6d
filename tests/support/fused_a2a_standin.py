"""Test-only stand-in for the fused all-to-all kernels behind Megatron's flex token dispatcher.

``MoEFlexTokenDispatcher`` (``moe_token_dispatcher_type="flex"``) never calls an all-to-all
itself: its managers call the four functions that ``megatron.core.transformer.moe.fused_a2a``
defines only when the CUDA package ``deep_ep`` is importable, and are ``None`` otherwise:

* ``moe_flex_dispatcher_backend="deepep"`` (``_DeepepManager``): ``fused_dispatch`` /
  ``fused_combine`` (DeepEP's ``Buffer.dispatch`` / ``Buffer.combine``), plus
  ``set_deepep_num_sms``, which the manager calls once when built;
* ``moe_flex_dispatcher_backend="hybridep"`` (``_HybridEPManager``): ``hybrid_ep_dispatch`` /
  ``hybrid_ep_combine`` (DeepEP's ``HybridEPBuffer.dispatch_with_permute`` /
  ``combine_with_unpermute``).

This module implements the same calls, with the same arguments and return values, from their
documented semantics (the fused_a2a docstrings and call sites, and DeepEP's ``Buffer`` /
``HybridEPBuffer`` docstrings and tests), on ``torch.distributed.all_to_all_single`` so that the
*unmodified* flex dispatcher runs on CPU over gloo. It is written from those semantics, not from
either implementation, and it is no performance model: one plain all-to-all per tensor.

Semantics implemented (``W`` ranks in the dispatcher's group, which is the expert-TP x EP group,
``L`` experts per rank, expert ``e`` on group rank ``e // L`` under local index ``e % L``):

DeepEP ``fused_dispatch(x, token_indices, token_probs, num_experts, group, ...)``
    ``token_indices`` / ``token_probs`` are ``[T, K]`` (global expert ids, ``-1`` = no expert).
    Each token is sent once to every rank that holds at least one of its experts (not once
    per expert). Received rows are ordered by source rank, then by token index on the source.
    Returns ``(recv_x [R, H], recv_indices [R, K], recv_probs [R, K], tokens_per_expert,
    handle)``: the received token's indices are *local* expert indices on this rank with
    ``-1`` for experts held elsewhere, its probs are the source's with ``0`` where the index is
    ``-1``, and ``tokens_per_expert`` is ``[L]`` (a CPU tensor, as fused_a2a builds it from
    DeepEP's Python list): how many received tokens each local expert got.
DeepEP ``fused_combine(x, group, handle, ...)``
    ``x`` is ``[R, H]`` in the received order. Each row goes back to its source rank, and the
    rows of one token are added, without weights (the experts already applied the probs):
    returns ``(combined_x [T, H], None)``.
HybridEP ``hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts, ...)``
    ``routing_map`` / ``probs`` are ``[T, W * L]`` (bool / float32). The same exchange as
    DeepEP's, followed by a permute: the output rows are grouped by local expert (expert 0's
    rows first), each group in the received order (source rank, then token index). Returns
    ``(hidden [P, H], probs [P], None, tokens_per_expert [L], handle)``, ``P`` = sum of
    ``tokens_per_expert``.
HybridEP ``hybrid_ep_combine(x, handle, num_permuted_tokens, pad_multiple)``
    Unpermute (the rows of one received token are added) and send back (a token's rows from
    every rank are added): ``[T, H]``.

Autograd, as fused_a2a's Functions define it: the backward of a dispatch is the combine of the
gradients (DeepEP also combines the probs' gradient, summed over the ranks that received the
token; HybridEP unpermutes it back to its ``[T, W * L]`` slot), and the backward of a combine
is the dispatch of the gradient along the same handle.

Not implemented (each raises): HybridEP's ``pad_multiple`` (fp8 / fp4 padding) and a
``num_permuted_tokens`` other than the real count (drop-and-pad capacity).

:func:`apply_fused_a2a_standin` patches these functions into ``fused_a2a`` and into
``token_dispatcher`` (which imported the ``None`` names at import time). Like the CPU shim it is
process-global and idempotent, and only tests call it. Nothing in site-packages is edited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "apply_fused_a2a_standin",
    "fused_combine",
    "fused_dispatch",
    "hybrid_ep_combine",
    "hybrid_ep_dispatch",
    "set_deepep_num_sms",
]

_STANDIN_APPLIED = False


# --------------------------------------------------------------------------------------
# The exchange shared by both backends
# --------------------------------------------------------------------------------------
@dataclass
class _Exchange:
    """Where each of this rank's tokens went and how many rows every rank sent and received.

    ``send_rows`` lists the source-token index of every sent row, grouped by destination rank
    (rank 0's rows first), ascending within a rank, and ``send_dest`` that row's destination
    rank; ``send_counts[r]`` rows went to rank r and
    ``recv_counts[r]`` rows came from rank r (Python ints: gloo's all_to_all_single needs
    lists).
    """

    group: Any
    num_tokens: int
    send_rows: torch.Tensor
    send_dest: torch.Tensor
    send_counts: List[int]
    recv_counts: List[int]


def _all_to_all(
    tensor: torch.Tensor, send_counts: List[int], recv_counts: List[int], group: Any
) -> torch.Tensor:
    """Rows ``send_counts[r]`` of ``tensor`` (grouped by rank) to rank r; returns the received
    rows grouped by source rank."""
    out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    dist.all_to_all_single(
        out,
        tensor.contiguous(),
        output_split_sizes=list(recv_counts),
        input_split_sizes=list(send_counts),
        group=group,
    )
    return out


def _plan(rank_mask: torch.Tensor, group: Any) -> _Exchange:
    """The exchange for ``rank_mask`` ``[T, W]`` (token t goes to rank r), counts swapped."""
    num_tokens, world = rank_mask.shape
    assert world == dist.get_world_size(group), (world, dist.get_world_size(group))
    # Rank-major, token-ascending: the transposed mask's nonzeros in row-major order.
    dest, token = rank_mask.t().nonzero(as_tuple=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    return _Exchange(
        group=group,
        num_tokens=num_tokens,
        send_rows=token,
        send_dest=dest,
        send_counts=send_counts.tolist(),
        recv_counts=recv_counts.tolist(),
    )


def _send(plan: _Exchange, per_token: torch.Tensor) -> torch.Tensor:
    """Dispatch direction: each token's row to every rank it goes to."""
    return _all_to_all(per_token[plan.send_rows], plan.send_counts, plan.recv_counts, plan.group)


def _send_rows(plan: _Exchange, rows: torch.Tensor) -> torch.Tensor:
    """Dispatch direction for already-expanded rows (one per sent row, in send order)."""
    return _all_to_all(rows, plan.send_counts, plan.recv_counts, plan.group)


def _return(plan: _Exchange, received: torch.Tensor) -> torch.Tensor:
    """Combine direction: every received row back to its source, the rows of a token added."""
    back = _all_to_all(received, plan.recv_counts, plan.send_counts, plan.group)
    out = back.new_zeros((plan.num_tokens, *back.shape[1:]))
    return out.index_add_(0, plan.send_rows, back)


def _return_rows(plan: _Exchange, received: torch.Tensor) -> torch.Tensor:
    """Combine direction without the sum: the rows back, in this rank's send order."""
    return _all_to_all(received, plan.recv_counts, plan.send_counts, plan.group)


# --------------------------------------------------------------------------------------
# DeepEP backend: fused_dispatch / fused_combine
# --------------------------------------------------------------------------------------
@dataclass
class DeepEPHandle:
    """The stand-in's communication handle of one DeepEP dispatch."""

    plan: _Exchange


def _local_topk(
    indices: torch.Tensor, probs: torch.Tensor, dest: torch.Tensor, num_local: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per sent row: its token's indices made local to ``dest`` (-1 elsewhere) and probs
    (0 where the index is -1)."""
    on_dest = (indices >= 0) & (indices // num_local == dest[:, None])
    local = torch.where(on_dest, indices % num_local, torch.full_like(indices, -1))
    return local, torch.where(on_dest, probs, torch.zeros_like(probs))


class _DeepEPDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group):
        world = dist.get_world_size(group)
        assert num_experts % world == 0, (num_experts, world)
        num_local = num_experts // world
        valid = token_indices >= 0
        token = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(token_indices)
        rank_mask = torch.zeros(x.shape[0], world, dtype=torch.bool, device=x.device)
        rank_mask[token[valid], token_indices[valid] // num_local] = True
        plan = _plan(rank_mask, group)
        rows = plan.send_rows
        local, probs = _local_topk(
            token_indices[rows], token_probs[rows], plan.send_dest, num_local
        )
        recv_x = _send_rows(plan, x[rows])
        recv_indices = _send_rows(plan, local)
        recv_probs = _send_rows(plan, probs)
        # A CPU tensor, as fused_a2a makes it from DeepEP's Python list.
        tokens_per_expert = torch.bincount(
            recv_indices[recv_indices >= 0], minlength=num_local
        ).cpu()
        ctx.plan = plan
        ctx.mark_non_differentiable(recv_indices, tokens_per_expert)
        return recv_x, recv_indices, recv_probs, tokens_per_expert, DeepEPHandle(plan)

    @staticmethod
    def backward(ctx, grad_x, grad_indices, grad_probs, grad_tokens_per_expert, grad_handle):
        plan = ctx.plan
        dx = _return(plan, grad_x)
        dprobs = None
        if grad_probs is not None:
            dprobs = _return(plan, grad_probs.float())
        return dx, None, dprobs, None, None


class _DeepEPCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle):
        ctx.plan = handle.plan
        return _return(handle.plan, x)

    @staticmethod
    def backward(ctx, grad_out):
        return _send(ctx.plan, grad_out), None


def fused_dispatch(
    x: torch.Tensor,
    token_indices: torch.Tensor,
    token_probs: torch.Tensor,
    num_experts: int,
    group: Any,
    async_finish: bool = False,
    allocate_on_comm_stream: bool = False,
):
    """Stand-in for fused_a2a.fused_dispatch (DeepEP): see the module docstring."""
    del async_finish, allocate_on_comm_stream  # CUDA stream options; everything is synchronous
    return _DeepEPDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts, group)


def fused_combine(
    x: torch.Tensor,
    group: Any,
    handle: DeepEPHandle,
    async_finish: bool = False,
    allocate_on_comm_stream: bool = False,
):
    """Stand-in for fused_a2a.fused_combine (DeepEP): ``(combined_x, None)``."""
    del async_finish, allocate_on_comm_stream
    assert handle.plan.group is group or group is None, "combine on another group than dispatch"
    return _DeepEPCombine.apply(x, handle), None


def set_deepep_num_sms(num_sms: int) -> None:
    """Stand-in for fused_a2a.set_deepep_num_sms: there are no SMs to reserve on CPU."""
    del num_sms


# --------------------------------------------------------------------------------------
# HybridEP backend: hybrid_ep_dispatch / hybrid_ep_combine
# --------------------------------------------------------------------------------------
@dataclass
class HybridEPHandle:
    """The stand-in's handle of one HybridEP dispatch: the exchange plus the local permute.

    ``perm_rows[p]`` is the received row of permuted row p and ``perm_experts[p]`` its local
    expert; ``num_received`` received rows, ``num_local`` local experts.
    """

    plan: _Exchange
    perm_rows: torch.Tensor
    perm_experts: torch.Tensor
    num_received: int
    num_local: int


def _unpermute(handle: HybridEPHandle, permuted: torch.Tensor) -> torch.Tensor:
    """Permuted rows back to received rows, the rows of one received token added."""
    out = permuted.new_zeros((handle.num_received, *permuted.shape[1:]))
    return out.index_add_(0, handle.perm_rows, permuted)


class _HybridEPDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, routing_map, probs, group, num_local_experts):
        world = dist.get_world_size(group)
        num_tokens = x.shape[0]
        num_experts = world * num_local_experts
        assert routing_map.shape == (num_tokens, num_experts), (routing_map.shape, num_experts)
        by_rank = routing_map.reshape(num_tokens, world, num_local_experts)
        plan = _plan(by_rank.any(dim=-1), group)
        rows, dest = plan.send_rows, plan.send_dest
        # Each sent row carries its token's routing-map and probs slice of the destination.
        local_map = by_rank[rows, dest].to(torch.uint8)
        recv_x = _send_rows(plan, x[rows])
        recv_map = _send_rows(plan, local_map).bool()
        recv_probs = None
        if probs is not None:
            local_probs = probs.reshape(num_tokens, world, num_local_experts)[rows, dest]
            recv_probs = _send_rows(plan, local_probs)
        # Permute: expert-major, received order within an expert.
        perm_experts, perm_rows = recv_map.t().nonzero(as_tuple=True)
        tokens_per_expert = torch.bincount(perm_experts, minlength=num_local_experts).cpu()
        handle = HybridEPHandle(
            plan=plan,
            perm_rows=perm_rows,
            perm_experts=perm_experts,
            num_received=recv_x.shape[0],
            num_local=num_local_experts,
        )
        ctx.handle = handle
        ctx.has_probs = probs is not None
        ctx.num_experts = num_experts
        permuted_probs = None if recv_probs is None else recv_probs[perm_rows, perm_experts]
        ctx.mark_non_differentiable(tokens_per_expert)
        return recv_x[perm_rows], permuted_probs, None, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_x, grad_probs, grad_scaling, grad_tokens_per_expert, grad_handle):
        handle = ctx.handle
        plan = handle.plan
        dx = _return(plan, _unpermute(handle, grad_x))
        dprobs = None
        if ctx.has_probs:
            if grad_probs is None:
                grad_probs = grad_x.new_zeros(handle.perm_rows.shape[0], dtype=torch.float32)
            received = grad_probs.new_zeros(handle.num_received, handle.num_local)
            received[handle.perm_rows, handle.perm_experts] = grad_probs
            back = _return_rows(plan, received)  # [sent rows, L], this rank's send order
            world = ctx.num_experts // handle.num_local
            dprobs = back.new_zeros(plan.num_tokens, world, handle.num_local)
            dprobs[plan.send_rows, plan.send_dest] = back
            dprobs = dprobs.reshape(plan.num_tokens, ctx.num_experts)
        return dx, None, dprobs, None, None


class _HybridEPCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle):
        ctx.handle = handle
        return _return(handle.plan, _unpermute(handle, x))

    @staticmethod
    def backward(ctx, grad_out):
        handle = ctx.handle
        return _send(handle.plan, grad_out)[handle.perm_rows], None


def hybrid_ep_dispatch(
    x: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    group: Any,
    num_local_experts: int,
    num_sms_dispatch_api: Optional[int] = None,
    num_sms_combine_api: Optional[int] = None,
    num_blocks_permute: Optional[int] = None,
    num_blocks_unpermute: Optional[int] = None,
    fused: bool = False,
    num_permuted_tokens: Optional[Any] = None,
    pad_multiple: Optional[int] = None,
    num_sms_preprocessing_api: Optional[int] = None,
):
    """Stand-in for fused_a2a.hybrid_ep_dispatch (HybridEP): see the module docstring.

    Takes every keyword the megatron-core 0.16-0.19 call sites pass. SM and block counts are
    kernel launch sizes and ``fused`` (megatron-core >= 0.17) fuses the permute into the
    dispatch kernel; none changes what is sent where, so all are ignored here.
    """
    del num_sms_dispatch_api, num_sms_combine_api, num_sms_preprocessing_api
    del num_blocks_permute, num_blocks_unpermute, fused
    if pad_multiple is not None:
        raise NotImplementedError("fused_a2a stand-in: HybridEP pad_multiple (fp8/fp4 padding)")
    out = _HybridEPDispatch.apply(x, routing_map, probs, group, num_local_experts)
    if num_permuted_tokens is not None and int(num_permuted_tokens) != out[0].shape[0]:
        raise NotImplementedError(
            "fused_a2a stand-in: num_permuted_tokens other than the routed count (drop-and-pad)"
        )
    return out


def hybrid_ep_combine(
    x: torch.Tensor,
    handle: HybridEPHandle,
    num_permuted_tokens: Optional[Any],
    pad_multiple: Optional[int],
    fused: bool = False,
) -> torch.Tensor:
    """Stand-in for fused_a2a.hybrid_ep_combine (HybridEP): ``[T, H]``; ``fused`` (the
    unpermute fused into the combine kernel) does not change the result."""
    del fused
    if pad_multiple is not None:
        raise NotImplementedError("fused_a2a stand-in: HybridEP pad_multiple (fp8/fp4 padding)")
    assert x.shape[0] == handle.perm_rows.shape[0], (x.shape, handle.perm_rows.shape)
    return _HybridEPCombine.apply(x, handle)


# --------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------
_PATCHES = {
    "fused_dispatch": fused_dispatch,
    "fused_combine": fused_combine,
    "set_deepep_num_sms": set_deepep_num_sms,
    "hybrid_ep_dispatch": hybrid_ep_dispatch,
    "hybrid_ep_combine": hybrid_ep_combine,
}


def apply_fused_a2a_standin() -> None:
    """Point Megatron's fused_a2a functions (both backends) at this stand-in; idempotent.

    Patches ``megatron.core.transformer.moe.fused_a2a`` and ``token_dispatcher``, which
    bound the names (``None`` without ``deep_ep``) at import. Process-global: call it only in
    test processes that never use the real DeepEP.
    """
    global _STANDIN_APPLIED
    if _STANDIN_APPLIED:
        return
    from megatron.core.transformer.moe import fused_a2a, token_dispatcher

    for module in (fused_a2a, token_dispatcher):
        for name, fn in _PATCHES.items():
            setattr(module, name, fn)
    _STANDIN_APPLIED = True
