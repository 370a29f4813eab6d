"""The two dense-gradient Functions against explicit float64 loops, forward and backward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_densemixer.autograd import (
    DenseBackwardInputs,
    DenseRouterGradCall,
    dense_router_grad,
    dense_weight_grad,
)
from megatron_densemixer.ring import ExactEstimator, TokenRing
from tests.support.builders import loop_scores, make_expert_weights

T, H, FFN, E = 11, 8, 6, 4


def _function_inputs(variant_scale: float = 1.0):
    experts = make_expert_weights(E, H, FFN, glu=True, bias=False, dtype=torch.float32)
    config = SimpleNamespace(
        gated_linear_unit=True,
        activation_func=F.silu,
        moe_router_topk_scaling_factor=variant_scale if variant_scale != 1.0 else None,
    )
    ring = TokenRing(config=config, chunk_size=5)
    hidden = torch.randn(T, 1, H)
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    routing_map[torch.arange(T), torch.randint(0, E, (T,))] = True
    probs = torch.rand(T, E) * routing_map * variant_scale
    return experts, ring, hidden, routing_map, probs


def _dense_grad_through_both(output, probs, dense_probs, g, **fields):
    """Runs route's and postprocess's Functions in one graph (probs feed the output, as the
    dispatch and experts make them do) and back-propagates g; returns the MoE output y."""
    call = DenseRouterGradCall()
    probs_in = probs.clone().requires_grad_()
    routed = dense_router_grad(probs_in, dense_probs, call)
    output = output + 0.0 * routed.sum()  # the data dependency probs -> output
    y = dense_weight_grad(output, DenseBackwardInputs(probs=probs, **fields), call)
    y.backward(g)
    assert call.grad_dense_probs is None  # taken by the router side
    return y


def test_function_is_identity_forward_and_passes_g_through():
    """Forward value is the input itself (bitwise); backward hands g to the output unchanged
    and G (masked to the non-selected experts) to the dense weights."""
    experts, ring, hidden, routing_map, probs = _function_inputs()
    output = torch.randn(T, 1, H, requires_grad=True)
    dense_probs = torch.rand(T, E, requires_grad=True)
    g = torch.randn(T, 1, H)
    y = _dense_grad_through_both(
        output,
        probs,
        dense_probs,
        g,
        hidden_states=hidden,
        selected=routing_map,
        estimator=ExactEstimator(ring, experts),
    )
    assert torch.equal(y, output)
    assert torch.equal(output.grad, g)
    G = loop_scores(hidden[:, 0], g[:, 0], experts, F.silu, True)
    expected = torch.where(routing_map, torch.zeros_like(G), G)
    torch.testing.assert_close(dense_probs.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_gated_variant_subtracts_the_selected_baseline():
    """gated: dL/dw_e = G_e - sum_{j in K} (w_j / c) G_j for e not in K (c = scaling)."""
    scale = 2.0
    experts, ring, hidden, routing_map, probs = _function_inputs(scale)
    output = torch.randn(T, 1, H, requires_grad=True)
    dense_probs = torch.rand(T, E, requires_grad=True)
    g = torch.randn(T, 1, H)
    _dense_grad_through_both(
        output,
        probs,
        dense_probs,
        g,
        hidden_states=hidden,
        selected=routing_map,
        estimator=ExactEstimator(ring, experts),
        variant="gated",
        topk_scaling_factor=scale,
    )
    G = loop_scores(hidden[:, 0], g[:, 0], experts, F.silu, True)
    baseline = (probs.double() / scale * G).sum(-1, keepdim=True)
    expected = torch.where(routing_map, torch.zeros_like(G), G - baseline)
    torch.testing.assert_close(dense_probs.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_token_fraction_scales_sampled_tokens():
    """Sampled tokens' dense grads are G / f; unsampled tokens get none."""
    experts, ring, hidden, routing_map, probs = _function_inputs()
    output = torch.randn(T, 1, H, requires_grad=True)
    dense_probs = torch.rand(T, E, requires_grad=True)
    keep = torch.arange(T) % 2 == 0
    pairs = keep.unsqueeze(1).expand(T, E).clone()
    g = torch.randn(T, 1, H)
    _dense_grad_through_both(
        output,
        probs,
        dense_probs,
        g,
        hidden_states=hidden,
        selected=routing_map,
        estimator=ExactEstimator(ring, experts),
        variant="partscale",
        token_fraction=0.5,
        pairs=pairs,
    )
    G = loop_scores(hidden[:, 0], g[:, 0], experts, F.silu, True) / 0.5
    expected = torch.where(routing_map | ~pairs, torch.zeros_like(G), G)
    torch.testing.assert_close(dense_probs.grad.double(), expected, rtol=1e-5, atol=1e-5)


def _separate_graphs(experts, ring, hidden, routing_map, probs):
    """Route's and postprocess's Functions in two graphs cut apart by a detach, as Megatron's
    EP overlap schedule cuts its nodes; returns (routed probs, dense_probs, y, output leaf)."""
    call = DenseRouterGradCall()
    dense_probs = torch.rand(T, E, requires_grad=True)
    routed = dense_router_grad(probs.clone().requires_grad_(), dense_probs, call)
    cut = routed.detach().requires_grad_()
    output = torch.randn(T, 1, H, requires_grad=True)
    inputs = DenseBackwardInputs(
        hidden_states=hidden,
        probs=probs,
        selected=routing_map,
        estimator=ExactEstimator(ring, experts),
    )
    y = dense_weight_grad(output + 0.0 * cut.sum(), inputs, call)
    return routed, cut, dense_probs, y


def test_separate_graphs_in_reverse_order_and_interleaved_calls():
    """Two forward calls (micro-batches) whose route and postprocess graphs are cut apart and
    back-propagated node by node, the second call's first, each output's backward before its
    route's: each router side gets the G of its own call (guards against G handed over
    through layer-wide state, which the EP overlap schedule would mix up)."""
    experts, ring, hidden, routing_map, probs = _function_inputs()
    calls = [_separate_graphs(experts, ring, hidden, routing_map, probs) for _ in range(2)]
    g = [torch.randn(T, 1, H), torch.randn(T, 1, H)]
    for i in (1, 0):
        routed, cut, dense_probs, y = calls[i]
        y.backward(g[i])  # the combine node's backward
        routed.backward(cut.grad)  # the attention node's backward, later
    for i in (0, 1):
        G = loop_scores(hidden[:, 0], g[i][:, 0], experts, F.silu, True)
        expected = torch.where(routing_map, torch.zeros_like(G), G)
        torch.testing.assert_close(calls[i][2].grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_router_side_without_its_output_backward_raises():
    """A schedule that back-propagates route before postprocess (or a router side whose
    call's output never got its backward) raises instead of silently skipping the dense
    gradient."""
    experts, ring, hidden, routing_map, probs = _function_inputs()
    routed, cut, dense_probs, y = _separate_graphs(experts, ring, hidden, routing_map, probs)
    with pytest.raises(RuntimeError, match="router's backward ran before the MoE output's"):
        routed.backward(torch.ones_like(routed))
