"""The dense reduction and DenseRouterGradFunction against explicit float64 loops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_densemixer.autograd import (
    DenseReduction,
    ExpertWeights,
    dense_router_grad,
    expert_output_scores,
)

T, H, FFN, E = 11, 8, 6, 4


def make_experts(glu: bool, bias: bool, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f1 = 2 * FFN if glu else FFN

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return [
        ExpertWeights(
            rand(f1, H), rand(f1) if bias else None, rand(H, FFN), rand(H) if bias else None
        )
        for _ in range(E)
    ]


def loop_scores(x, g, experts, act, glu, offset=0.0, clamp=None):
    """G[t, e] = sum_h g[t, h] * E_e(x_t)[h], one token and one expert at a time."""
    G = torch.zeros(x.shape[0], len(experts), dtype=torch.float64)
    for e, w in enumerate(experts):
        for t in range(x.shape[0]):
            a = w.fc1_weight.double() @ x[t].double()
            if w.fc1_bias is not None:
                a = a + w.fc1_bias.double()
            if glu:
                a_glu, a_lin = a[:FFN], a[FFN:]
                if clamp is not None:
                    a_glu, a_lin = a_glu.clamp(max=clamp), a_lin.clamp(-clamp, clamp)
                h = act(a_glu) * (a_lin + offset)
            else:
                h = act(a)
            out = w.fc2_weight.double() @ h
            if w.fc2_bias is not None:
                out = out + w.fc2_bias.double()
            G[t, e] = (g[t].double() * out).sum()
    return G


CASES = {
    "swiglu": dict(glu=True, bias=False, act=F.silu),
    "swiglu_bias": dict(glu=True, bias=True, act=F.silu),
    "gelu_bias": dict(glu=False, bias=True, act=F.gelu),
    "squared_relu": dict(glu=False, bias=False, act=lambda v: F.relu(v) ** 2),
    "glu_offset_clamp": dict(glu=True, bias=True, act=F.silu, offset=1.0, clamp=0.7),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_expert_output_scores(case, chunk_size):
    """G = <g, E_e(x)> for gated/non-gated units, biases, GLU offset and clamp, any chunking.

    float64 throughout, so the only error is summation order: 1e-12.
    """
    spec = CASES[case]
    experts = make_experts(spec["glu"], spec["bias"])
    config = SimpleNamespace(
        gated_linear_unit=spec["glu"],
        activation_func=spec["act"],
        glu_linear_offset=spec.get("offset", 0.0),
        activation_func_clamp_value=spec.get("clamp"),
    )
    x = torch.randn(T, H, dtype=torch.float64)
    g = torch.randn(T, H, dtype=torch.float64)
    got = expert_output_scores(x, g, experts, config, chunk_size)
    expected = loop_scores(
        x, g, experts, spec["act"], spec["glu"], spec.get("offset", 0.0), spec.get("clamp")
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-12, atol=1e-12)


def test_fc2_bias_added_once():
    """Under expert TP only one rank adds <g, b2>: add_fc2_bias=False drops exactly that."""
    experts = make_experts(glu=True, bias=True)
    config = SimpleNamespace(gated_linear_unit=True, activation_func=F.silu)
    x, g = torch.randn(T, H, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64)
    with_bias = expert_output_scores(x, g, experts, config, 4)
    without = expert_output_scores(x, g, experts, config, 4, add_fc2_bias=False)
    bias_term = torch.stack([g @ w.fc2_bias for w in experts], dim=1)
    torch.testing.assert_close(with_bias.double() - without.double(), bias_term)


def test_pairs_restrict_the_work():
    """With pairs, G is computed exactly on those (token, expert) pairs and 0 elsewhere."""
    experts = make_experts(glu=True, bias=False)
    config = SimpleNamespace(gated_linear_unit=True, activation_func=F.silu)
    x, g = torch.randn(T, H, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64)
    pairs = torch.rand(T, E) < 0.4
    full = expert_output_scores(x, g, experts, config, 3)
    part = expert_output_scores(x, g, experts, config, 3, pairs=pairs)
    torch.testing.assert_close(part, torch.where(pairs, full, torch.zeros_like(full)))


def _function_inputs(variant_scale: float = 1.0):
    experts = make_experts(glu=True, bias=False, dtype=torch.float32)
    config = SimpleNamespace(
        gated_linear_unit=True,
        activation_func=F.silu,
        moe_router_topk_scaling_factor=variant_scale if variant_scale != 1.0 else None,
    )
    reduction = DenseReduction(config=config, local_experts=lambda: experts, chunk_size=5)
    hidden = torch.randn(T, 1, H)
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    routing_map[torch.arange(T), torch.randint(0, E, (T,))] = True
    probs = torch.rand(T, E) * routing_map * variant_scale
    return experts, config, reduction, hidden, routing_map, probs


def test_function_is_identity_forward_and_passes_g_through():
    """Forward value is the input itself (bitwise); backward hands g to the output unchanged
    and G (masked to the non-selected experts) to the dense weights."""
    experts, config, reduction, hidden, routing_map, probs = _function_inputs()
    output = torch.randn(T, 1, H, requires_grad=True)
    dense_probs = torch.rand(T, E, requires_grad=True)
    y = dense_router_grad(output, dense_probs, hidden, probs, routing_map, reduction)
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
    experts, config, reduction, hidden, routing_map, probs = _function_inputs(scale)
    output = torch.randn(T, 1, H, requires_grad=True)
    dense_probs = torch.rand(T, E, requires_grad=True)
    g = torch.randn(T, 1, H)
    y = dense_router_grad(output, dense_probs, hidden, probs, routing_map, reduction, "gated")
    y.backward(g)
    G = loop_scores(hidden[:, 0], g[:, 0], experts, F.silu, True)
    baseline = (probs.double() / scale * G).sum(-1, keepdim=True)
    expected = torch.where(routing_map, torch.zeros_like(G), G - baseline)
    torch.testing.assert_close(dense_probs.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_token_fraction_scales_sampled_tokens():
    """Sampled tokens' dense grads are G / f; unsampled tokens get none."""
    experts, config, reduction, hidden, routing_map, probs = _function_inputs()
    output = torch.randn(T, 1, H, requires_grad=True)
    dense_probs = torch.rand(T, E, requires_grad=True)
    keep = torch.arange(T) % 2 == 0
    pairs = keep.unsqueeze(1).expand(T, E).clone()
    g = torch.randn(T, 1, H)
    y = dense_router_grad(
        output, dense_probs, hidden, probs, routing_map, reduction, "partscale", pairs, 0.5
    )
    y.backward(g)
    G = loop_scores(hidden[:, 0], g[:, 0], experts, F.silu, True) / 0.5
    expected = torch.where(routing_map | ~pairs, torch.zeros_like(G), G)
    torch.testing.assert_close(dense_probs.grad.double(), expected, rtol=1e-5, atol=1e-5)
