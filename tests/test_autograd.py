"""DenseRouterGradFunction against explicit float64 loops, forward and backward."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from megatron_densemixer.autograd import DenseBackwardInputs, dense_router_grad
from megatron_densemixer.reduction import DenseReduction
from tests.support.builders import loop_scores, make_expert_weights

T, H, FFN, E = 11, 8, 6, 4


def _function_inputs(variant_scale: float = 1.0):
    experts = make_expert_weights(E, H, FFN, glu=True, bias=False, dtype=torch.float32)
    config = SimpleNamespace(
        gated_linear_unit=True,
        activation_func=F.silu,
        moe_router_topk_scaling_factor=variant_scale if variant_scale != 1.0 else None,
    )
    reduction = DenseReduction(config=config, chunk_size=5)
    hidden = torch.randn(T, 1, H)
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    routing_map[torch.arange(T), torch.randint(0, E, (T,))] = True
    probs = torch.rand(T, E) * routing_map * variant_scale
    return experts, reduction, hidden, routing_map, probs


def test_function_is_identity_forward_and_passes_g_through():
    """Forward value is the input itself (bitwise); backward hands g to the output unchanged
    and G (masked to the non-selected experts) to the dense weights."""
    experts, reduction, hidden, routing_map, probs = _function_inputs()
    output = torch.randn(T, 1, H, requires_grad=True)
    dense_probs = torch.rand(T, E, requires_grad=True)
    inputs = DenseBackwardInputs(
        hidden_states=hidden,
        probs=probs,
        routing_map=routing_map,
        experts=experts,
        reduction=reduction,
    )
    y = dense_router_grad(output, dense_probs, inputs)
    assert torch.equal(y, output)
    g = torch.randn(T, 1, H)
    y.backward(g)
    assert torch.equal(output.grad, g)
    G = loop_scores(hidden[:, 0], g[:, 0], experts, F.silu, True)
    expected = torch.where(routing_map, torch.zeros_like(G), G)
    torch.testing.assert_close(dense_probs.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_gated_variant_subtracts_the_selected_baseline():
    """gated: dL/dw_e = G_e - sum_{j in K} (w_j / c) G_j for e not in K (c = scaling)."""
    scale = 2.0
    experts, reduction, hidden, routing_map, probs = _function_inputs(scale)
    output = torch.randn(T, 1, H, requires_grad=True)
    dense_probs = torch.rand(T, E, requires_grad=True)
    g = torch.randn(T, 1, H)
    inputs = DenseBackwardInputs(
        hidden_states=hidden,
        probs=probs,
        routing_map=routing_map,
        experts=experts,
        reduction=reduction,
        variant="gated",
    )
    y = dense_router_grad(output, dense_probs, inputs)
    y.backward(g)
    G = loop_scores(hidden[:, 0], g[:, 0], experts, F.silu, True)
    baseline = (probs.double() / scale * G).sum(-1, keepdim=True)
    expected = torch.where(routing_map, torch.zeros_like(G), G - baseline)
    torch.testing.assert_close(dense_probs.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_token_fraction_scales_sampled_tokens():
    """Sampled tokens' dense grads are G / f; unsampled tokens get none."""
    experts, reduction, hidden, routing_map, probs = _function_inputs()
    output = torch.randn(T, 1, H, requires_grad=True)
    dense_probs = torch.rand(T, E, requires_grad=True)
    keep = torch.arange(T) % 2 == 0
    pairs = keep.unsqueeze(1).expand(T, E).clone()
    g = torch.randn(T, 1, H)
    inputs = DenseBackwardInputs(
        hidden_states=hidden,
        probs=probs,
        routing_map=routing_map,
        experts=experts,
        reduction=reduction,
        variant="partscale",
        token_fraction=0.5,
        pairs=pairs,
    )
    y = dense_router_grad(output, dense_probs, inputs)
    y.backward(g)
    G = loop_scores(hidden[:, 0], g[:, 0], experts, F.silu, True) / 0.5
    expected = torch.where(routing_map | ~pairs, torch.zeros_like(G), G)
    torch.testing.assert_close(dense_probs.grad.double(), expected, rtol=1e-5, atol=1e-5)
