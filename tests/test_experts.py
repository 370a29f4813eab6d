"""The experts' scores G = <g, E_e(x)> against explicit float64 loops, and expert weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

from megatron_cpu import install_grouped_gemm_fallback
from megatron_cpu.models import build_dense_layer, build_moe_layer, build_pair, make_config, rel_err
from megatron_densemixer import compat, densemixer_spec
from megatron_densemixer.experts import (
    ExpertModule,
    ExpertWeights,
    expert_functions,
    expert_routing_weight_grads,
    local_expert_weights,
)
from tests.support import reference as ref
from tests.support.builders import loop_scores, make_expert_weights, reference_routing, run_layer

T, H, FFN, E = 11, 8, 6, 4


def make_experts(glu: bool, bias: bool, dtype=torch.float64, seed: int = 0):
    return make_expert_weights(E, H, FFN, glu, bias, dtype, seed)


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
    got = expert_routing_weight_grads(x, g, experts, config, chunk_size)
    expected = loop_scores(
        x, g, experts, spec["act"], spec["glu"], spec.get("offset", 0.0), spec.get("clamp")
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-12, atol=1e-12)


def test_fc2_bias_added_once():
    """Under expert TP only one rank adds <g, b2>: add_fc2_bias=False drops exactly that."""
    experts = make_experts(glu=True, bias=True)
    config = SimpleNamespace(gated_linear_unit=True, activation_func=F.silu)
    x, g = torch.randn(T, H, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64)
    with_bias = expert_routing_weight_grads(x, g, experts, config, 4)
    without = expert_routing_weight_grads(x, g, experts, config, 4, add_fc2_bias=False)
    bias_term = torch.stack([g @ w.fc2_bias for w in experts], dim=1)
    torch.testing.assert_close(with_bias.double() - without.double(), bias_term)


def test_raises_for_unsupported_expert_module():
    """A layer whose experts are not SequentialMLP/GroupedMLP/TEGroupedMLP is refused."""

    class CustomExperts(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="does not support expert module CustomExperts"):
        local_expert_weights(CustomExperts())


class LoRAWrapped(torch.nn.Module):
    """A PEFT-style wrapper (Megatron-Bridge's AdapterWrapper shape: ``to_wrap`` + ``adapter``)
    whose output is W x + s B A x: the base weight alone is the wrong expert function."""

    def __init__(self, to_wrap: torch.nn.Module, rank: int = 2, scale: float = 0.5) -> None:
        super().__init__()
        self.to_wrap = to_wrap
        out_features, in_features = to_wrap.weight.shape
        self.lora_a = torch.nn.Parameter(torch.randn(rank, in_features) * 0.3)
        self.lora_b = torch.nn.Parameter(torch.randn(out_features, rank) * 0.3)
        self.scale = scale

    def forward(self, x, *args, **kwargs):
        output, bias = self.to_wrap(x, *args, **kwargs)
        return output + self.scale * (x @ self.lora_a.T) @ self.lora_b.T, bias

    def effective_weight(self) -> torch.Tensor:
        return self.to_wrap.weight + self.scale * self.lora_b @ self.lora_a


def _sequential_experts(config_overrides=None):
    config = make_config(**(config_overrides or {}))
    return build_dense_layer(config, seed=0).experts, config


def _called_scores(module, x, g, num_local) -> torch.Tensor:
    """<g_t, E_e(x_t)> with E_e(x) from calling expert e's own module (float64 products)."""
    if hasattr(module, "local_experts"):
        outputs = [sum(o for o in mlp(x) if o is not None) for mlp in module.local_experts]
    else:
        tokens = torch.full((num_local,), x.shape[0], dtype=torch.long)
        out, bias = module(x.repeat(num_local, 1), tokens, torch.ones(num_local * x.shape[0]))
        out = out if bias is None else out + bias
        outputs = list(out.view(num_local, x.shape[0], -1))
    return torch.stack([(o.double() * g.double()).sum(-1) for o in outputs], dim=1)


def _grouped_experts():
    if compat.GroupedMLP is None:
        pytest.skip("GroupedMLP was removed in megatron-core 0.17")
    install_grouped_gemm_fallback()
    config = make_config(moe_grouped_gemm=True, bf16=True, params_dtype=torch.bfloat16)
    spec = get_moe_module_spec(use_te=False, num_experts=8, moe_grouped_gemm=True)
    torch.manual_seed(0)
    layer = build_moe_layer(config, spec=densemixer_spec(spec))
    assert isinstance(layer.experts, compat.GroupedMLP)
    return layer.experts, config


EXPERT_SETUPS = {
    "sequential_swiglu": lambda: _sequential_experts(),
    "sequential_gelu": lambda: _sequential_experts(
        dict(gated_linear_unit=False, activation_func=F.gelu)
    ),
    "sequential_lora_wrapped": lambda: _wrap_fc1(*_sequential_experts()),
    "grouped_mlp_bf16": _grouped_experts,
}


def _wrap_fc1(experts, config):
    torch.manual_seed(7)
    for mlp in experts.local_experts:
        mlp.linear_fc1 = LoRAWrapped(mlp.linear_fc1)
    return experts, config


@pytest.mark.usefixtures("model_parallel")
@pytest.mark.parametrize("setup", list(EXPERT_SETUPS))
def test_scores_equal_the_module_called_on_the_tokens(setup):
    """For every expert configuration available here, the G the reduction computes equals
    <g, expert_module(x)> computed by calling the module itself on the same tokens.

    Guards the rule that the dense reduction scores the function the forward ran: a wrapper
    around a linear (LoRA) must not be bypassed by reading its base weight. Tolerance: 1e-5
    norm-relative in fp32 (the two sides sum the same products in different orders); 2e-2 in
    bf16 (both run bf16 GEMMs, but in different groupings: unit roundoff 4e-3, a few roundings
    per output).
    """
    experts, config = EXPERT_SETUPS[setup]()
    torch.manual_seed(1)
    x = torch.randn(13, config.hidden_size, dtype=config.params_dtype)
    g = torch.randn(13, config.hidden_size, dtype=config.params_dtype)
    local = expert_functions(experts, config)
    assert isinstance(local, ExpertModule) == (setup == "sequential_lora_wrapped")
    with torch.no_grad():
        scores = expert_routing_weight_grads(x, g, local, config, chunk_size=5)
        expected = _called_scores(experts, x, g, experts.num_local_experts)
    tolerance = 2e-2 if config.params_dtype == torch.bfloat16 else 1e-5
    assert rel_err(scores.double(), expected) < tolerance


@pytest.mark.usefixtures("model_parallel")
def test_wrapped_linear_scores_the_adapted_expert():
    """With LoRA on fc1, G is that of W_eff = W + s B A (independent float64 loop), not of the
    base weight W. Tolerance 1e-5 (fp32 GEMMs against float64)."""
    experts, config = _wrap_fc1(*_sequential_experts())
    torch.manual_seed(2)
    x, g = torch.randn(9, config.hidden_size), torch.randn(9, config.hidden_size)
    effective = [
        ExpertWeights(
            mlp.linear_fc1.effective_weight().detach().double(),
            None,
            mlp.linear_fc2.weight.detach().double(),
            None,
        )
        for mlp in experts.local_experts
    ]
    base = [
        w._replace(fc1_weight=mlp.linear_fc1.to_wrap.weight.detach().double())
        for w, mlp in zip(effective, experts.local_experts, strict=True)
    ]
    expected = loop_scores(x.double(), g.double(), effective, config.activation_func, glu=True)
    wrong = loop_scores(x.double(), g.double(), base, config.activation_func, glu=True)
    with torch.no_grad():
        scores = expert_routing_weight_grads(
            x, g, expert_functions(experts, config), config, chunk_size=4
        )
    assert rel_err(wrong, expected) > 1e-2, "the adapter must change G, or this proves nothing"
    assert rel_err(scores.double(), expected) < 1e-5


@pytest.mark.usefixtures("model_parallel")
def test_layer_with_wrapped_expert_linears_matches_reference():
    """A whole DenseMixerMoELayer whose expert fc1 linears were wrapped after it was built
    (as PEFT does): forward bitwise conventional, router and input gradients equal the float64
    reference of the adapted model, adapters get exactly the conventional gradient.
    Tolerance 1e-5 as in the layer's fp32 reference test."""
    config = make_config()
    dense, conventional = build_pair(config)
    for layer in (dense, conventional):
        _wrap_fc1(layer.experts, config)
    torch.manual_seed(3)
    x, g = torch.randn(6, 2, config.hidden_size), torch.randn(6, 2, config.hidden_size)
    y, dx, grads = run_layer(dense, x, g)
    y_conv, _, grads_conv = run_layer(conventional, x, g)
    assert torch.equal(y, y_conv)
    for name, grad in grads_conv.items():
        if "lora" in name:
            assert torch.equal(grads[name], grad), name

    model = reference_model_of(dense, config)
    routing = reference_routing(dense, config)
    x2d, g2d = x.reshape(-1, config.hidden_size), g.reshape(-1, config.hidden_size)
    expected = ref.reference(model, x2d, g2d, routing, dense=True)
    assert rel_err(grads["router.weight"], expected.d_router_w) < 1e-5
    assert rel_err(dx.reshape(x2d.shape), expected.d_x) < 1e-5


def reference_model_of(layer, config) -> ref.Model:
    """The float64 reference model with each wrapped fc1 replaced by its effective weight."""
    experts = [
        ref.Expert(
            mlp.linear_fc1.effective_weight().detach().double(),
            None,
            mlp.linear_fc2.weight.detach().double(),
            None,
        )
        for mlp in layer.experts.local_experts
    ]
    return ref.Model(
        router_w=layer.router.weight.detach().double(),
        router_b=None,
        experts=experts,
        act=config.activation_func,
        glu=config.gated_linear_unit,
    )
