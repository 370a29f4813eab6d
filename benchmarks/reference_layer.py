"""The reference DenseMixer layer, written from the math: every expert on every token."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from megatron_densemixer.autograd import DenseRouterGradCall
from megatron_densemixer.router import recording_dense_router_grad


def _mask_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad * mask


class ReferenceDenseMoE(torch.nn.Module):
    """The reference DenseMixer layer: all experts on all tokens, masked expert gradients.

    For tokens x [T, H], the router's conventional top-k probs p [T, E] (zero off K) and its
    dense weights of the non-selected experts d [T, E] (zero on K, docs/design.md, "The math"):

        out_e  = E_e(x)                       for every expert e, on every token
        sparse = sum_e p_e * out_e            (the conventional forward value)
        dense  = sum_e (p_e + d_e) * out_e
        y      = sparse.detach() + (dense - dense.detach())

    and dL/d(out_e) is multiplied by m_e = 1[e in K] (a tensor hook), so each expert's
    weights and x receive only their selected tokens' gradient, while the router receives
    <g, out_e> for every expert. Cost: E expert forwards and 2E expert backwards per token.

    Reuses the layer's DenseMixerTopKRouter (for p and d) and the SequentialMLP experts'
    weights; the experts run as plain F.linear calls on all tokens, one GEMM per projection.
    """

    def __init__(self, layer: Any) -> None:
        """Wraps ``layer``, a DenseMixerMoELayer with SequentialMLP experts.

        Args:
            layer: The layer whose router and expert weights the reference uses.
        """
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The reference forward; its backward is autograd's.

        Args:
            hidden_states: The MoE input, [s, b, H].

        Returns:
            (y [s, b, H], None), like MoELayer.
        """
        layer = self.layer
        call = DenseRouterGradCall()
        with recording_dense_router_grad(call):
            probs, routing_map = layer.router(hidden_states)  # [T, E] each
        dense_probs = call.dense_probs  # [T, E], zero on K
        weights = probs + dense_probs  # the DenseMixer weights of every expert
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        mask = routing_map.to(x.dtype)
        sparse = torch.zeros_like(x)
        dense = torch.zeros_like(x)
        for e, mlp in enumerate(layer.experts.local_experts):
            fc1 = F.linear(x, mlp.linear_fc1.weight)  # [T, 2F]
            gate, linear = torch.chunk(fc1, 2, dim=-1)
            out = F.linear(F.silu(gate) * linear, mlp.linear_fc2.weight)  # [T, H]
            out.register_hook(functools.partial(_mask_grad, mask=mask[:, e : e + 1]))
            with torch.no_grad():
                sparse.addcmul_(out, probs[:, e : e + 1])
            dense = dense + out * weights[:, e : e + 1]
        y = sparse + (dense - dense.detach())
        return y.view_as(hidden_states), None
