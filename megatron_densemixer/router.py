"""A TopKRouter that also yields the dense weights of the non-selected experts."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer.config import dense_router_grad_enabled, validate_dense_router_grad

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

    where S = sum_{j in K} s_j (+1e-20 for sigmoid-style scores, as Megatron does) and c is
    ``moe_router_topk_scaling_factor`` (1 when unset). Renormalised means softmax with
    ``moe_router_pre_softmax=False`` or sigmoid/sqrtsoftplus with ``moe_router_topk > 1``.
    With dL/dw_e = G_e = <g, E_e(x)>, this adds dL/ds_j = c G_j / S (or c G_j) for j not in K
    to the conventional gradient, which is exactly the DenseMixer "partscale" gradient.

    Args:
        logits: Router logits, [num_tokens, num_experts].
        routing_map: Selected experts K, bool [num_tokens, num_experts].
        config: The layer's config.

    Returns:
        The dense weights, [num_tokens, num_experts], in fp32 (fp64 for fp64 logits).
    """
    scores = router_scores(logits, config.moe_router_score_function)
    if config.moe_router_score_function == "softmax":
        renormalised, eps = not config.moe_router_pre_softmax, 0.0
    else:
        renormalised, eps = config.moe_router_topk > 1, _RENORM_EPS
    if renormalised:
        selected_sum = (scores * routing_map).sum(dim=-1, keepdim=True) + eps
        scores = scores / selected_sum.detach()
    if config.moe_router_topk_scaling_factor:
        scores = scores * config.moe_router_topk_scaling_factor
    return scores.masked_fill(routing_map, 0.0)


class DenseMixerTopKRouter(TopKRouter):
    """TopKRouter whose routing also records the dense weights of the non-selected experts.

    Its probs and routing_map are the parent's, untouched. When the dense router gradient is
    active (flag on, grad enabled, router trainable), ``routing`` also computes
    ``dense_router_probs`` from the same logits and routing map, which the MoE layer takes
    with ``pop_dense_probs``.
    """

    def __init__(self, config: TransformerConfig, *args: Any, **kwargs: Any) -> None:
        validate_dense_router_grad(config)
        super().__init__(config, *args, **kwargs)
        self._dense_probs: Optional[torch.Tensor] = None

    def dense_router_grad_active(self) -> bool:
        """Whether this call needs the dense router gradient.

        No dense work with the flag off, under no_grad (eval, RL log-prob passes, the first
        pass of activation recompute) or with a frozen router.
        """
        return (
            dense_router_grad_enabled(self.config)
            and torch.is_grad_enabled()
            and self.weight.requires_grad
        )

    def routing(self, logits: torch.Tensor, *args: Any, **kwargs: Any):
        """Megatron's top-k routing, plus the dense weights when active."""
        probs, routing_map = super().routing(logits, *args, **kwargs)
        if self.dense_router_grad_active():
            self._dense_probs = dense_router_probs(
                logits.reshape(-1, self.config.num_moe_experts), routing_map, self.config
            )
        return probs, routing_map

    def peek_dense_probs(self) -> Optional[torch.Tensor]:
        """The dense weights of the last ``routing`` call, left for the layer to take."""
        return self._dense_probs

    def pop_dense_probs(self) -> Optional[torch.Tensor]:
        """Returns the dense weights of the last ``routing`` call once, or None."""
        dense_probs, self._dense_probs = self._dense_probs, None
        return dense_probs
