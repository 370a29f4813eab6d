"""A TopKRouter that also yields the dense weights of the non-selected experts."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer.autograd import DenseRouterGradCall
from megatron_densemixer.options import renormalises_topk

# Megatron adds this to the denominator of sigmoid-style renormalisation.
_RENORM_EPS = 1e-20

# The call a DenseMixer layer's route step is recording, set only for the duration of that
# synchronous step: the router reports into it without any attribute that outlives the call.
_RECORDING: contextvars.ContextVar[Optional[DenseRouterGradCall]] = contextvars.ContextVar(
    "dense_router_grad_call", default=None
)


@contextlib.contextmanager
def recording_dense_router_grad(call: Optional[DenseRouterGradCall]) -> Iterator[None]:
    """Within this block, a DenseMixerTopKRouter's ``routing`` records into ``call``.

    Args:
        call: The record to fill (``dense_probs``, ``selected``); None records nothing.
    """
    token = _RECORDING.set(call)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def recording_call() -> Optional[DenseRouterGradCall]:
    """The call being recorded by the enclosing ``recording_dense_router_grad``, if any."""
    return _RECORDING.get()


def router_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Per-expert scores s = softmax(z), sigmoid(z) or sqrt(softplus(z)), in >= fp32."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if score_function == "softmax":
        return torch.softmax(z, dim=-1)
    if score_function == "sigmoid":
        return torch.sigmoid(z)
    if score_function == "sqrtsoftplus":
        return F.softplus(z).sqrt()
    raise ValueError(f"moe_router_score_function={score_function!r} is not supported.")


def dense_router_probs(
    logits: torch.Tensor,
    routing_map: torch.Tensor,
    config: TransformerConfig,
    topk_map: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense routing weights of the non-selected experts, differentiable w.r.t. the logits.

    For a token with scores s (see ``router_scores``), selected set K and top-k set T:

        w_e = c * s_e / stopgrad(S)   for e not in K, when the top-k weights are renormalised
        w_e = c * s_e                 for e not in K, otherwise
        w_e = 0                       for e in K (the conventional probs carry those)
        w_e = 0                       for every e when T is empty

    where S = sum_{j in T} s_j (+1e-20 for sigmoid-style scores, as Megatron does) and c is
    ``moe_router_topk_scaling_factor`` (1 when unset). Renormalised means softmax with
    ``moe_router_pre_softmax=False`` or sigmoid/sqrtsoftplus with ``moe_router_topk > 1``.
    With dL/dw_e = G_e = <g, E_e(x)>, this adds dL/ds_j = c G_j / S (or c G_j) for j not in K
    to the conventional gradient, which is exactly the DenseMixer "partscale" gradient.

    Without token dropping T = K. With it (``moe_expert_capacity_factor``), K is the top-k
    pairs that survived capacity and T the top-k before dropping: Megatron divides the kept
    weights by the sum over T, so a dropped pair is a non-selected one with that same S. A
    token with an empty T (padding exclusion, an empty replayed row) has no conventional
    output and contributes nothing to the dense term either; S is never divided by when it
    is empty.

    Args:
        logits: Router logits, [num_tokens, num_experts].
        routing_map: Selected experts K, bool [num_tokens, num_experts]: the pairs the forward
            used (with pad-to-capacity, not the padding pairs of Megatron's routing map).
        config: The layer's config.
        topk_map: The top-k set T before token dropping, bool [num_tokens, num_experts];
            None means T = K (no dropping).

    Returns:
        The dense weights, [num_tokens, num_experts], in fp32 (fp64 for fp64 logits).
    """
    scores = router_scores(logits, config.moe_router_score_function)
    if topk_map is None:
        topk_map = routing_map
    routed = topk_map.any(dim=-1, keepdim=True)  # [num_tokens, 1]
    if renormalises_topk(config):
        eps = 0.0 if config.moe_router_score_function == "softmax" else _RENORM_EPS
        selected_sum = (scores * topk_map).sum(dim=-1, keepdim=True) + eps
        # An unrouted row's S is 0 (or eps): divide by 1 there, its weights are zeroed below.
        selected_sum = torch.where(routed, selected_sum, torch.ones_like(selected_sum))
        scores = scores / selected_sum.detach()
    if config.moe_router_topk_scaling_factor:
        scores = scores * config.moe_router_topk_scaling_factor
    return scores.masked_fill(routing_map | ~routed, 0.0)


class _TopkRecorder:
    """Stands in for a router's ``router_replay`` during one ``routing`` call.

    Megatron's top-k (``topk_routing_with_score_function``, unfused) asks its
    ``router_replay`` argument for the top-k indices whenever it is not None; this object
    answers as the router's own RouterReplay would (or as plain top-k when the router has
    none) and keeps the indices: the top-k set before token dropping, which
    ``TopKRouter.routing`` does not return.
    """

    def __init__(self, replay: Any) -> None:
        self.replay = replay
        self.top_indices: Optional[torch.Tensor] = None

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        default_compute_topk: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """RouterReplay.get_replay_topk's contract: (top-k values, indices [num_tokens, k])."""
        if self.replay is None:
            values, indices = default_compute_topk(scores, topk, num_groups, group_topk)
        else:
            values, indices = self.replay.get_replay_topk(
                scores, topk, num_groups, group_topk, default_compute_topk
            )
        self.top_indices = indices
        return values, indices


class DenseMixerTopKRouter(TopKRouter):
    """TopKRouter whose routing also makes the dense weights of the non-selected experts.

    Its probs and routing_map are the parent's, untouched. Inside a DenseMixer layer's route
    step that records a call (``recording_dense_router_grad``) and when the logits carry a
    gradient, ``routing`` also computes ``dense_router_probs`` from the same logits and
    selection and leaves them, with the selected set K, in that call's record.

    With token dropping (``moe_expert_capacity_factor``), K is the top-k pairs that survived
    capacity: Megatron's routing map without the dropped pairs and without the zero-probability
    padding pairs that ``moe_pad_expert_input_to_capacity`` adds, and S sums the top-k before
    dropping, as Megatron's kept probs do.
    """

    def routing(self, logits: torch.Tensor, *args: Any, **kwargs: Any):
        """Megatron's top-k routing; records the dense weights into the current call."""
        call = recording_call()
        active = call is not None and torch.is_grad_enabled() and logits.requires_grad
        recorder = None
        if active and self.config.moe_expert_capacity_factor is not None:
            # Token dropping: record the top-k before dropping (swapped in for this call only).
            recorder = _TopkRecorder(self.router_replay)
            self.router_replay = recorder
        try:
            probs, routing_map = super().routing(logits, *args, **kwargs)
        finally:
            if recorder is not None:
                self.router_replay = recorder.replay
        if not active:
            return probs, routing_map
        selected, topk_map = routing_map, None
        if recorder is not None:
            if recorder.top_indices is None:
                raise RuntimeError(
                    "DenseMixerTopKRouter: Megatron's routing did not go through the unfused "
                    "top-k, so the top-k before token dropping is unknown; unset "
                    "moe_expert_capacity_factor or moe_dense_router_grad."
                )
            topk_map = torch.zeros_like(routing_map).scatter_(1, recorder.top_indices, True)
            selected = routing_map & topk_map
        call.selected = selected
        call.dense_probs = dense_router_probs(
            logits.reshape(-1, self.config.num_moe_experts), selected, self.config, topk_map
        )
        return probs, routing_map
