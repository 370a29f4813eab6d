"""A TopKRouter that also yields the dense weights of the non-selected experts."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer.options import (
    dense_router_grad_enabled,
    renormalises_topk,
    validate_dense_router_grad,
)

# Megatron adds this to the denominator of sigmoid-style renormalisation.
_RENORM_EPS = 1e-20


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
    logits: torch.Tensor, routing_map: torch.Tensor, config: TransformerConfig
) -> torch.Tensor:
    """Dense routing weights of the non-selected experts, differentiable w.r.t. the logits.

    For a token with scores s (see ``router_scores``) and selected set K:

        w_e = c * s_e / stopgrad(S)   for e not in K, when the top-k weights are renormalised
        w_e = c * s_e                 for e not in K, otherwise
        w_e = 0                       for e in K (the conventional probs carry those)
        w_e = 0                       for every e when K is empty

    where S = sum_{j in K} s_j (+1e-20 for sigmoid-style scores, as Megatron does) and c is
    ``moe_router_topk_scaling_factor`` (1 when unset). Renormalised means softmax with
    ``moe_router_pre_softmax=False`` or sigmoid/sqrtsoftplus with ``moe_router_topk > 1``.
    With dL/dw_e = G_e = <g, E_e(x)>, this adds dL/ds_j = c G_j / S (or c G_j) for j not in K
    to the conventional gradient, which is exactly the DenseMixer "partscale" gradient. A
    token routed to no expert (padding exclusion, dropping) has no conventional output and
    contributes nothing to the dense term either; S is never divided by when it is empty.

    Args:
        logits: Router logits, [num_tokens, num_experts].
        routing_map: Selected experts K, bool [num_tokens, num_experts].
        config: The layer's config.

    Returns:
        The dense weights, [num_tokens, num_experts], in fp32 (fp64 for fp64 logits).
    """
    scores = router_scores(logits, config.moe_router_score_function)
    routed = routing_map.any(dim=-1, keepdim=True)  # [num_tokens, 1]
    if renormalises_topk(config):
        eps = 0.0 if config.moe_router_score_function == "softmax" else _RENORM_EPS
        selected_sum = (scores * routing_map).sum(dim=-1, keepdim=True) + eps
        # An unrouted row's S is 0 (or eps): divide by 1 there, its weights are zeroed below.
        selected_sum = torch.where(routed, selected_sum, torch.ones_like(selected_sum))
        scores = scores / selected_sum.detach()
    if config.moe_router_topk_scaling_factor:
        scores = scores * config.moe_router_topk_scaling_factor
    return scores.masked_fill(routing_map | ~routed, 0.0)


class DenseMixerTopKRouter(TopKRouter):
    """TopKRouter whose routing also records the dense weights of the non-selected experts.

    Its probs and routing_map are the parent's, untouched. When the dense router gradient is
    active (flag on, grad enabled, some router parameter trainable), ``routing`` also computes
    ``dense_router_probs`` from the same logits and routing map and leaves them in
    ``dense_probs`` for the MoE layer, which takes them (and resets the attribute) in its
    ``route`` step.
    """

    dense_probs: Optional[torch.Tensor]
    """The dense weights of the last active ``routing`` call, [num_tokens, num_experts];
    None once the layer has taken them, or when the dense gradient is inactive."""

    def __init__(self, config: TransformerConfig, *args: Any, **kwargs: Any) -> None:
        validate_dense_router_grad(config)
        super().__init__(config, *args, **kwargs)
        self.dense_probs = None

    def dense_router_grad_active(self) -> bool:
        """Whether this call needs the dense router gradient.

        No dense work with the flag off, under no_grad (eval, RL log-prob passes, the first
        pass of activation recompute) or when no router parameter is trainable. Any trainable
        one (weight, bias, an adapter registered under the router) turns it on, since each
        receives the gradient of the logits.
        """
        return (
            dense_router_grad_enabled(self.config)
            and torch.is_grad_enabled()
            and any(p.requires_grad for p in self.parameters())
        )

    def routing(self, logits: torch.Tensor, *args: Any, **kwargs: Any):
        """Megatron's top-k routing, plus the dense weights when active."""
        probs, routing_map = super().routing(logits, *args, **kwargs)
        self.dense_probs = None
        if self.dense_router_grad_active():
            self.dense_probs = dense_router_probs(
                logits.reshape(-1, self.config.num_moe_experts), routing_map, self.config
            )
        return probs, routing_map
