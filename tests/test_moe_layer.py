"""DenseMixerMoELayer against Megatron's MoELayer and the float64 reference of DESIGN §2."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_densemixer import DenseMixerMoELayer, DenseMixerTransformerConfig, densemixer_spec
from megatron_densemixer import autograd as dm_autograd
from tests import reference as ref
from tests.megatron_cpu import build_moe_layer, init_model_parallel

SEQ, BATCH = 6, 2


@pytest.fixture(scope="module", autouse=True)
def _model_parallel():
    init_model_parallel(tp=1, ep=1)


def make_config(**overrides) -> DenseMixerTransformerConfig:
    fields = dict(
        num_layers=1,
        hidden_size=16,
        ffn_hidden_size=24,
        moe_ffn_hidden_size=24,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        use_cpu_initialization=True,
        moe_dense_router_grad=True,
    )
    fields.update(overrides)
    return DenseMixerTransformerConfig(**fields)


def build_pair(config: DenseMixerTransformerConfig, seed: int = 0):
    """A DenseMixerMoELayer and a conventional MoELayer holding the same weights."""
    torch.manual_seed(seed)
    dense = build_moe_layer(config, spec=densemixer_spec(_local_moe_spec(config)))
    conventional = build_moe_layer(dataclasses.replace(config, moe_dense_router_grad=False))
    if dense.router.expert_bias is not None:
        with torch.no_grad():
            dense.router.expert_bias.copy_(torch.randn(config.num_moe_experts) * 0.05)
    # strict: the plugin keeps every parameter and buffer name of MoELayer.
    conventional.load_state_dict(dense.state_dict(), strict=True)
    assert type(dense) is DenseMixerMoELayer and type(conventional) is MoELayer
    return dense, conventional


def _local_moe_spec(config):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    return get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)


def run_layer(layer, x: torch.Tensor, g: torch.Tensor):
    """Forward + backward of loss = sum(y * g); returns y, dL/dx and every param grad."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y, _ = layer(x)
    y.backward(g)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def reference_model(layer, config) -> ref.Model:
    def expert(mlp):
        bias = lambda lin: None if lin.bias is None else lin.bias.detach().double()  # noqa: E731
        return ref.Expert(
            mlp.linear_fc1.weight.detach().double(),
            bias(mlp.linear_fc1),
            mlp.linear_fc2.weight.detach().double(),
            bias(mlp.linear_fc2),
        )

    shared = layer.shared_experts
    return ref.Model(
        router_w=layer.router.weight.detach().double(),
        router_b=None if layer.router.bias is None else layer.router.bias.detach().double(),
        experts=[expert(mlp) for mlp in layer.experts.local_experts],
        act=config.activation_func,
        glu=config.gated_linear_unit,
        shared=expert(shared) if shared is not None else None,
        shared_gate=(
            shared.gate_weight.detach().double()
            if shared is not None and shared.gate_weight is not None
            else None
        ),
    )


def reference_routing(layer, config) -> ref.Routing:
    bias = layer.router.expert_bias
    aux = config.moe_aux_loss_coeff if config.moe_router_load_balancing_type == "aux_loss" else 0
    return ref.Routing(
        score_function=config.moe_router_score_function,
        topk=config.moe_router_topk,
        pre_softmax=config.moe_router_pre_softmax,
        scaling_factor=config.moe_router_topk_scaling_factor,
        num_groups=config.moe_router_num_groups,
        group_topk=config.moe_router_group_topk,
        expert_bias=None if bias is None else bias.detach().double(),
        variant=config.moe_dense_router_grad_variant,
        aux_loss_coeff=aux,
        z_loss_coeff=config.moe_z_loss_coeff,
    )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def capture_routing_map(layer):
    seen = {}

    def hook(module, args, output):
        seen["routing_map"] = output[1].detach().clone()

    return seen, layer.router.register_forward_hook(hook)


ROUTING_CASES = {
    "softmax_renormalised": {},
    "softmax_pre_softmax": dict(moe_router_pre_softmax=True),
    "softmax_scaling": dict(moe_router_topk_scaling_factor=2.5),
    "softmax_topk3": dict(moe_router_topk=3),
    "softmax_group_limited": dict(
        moe_router_pre_softmax=True, moe_router_num_groups=4, moe_router_group_topk=2
    ),
    "sigmoid_renormalised_expert_bias": dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True
    ),
    "sigmoid_topk1": dict(moe_router_score_function="sigmoid", moe_router_topk=1),
    "sigmoid_deepseek_v3": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5,
        moe_router_topk=4,
    ),
    "shared_expert_with_gate": dict(
        moe_shared_expert_intermediate_size=20, moe_shared_expert_gate=True
    ),
    # Expert biases are covered in test_autograd.py: megatron-core 0.16.1's own MoELayer
    # fails with SequentialMLP experts and add_bias_linear=True (an in-place bias add on a
    # view returned by _ReduceFromModelParallelRegion).
    "non_gated_experts": dict(gated_linear_unit=False, activation_func=F.gelu),
    "aux_loss_and_z_loss": dict(
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01
    ),
    "gated_variant": dict(moe_dense_router_grad_variant="gated"),
    "gated_variant_sigmoid_scaling": dict(
        moe_dense_router_grad_variant="gated",
        moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=2.0,
    ),
    "router_dtype_fp64": dict(moe_router_dtype="fp64"),
}


@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_matches_reference_fp32(case):
    """Forward and expert grads bitwise-conventional; router and input grads = float64 math.

    Guards against any routing mode silently getting the conventional (or a wrong) router
    gradient. Tolerance 1e-5 (norm-relative): fp32 has unit roundoff 6e-8 and each gradient
    entry is a few hundred fp32 operations deep at these sizes.
    """
    config = make_config(**ROUTING_CASES[case])
    dense, conventional = build_pair(config)
    torch.manual_seed(1)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    g = torch.randn(SEQ, BATCH, config.hidden_size)

    seen, handle = capture_routing_map(dense)
    y, dx, grads = run_layer(dense, x, g)
    handle.remove()
    y_conv, dx_conv, grads_conv = run_layer(conventional, x, g)

    assert torch.equal(y, y_conv), "the forward value must be the conventional one, bitwise"
    for name, grad in grads_conv.items():
        if not name.startswith("router."):
            assert torch.equal(grads[name], grad), f"{name} must keep its conventional grad"

    model, routing = reference_model(dense, config), reference_routing(dense, config)
    x2d, g2d = x.reshape(-1, config.hidden_size), g.reshape(-1, config.hidden_size)
    expected = ref.reference(model, x2d, g2d, routing, dense=True)
    expected_conv = ref.reference(model, x2d, g2d, routing, dense=False)

    assert torch.equal(seen["routing_map"], expected.selected), "reference picked another K"
    assert rel_err(y.reshape(x2d.shape), expected.y) < 1e-6
    # The dense term must be visible, or this test could not tell the two apart.
    assert rel_err(expected.d_router_w, expected_conv.d_router_w) > 1e-2
    assert rel_err(grads["router.weight"], expected.d_router_w) < 1e-5
    assert rel_err(grads_conv["router.weight"], expected_conv.d_router_w) < 1e-5
    assert rel_err(dx.reshape(x2d.shape), expected.d_x) < 1e-5
    if expected.d_router_b is not None:
        assert rel_err(grads["router.bias"], expected.d_router_b) < 1e-5


@pytest.mark.parametrize("load_balancing", ["seq_aux_loss", "global_aux_loss"])
def test_other_aux_losses_unchanged(load_balancing):
    """Seq/global aux losses see the same scores and map: the dense layer's router grad
    minus the conventional one equals the reference's dense-minus-conventional term."""
    config = make_config(moe_router_load_balancing_type=load_balancing, moe_aux_loss_coeff=0.1)
    dense, conventional = build_pair(config)
    torch.manual_seed(2)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    g = torch.randn(SEQ, BATCH, config.hidden_size)
    _, _, grads = run_layer(dense, x, g)
    _, _, grads_conv = run_layer(conventional, x, g)

    model, routing = reference_model(dense, config), reference_routing(dense, config)
    x2d, g2d = x.reshape(-1, config.hidden_size), g.reshape(-1, config.hidden_size)
    delta = (
        ref.reference(model, x2d, g2d, routing, dense=True).d_router_w
        - ref.reference(model, x2d, g2d, routing, dense=False).d_router_w
    )
    assert rel_err(grads["router.weight"] - grads_conv["router.weight"], delta) < 1e-5


def test_bf16_matches_reference():
    """bf16 params and activations, fp32 router: same checks, bf16-sized tolerance.

    Forward and expert grads stay bitwise equal to MoELayer in bf16. The router and input
    gradients are compared with the float64 reference on the same (bf16-rounded) weights at
    3e-2 norm-relative: bf16's unit roundoff is 2^-9 = 2e-3, and each expert output passes
    through about five bf16 roundings (fc1, activation, gating product, fc2, prob scaling),
    so G and the conventional path carry ~1e-2 relative error.
    """
    config = make_config(bf16=True, params_dtype=torch.bfloat16)
    dense, conventional = build_pair(config)
    torch.manual_seed(3)
    x = torch.randn(SEQ, BATCH, config.hidden_size).bfloat16()
    g = torch.randn(SEQ, BATCH, config.hidden_size).bfloat16()
    y, dx, grads = run_layer(dense, x, g)
    y_conv, _, grads_conv = run_layer(conventional, x, g)
    assert torch.equal(y, y_conv)
    for name, grad in grads_conv.items():
        if not name.startswith("router."):
            assert torch.equal(grads[name], grad), name

    model, routing = reference_model(dense, config), reference_routing(dense, config)
    x2d, g2d = x.reshape(-1, config.hidden_size), g.reshape(-1, config.hidden_size)
    expected = ref.reference(model, x2d, g2d, routing, dense=True)
    expected_conv = ref.reference(model, x2d, g2d, routing, dense=False)
    assert rel_err(expected.d_router_w, expected_conv.d_router_w) > 1e-1
    assert rel_err(grads["router.weight"], expected.d_router_w) < 3e-2
    assert rel_err(dx.reshape(x2d.shape), expected.d_x) < 3e-2


def test_flag_off_is_moe_layer(count_dense_work):
    """With moe_dense_router_grad=False every output and gradient is MoELayer's, bitwise,
    and no dense work runs."""
    config = make_config(moe_dense_router_grad=False, moe_shared_expert_intermediate_size=20)
    torch.manual_seed(0)
    off = build_moe_layer(config, spec=densemixer_spec(_local_moe_spec(config)))
    conventional = build_moe_layer(config)
    conventional.load_state_dict(off.state_dict(), strict=True)
    torch.manual_seed(4)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    g = torch.randn(SEQ, BATCH, config.hidden_size)
    y, dx, grads = run_layer(off, x, g)
    y_conv, dx_conv, grads_conv = run_layer(conventional, x, g)
    assert off.dense_reduction is None and count_dense_work == []
    assert torch.equal(y, y_conv) and torch.equal(dx, dx_conv)
    assert grads.keys() == grads_conv.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_conv[name]), name


@pytest.fixture
def count_dense_work(monkeypatch):
    """Counts calls of the backward's dense reduction."""
    calls = []
    original = dm_autograd.expert_output_scores

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(dm_autograd, "expert_output_scores", counted)
    return calls


def test_no_dense_work_without_grad(count_dense_work):
    """Eval and RL log-prob passes (no_grad) and frozen routers cost nothing extra."""
    config = make_config()
    dense, conventional = build_pair(config)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    with torch.no_grad():
        y, _ = dense(x)
        y_conv, _ = conventional(x)
    assert torch.equal(y, y_conv)
    assert dense.router.pop_dense_probs() is None
    assert count_dense_work == []

    dense.router.weight.requires_grad_(False)
    run_layer(dense, x, torch.randn_like(x))
    assert count_dense_work == []

    dense.router.weight.requires_grad_(True)
    run_layer(dense, x, torch.randn_like(x))
    assert count_dense_work == [SEQ * BATCH], "one dense reduction per backward"


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunk_size_does_not_change_the_gradient(chunk_size):
    """Chunking is only a memory bound: every chunk size gives the same router gradient."""
    config = make_config(moe_dense_router_grad_chunk_size=chunk_size)
    dense, _ = build_pair(config)
    assert dense.dense_reduction.chunk_size == chunk_size
    torch.manual_seed(5)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    g = torch.randn(SEQ, BATCH, config.hidden_size)
    _, _, grads = run_layer(dense, x, g)
    model, routing = reference_model(dense, config), reference_routing(dense, config)
    expected = ref.reference(model, x.reshape(-1, 16), g.reshape(-1, 16), routing, dense=True)
    assert rel_err(grads["router.weight"], expected.d_router_w) < 1e-5
