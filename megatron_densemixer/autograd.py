"""DenseMixer's straight-through router gradient as two autograd Functions, one per graph.

An MoE layer's forward runs ``route`` ... ``postprocess``. G[t, e] = <g_t, E_e(x_t)> needs
g = dL/dy, which exists only in the backward of ``postprocess``; it must reach the router's
dense weights, made in ``route``. Megatron's EP all-to-all overlap schedule
(``fine_grained_callables``) runs those two steps in different schedule nodes whose graphs
are cut apart (each node's outputs are detached) and back-propagated one by one, combine
first. So no autograd edge may join them; instead, one record per forward call carries G:

- ``DenseWeightGradFunction`` sits on the MoE output in ``postprocess`` (the combine node's
  graph): identity forward; its backward computes G from g and leaves the dense weights'
  gradient in the call's record, passing g through unchanged;
- ``DenseRouterGradFunction`` sits on the probs that ``route`` returns (the router's graph):
  identity forward; its backward takes that gradient from the same record and hands it to
  the dense weights, passing the probs' own gradient through unchanged.

The probs feed the dispatch, the experts and the combine, so in a single graph too the
output's backward always runs before the probs' backward. A router-side backward that finds
no gradient in its record raises; it never skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple

import torch


class DenseEstimator(Protocol):
    """Turns g into G for this rank's tokens: the exact ring reduction or the EMA table."""

    def routing_weight_grads(
        self, hidden: torch.Tensor, grad: torch.Tensor, pairs: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """G[t, e] = <g_t, E_e(x_t)> (or its estimate), [num_tokens, num_experts] fp32.

        Args:
            hidden: The MoE input x, [num_tokens, H].
            grad: g = dL/dy, [num_tokens, H].
            pairs: Optional bool [num_tokens, num_experts]: the pairs to compute (others 0).
        """
        ...


@dataclass(eq=False)
class DenseRouterGradCall:
    """One forward call of one DenseMixer MoE layer, from its router to the router's backward.

    Filled in order: the router's ``routing`` (``dense_probs``, ``selected``); the layer's
    ``route`` (``hidden_states``, ``probs``, ``pairs``; it hands ``dense_probs`` to
    ``DenseRouterGradFunction`` and drops it here); the experts' forward hook under the EMA
    estimator (``expert_output_sums``); ``postprocess`` moves the tensors into
    ``DenseWeightGradFunction``'s saved tensors; that Function's backward leaves
    ``grad_dense_probs``, which ``DenseRouterGradFunction``'s backward takes.
    """

    dense_probs: Optional[torch.Tensor] = None
    """The router's dense weights w, [num_tokens, num_experts], differentiable w.r.t. the
    logits (``router.dense_router_probs``); zero on K."""
    selected: Optional[torch.Tensor] = None
    """The selected set K, bool [num_tokens, num_experts] (top-k and kept under dropping)."""
    hidden_states: Optional[torch.Tensor] = None
    """The MoE input x (detached), [s, b, H] or [num_tokens, H]."""
    probs: Optional[torch.Tensor] = None
    """The conventional top-k probs (detached), [num_tokens, num_experts]."""
    pairs: Optional[torch.Tensor] = None
    """The (token, expert) pairs to compute under the opt-in approximations, else None."""
    expert_output_sums: Optional[torch.Tensor] = None
    """EMA estimator: this call's per-expert output sums and token counts, [E, H + 1] fp32."""
    grad_dense_probs: Optional[torch.Tensor] = None
    """dL/dw for the dense weights, [num_tokens, num_experts] fp32: set by
    ``DenseWeightGradFunction``'s backward, taken by ``DenseRouterGradFunction``'s."""

    def take_grad_dense_probs(self) -> torch.Tensor:
        """Returns and clears ``grad_dense_probs``.

        Raises:
            RuntimeError: the MoE output's backward of this same call has not run.
        """
        grad, self.grad_dense_probs = self.grad_dense_probs, None
        if grad is None:
            raise RuntimeError(
                "moe_dense_router_grad: the router's backward ran before the MoE output's "
                "backward of the same forward call, so DenseMixer's gradient for it is missing. "
                "A schedule must back-propagate an MoE layer's postprocess before its route."
            )
        return grad


@dataclass(eq=False)
class DenseBackwardInputs:
    """What ``DenseWeightGradFunction``'s backward needs besides g."""

    hidden_states: torch.Tensor
    """The MoE input x, [s, b, H] (or [num_tokens, H])."""
    probs: torch.Tensor
    """The conventional top-k probs, [num_tokens, num_experts]."""
    selected: torch.Tensor
    """The selected set K, bool [num_tokens, num_experts]."""
    estimator: DenseEstimator
    """Computes G: the exact reduction over this rank's experts, or the EMA table."""
    variant: str = "partscale"
    """``moe_dense_router_grad_variant``: "partscale" or "gated"."""
    topk_scaling_factor: Optional[float] = None
    """``moe_router_topk_scaling_factor`` c (None: 1)."""
    token_fraction: float = 1.0
    """The fraction f of tokens ``pairs`` samples; their gradients are scaled by 1/f."""
    pairs: Optional[torch.Tensor] = None
    """Optional bool [num_tokens, num_experts]: the (token, expert) pairs to compute."""


class DenseWeightGradFunction(torch.autograd.Function):
    """Identity on the MoE output; its backward computes DenseMixer's gradient for the dense
    weights and leaves it in the call's record.

    Backward, with g = dL/dy and G[t, e] = <g_t, E_e(x_t)> for every expert e:

        dL/dy         = g                                   (to the conventional path)
        dL/dw_dense_e = G_e                                 e not in K   ("partscale")
        dL/dw_dense_e = G_e - sum_{j in K} (w_j / c) G_j    e not in K   ("gated")
        dL/dw_dense_e = 0                                   e in K (the probs carry those)

    where w are the conventional top-k probs, K the selected set and c the top-k scaling
    factor. With the opt-in approximations, G is computed only on ``pairs`` (the top-M experts
    by score) and on a random fraction f of the tokens, whose gradients are scaled by 1/f so
    their sum over tokens stays unbiased. Nothing flows into the experts' weights or into x
    from here, so they keep exactly their conventional gradients. Source: Yao et al., 2025
    (DenseMixer), the "partscale" straight-through estimator.
    """

    @staticmethod
    def forward(
        ctx, output: torch.Tensor, inputs: DenseBackwardInputs, call: DenseRouterGradCall
    ) -> torch.Tensor:
        ctx.save_for_backward(inputs.hidden_states, inputs.probs, inputs.selected, inputs.pairs)
        ctx.estimator = inputs.estimator
        ctx.variant = inputs.variant
        ctx.topk_scaling_factor = inputs.topk_scaling_factor
        ctx.token_fraction = inputs.token_fraction
        ctx.call = call
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        hidden_states, probs, selected, pairs = ctx.saved_tensors
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        grad = grad_output.reshape(hidden.shape)
        with torch.no_grad():
            weight_grads = ctx.estimator.routing_weight_grads(hidden, grad, pairs)  # G
            if ctx.variant == "gated":
                scale = ctx.topk_scaling_factor or 1.0
                baseline = (probs.float() * weight_grads).sum(dim=-1, keepdim=True) / scale
                weight_grads = weight_grads - baseline
            grad_dense = weight_grads.masked_fill(selected, 0.0)
            if ctx.token_fraction < 1.0:
                grad_dense /= ctx.token_fraction
        ctx.call.grad_dense_probs = grad_dense
        return (
            grad_output,  # output
            None,  # inputs
            None,  # call
        )


class DenseRouterGradFunction(torch.autograd.Function):
    """Identity on the probs ``route`` returns; its backward gives the router's dense weights
    the gradient that ``DenseWeightGradFunction`` left in the same call's record.

    Backward: dL/dprobs passes through unchanged (the conventional gradient of the selected
    experts); dL/d(dense_probs) = the record's ``grad_dense_probs``, which autograd carries on
    through ``dense_router_probs`` to the logits and the router's parameters.
    """

    @staticmethod
    def forward(
        ctx, probs: torch.Tensor, dense_probs: torch.Tensor, call: DenseRouterGradCall
    ) -> torch.Tensor:
        ctx.call = call
        ctx.dense_dtype = dense_probs.dtype
        return probs

    @staticmethod
    def backward(
        ctx, grad_probs: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], None]:
        grad_dense = ctx.call.take_grad_dense_probs()
        return (
            grad_probs,  # probs
            grad_dense.to(ctx.dense_dtype) if ctx.needs_input_grad[1] else None,  # dense_probs
            None,  # call
        )


def dense_weight_grad(
    output: torch.Tensor, inputs: DenseBackwardInputs, call: DenseRouterGradCall
) -> torch.Tensor:
    """Attaches the dense weights' gradient computation to the MoE output.

    Args:
        output: The conventional MoE output, [s, b, H]; returned unchanged.
        inputs: What the backward needs (x, probs, K, the estimator, options).
        call: The forward call's record; the backward leaves ``grad_dense_probs`` in it.

    Returns:
        ``output``, with ``DenseWeightGradFunction``'s backward attached.
    """
    return DenseWeightGradFunction.apply(output, inputs, call)


def dense_router_grad(
    probs: torch.Tensor, dense_probs: torch.Tensor, call: DenseRouterGradCall
) -> torch.Tensor:
    """Attaches DenseMixer's router gradient to the probs the route step returns.

    Args:
        probs: The conventional top-k probs, [num_tokens, num_experts]; returned unchanged.
        dense_probs: The dense weights of the non-selected experts, [num_tokens,
            num_experts] (``router.dense_router_probs``); receive the record's gradient.
        call: The forward call's record, shared with ``dense_weight_grad``.

    Returns:
        ``probs``, with ``DenseRouterGradFunction``'s backward attached.
    """
    return DenseRouterGradFunction.apply(probs, dense_probs, call)
