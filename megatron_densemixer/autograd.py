"""DenseRouterGradFunction: DenseMixer's straight-through gradient, applied in the backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_densemixer.ema import ema_scores
from megatron_densemixer.experts import LocalExperts
from megatron_densemixer.reduction import DenseReduction


@dataclass
class DenseBackwardInputs:
    """Everything the dense backward needs besides g, recorded by the layer's forward.

    Tensors are saved with ``ctx.save_for_backward``; the rest are static for the call.
    """

    hidden_states: torch.Tensor
    """The MoE input x, [s, b, H] (or [num_tokens, H])."""
    probs: torch.Tensor
    """The conventional top-k probs, [num_tokens, num_experts]."""
    routing_map: torch.Tensor
    """The selected set K, bool [num_tokens, num_experts]."""
    experts: LocalExperts
    """This rank's local experts: views of their weights, or the module to run."""
    reduction: DenseReduction
    """How to compute G on this rank (parallel layout and chunk size)."""
    variant: str = "partscale"
    """``moe_dense_router_grad_variant``: "partscale" or "gated"."""
    token_fraction: float = 1.0
    """The fraction f of tokens ``pairs`` samples; their gradients are scaled by 1/f."""
    pairs: Optional[torch.Tensor] = None
    """Optional bool [num_tokens, num_experts]: the (token, expert) pairs to score."""
    ema_table: Optional[torch.Tensor] = None
    """The EMA estimator's A, [num_experts, H] fp32 (``megatron_densemixer.ema``); when set,
    G[t, e] = <g_t, A_e> replaces the expert recompute."""


class DenseRouterGradFunction(torch.autograd.Function):
    """Identity on the MoE output; in the backward, DenseMixer's gradient for the dense weights.

    Forward: y -> y (bitwise; the conventional output is the forward value).

    Backward, with g = dL/dy and G[t, e] = <g_t, E_e(x_t)> for every expert e:

        dL/dy         = g                          (passed through to the conventional path)
        dL/dw_dense_e = G_e                        for e not in K   ("partscale")
        dL/dw_dense_e = G_e - sum_{j in K} (w_j / c) G_j   for e not in K   ("gated")
        dL/dw_dense_e = 0                          for e in K (the conventional probs carry it)

    where w are the conventional top-k probs, K the selected set and c the top-k scaling
    factor. With the opt-in approximations, G is computed only on ``pairs`` (the top-M experts
    by score) and on a random fraction f of the tokens, whose gradients are scaled by 1/f so
    their sum over tokens stays unbiased. The experts' weights and the path from x through the
    experts receive nothing here, so they keep exactly their conventional gradients.
    """

    @staticmethod
    def forward(
        ctx,
        output: torch.Tensor,
        dense_probs: torch.Tensor,
        inputs: DenseBackwardInputs,
    ) -> torch.Tensor:
        ctx.save_for_backward(
            inputs.hidden_states.detach(),
            inputs.probs.detach(),
            inputs.routing_map,
            inputs.pairs,
            inputs.ema_table,
        )
        ctx.experts = inputs.experts
        ctx.reduction = inputs.reduction
        ctx.variant = inputs.variant
        ctx.token_fraction = inputs.token_fraction
        return output

    @staticmethod
    def backward(
        ctx, grad_output: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], None]:
        hidden_states, probs, routing_map, pairs, ema_table = ctx.saved_tensors
        grad_dense = None
        if ctx.needs_input_grad[1]:
            hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
            grad = grad_output.reshape(hidden.shape)
            with torch.no_grad():
                if ema_table is not None:
                    scores = ema_scores(grad, ema_table)
                else:
                    scores = ctx.reduction.scores(hidden, grad, ctx.experts, pairs)
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
            None,  # inputs
        )


def dense_router_grad(
    output: torch.Tensor, dense_probs: torch.Tensor, inputs: DenseBackwardInputs
) -> torch.Tensor:
    """Attaches DenseMixer's router gradient to the MoE output; see DenseRouterGradFunction.

    Args:
        output: The conventional MoE output, [s, b, H]; returned unchanged.
        dense_probs: Dense weights of the non-selected experts, [num_tokens, num_experts]
            (``megatron_densemixer.router.dense_router_probs``); receives G.
        inputs: What the backward needs (x, probs, routing map, experts, reduction, options).

    Returns:
        ``output``, with the straight-through backward attached.
    """
    return DenseRouterGradFunction.apply(output, dense_probs, inputs)
