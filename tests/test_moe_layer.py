"""DenseMixerMoELayer against Megatron's MoELayer and the float64 reference of DESIGN §2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter

from megatron_cpu.models import build_dense_layer, build_moe_layer, build_pair, make_config, rel_err
from megatron_densemixer import ring as dm_ring
from tests.support import reference as ref
from tests.support.builders import reference_model, reference_routing, run_layer

pytestmark = pytest.mark.usefixtures("model_parallel")

SEQ, BATCH = 6, 2


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
    # Expert biases are covered in test_experts.py: megatron-core 0.16.1's own MoELayer
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
    off = build_dense_layer(config, seed=0)
    conventional = build_moe_layer(config)
    conventional.load_state_dict(off.state_dict(), strict=True)
    torch.manual_seed(4)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    g = torch.randn(SEQ, BATCH, config.hidden_size)
    y, dx, grads = run_layer(off, x, g)
    y_conv, dx_conv, grads_conv = run_layer(conventional, x, g)
    assert off.dense_token_ring is None and count_dense_work == []
    assert torch.equal(y, y_conv) and torch.equal(dx, dx_conv)
    assert grads.keys() == grads_conv.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_conv[name]), name


@pytest.fixture
def count_dense_work(monkeypatch):
    """Counts calls of the backward's dense reduction."""
    calls = []
    original = dm_ring.expert_routing_weight_grads

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(dm_ring, "expert_routing_weight_grads", counted)
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
    assert dense.dense_call is None
    assert count_dense_work == []

    dense.router.weight.requires_grad_(False)
    run_layer(dense, x, torch.randn_like(x))
    assert count_dense_work == []

    dense.router.weight.requires_grad_(True)
    run_layer(dense, x, torch.randn_like(x))
    assert count_dense_work == [SEQ * BATCH], "one dense reduction per backward"


EMPTY_ROW_CASES = {
    "softmax_renormalised": {},
    "sigmoid_renormalised": dict(moe_router_score_function="sigmoid"),
    "softmax_pre_softmax": dict(moe_router_pre_softmax=True),
    "gated_variant": dict(moe_dense_router_grad_variant="gated"),
}


@pytest.mark.parametrize("case", list(EMPTY_ROW_CASES))
def test_token_routed_nowhere(case, monkeypatch):
    """A token with an empty routing-map row (padding exclusion, dropping) contributes
    nothing to the dense term: every gradient is finite and equals the float64 reference.

    Guards the S = 0 division that gave NaN router gradients with softmax scores (and ~1e20
    with sigmoid scores through Megatron's 1e-20 epsilon). The routing map is cleared the
    way newer routers' padding exclusion clears it: map row False, probs row 0. 4 experts,
    top-2, 10 tokens, tokens 3 and 7 routed nowhere. Tolerance 1e-5 as in the fp32 test.
    """
    config = make_config(num_moe_experts=4, **EMPTY_ROW_CASES[case])
    unrouted = torch.tensor([3, 7])
    routing = TopKRouter.routing

    def routing_with_empty_rows(self, logits, *args, **kwargs):
        probs, routing_map = routing(self, logits, *args, **kwargs)
        keep = torch.ones(routing_map.shape[0], 1, dtype=torch.bool)
        keep[unrouted] = False
        return probs * keep, routing_map & keep

    monkeypatch.setattr(TopKRouter, "routing", routing_with_empty_rows)
    dense, conventional = build_pair(config)
    torch.manual_seed(5)
    x = torch.randn(5, 2, config.hidden_size)
    g = torch.randn(5, 2, config.hidden_size)
    seen, handle = capture_routing_map(dense)
    y, dx, grads = run_layer(dense, x, g)
    handle.remove()
    y_conv, dx_conv, grads_conv = run_layer(conventional, x, g)
    routing_map = seen["routing_map"]
    assert not routing_map[unrouted].any() and routing_map.sum(-1).gt(0).sum() == 8

    assert torch.equal(y, y_conv)
    for grad in (dx, *grads.values()):
        assert torch.isfinite(grad).all()
    model, ref_routing = reference_model(dense, config), reference_routing(dense, config)
    x2d, g2d = x.reshape(-1, config.hidden_size), g.reshape(-1, config.hidden_size)
    expected = ref.reference(model, x2d, g2d, ref_routing, dense=True, forced_selection=routing_map)
    expected_conv = ref.reference(
        model, x2d, g2d, ref_routing, dense=False, forced_selection=routing_map
    )
    assert rel_err(expected.d_router_w, expected_conv.d_router_w) > 1e-2
    assert rel_err(grads["router.weight"], expected.d_router_w) < 1e-5
    assert rel_err(dx.reshape(x2d.shape), expected.d_x) < 1e-5
    # The unrouted tokens' input gradient is zero in both layers: no expert, no router term.
    assert torch.equal(dx.reshape(x2d.shape)[unrouted], torch.zeros(2, config.hidden_size))


def test_trainable_router_bias_alone_gets_the_dense_gradient(count_dense_work):
    """Router weight frozen, router bias trainable: the bias gets DenseMixer's gradient.

    Guards the old rule that only ``router.weight.requires_grad`` turned the dense gradient
    on (the bias then got the conventional gradient, 0.54 relative error). The bias is added
    by hand because megatron-core 0.16.1's MoELayer cannot build with add_bias_linear=True and
    SequentialMLP experts; TopKRouter.gating uses ``self.bias`` whenever it is set.
    """
    config = make_config()
    dense, conventional = build_pair(config)
    bias = torch.randn(config.num_moe_experts) * 0.1
    for layer in (dense, conventional):
        layer.router.bias = torch.nn.Parameter(bias.clone())
        layer.router.weight.requires_grad_(False)
    torch.manual_seed(6)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    g = torch.randn(SEQ, BATCH, config.hidden_size)
    y, dx, grads = run_layer(dense, x, g)
    y_conv, _, grads_conv = run_layer(conventional, x, g)
    assert torch.equal(y, y_conv) and count_dense_work == [SEQ * BATCH]

    model, routing = reference_model(dense, config), reference_routing(dense, config)
    x2d, g2d = x.reshape(-1, config.hidden_size), g.reshape(-1, config.hidden_size)
    expected = ref.reference(model, x2d, g2d, routing, dense=True)
    expected_conv = ref.reference(model, x2d, g2d, routing, dense=False)
    assert rel_err(expected.d_router_b, expected_conv.d_router_b) > 1e-2
    assert rel_err(grads["router.bias"], expected.d_router_b) < 1e-5
    assert rel_err(grads_conv["router.bias"], expected_conv.d_router_b) < 1e-5
    assert rel_err(dx.reshape(x2d.shape), expected.d_x) < 1e-5


class RouterAdapter(torch.nn.Module):
    """A router wrapper of Megatron-Bridge's ``LoRATopKRouter`` shape: ``to_wrap`` is the
    router, the adapter adds s B A x to its logits, then the wrapped router's ``routing``."""

    def __init__(self, to_wrap: torch.nn.Module, rank: int = 2, scale: float = 0.5) -> None:
        super().__init__()
        self.to_wrap = to_wrap
        num_experts, hidden = to_wrap.weight.shape
        self.lora_a = torch.nn.Parameter(torch.randn(rank, hidden) * 0.3)
        self.lora_b = torch.nn.Parameter(torch.randn(num_experts, rank) * 0.3)
        self.scale = scale

    def forward(self, x, *args, **kwargs):
        logits = self.to_wrap.gating(x)
        logits = logits + self.scale * (x @ self.lora_a.T @ self.lora_b.T).to(logits.dtype)
        return self.to_wrap.routing(logits, *args, **kwargs)


def test_router_adapter_gets_the_dense_gradient(count_dense_work):
    """Router weight frozen (as PEFT freezes every base weight), a LoRA adapter on the router
    trainable: the layer reaches the DenseMixer router through the wrapper and the adapter
    gets DenseMixer's gradient, which follows from the float64 reference of the adapted router
    W_eff = W + s B A: dL/dB = s dL/dW_eff A^T, dL/dA = s B^T dL/dW_eff. Frozen adapter and
    weight: no dense work, exactly conventional. Tolerance 1e-5 (fp32 against float64)."""
    config = make_config()
    dense, conventional = build_pair(config)
    model, routing = reference_model(dense, config), reference_routing(dense, config)
    torch.manual_seed(8)
    for layer in (dense, conventional):
        layer.router.weight.requires_grad_(False)
        layer.router = RouterAdapter(layer.router)
    conventional.router.load_state_dict(dense.router.state_dict())
    x, g = torch.randn(SEQ, BATCH, config.hidden_size), torch.randn(SEQ, BATCH, config.hidden_size)
    y, dx, grads = run_layer(dense, x, g)
    y_conv, _, grads_conv = run_layer(conventional, x, g)
    assert torch.equal(y, y_conv) and count_dense_work == [SEQ * BATCH]

    adapter = dense.router
    w_eff = adapter.to_wrap.weight + adapter.scale * adapter.lora_b @ adapter.lora_a
    model.router_w = w_eff.detach().double()
    x2d, g2d = x.reshape(-1, config.hidden_size), g.reshape(-1, config.hidden_size)
    expected = ref.reference(model, x2d, g2d, routing, dense=True)
    expected_conv = ref.reference(model, x2d, g2d, routing, dense=False)
    a, b, s = adapter.lora_a.detach().double(), adapter.lora_b.detach().double(), adapter.scale
    for name, d_w in (("dense", expected.d_router_w), ("conv", expected_conv.d_router_w)):
        got = grads if name == "dense" else grads_conv
        assert rel_err(got["router.lora_b"], s * d_w @ a.T) < 1e-5, name
        assert rel_err(got["router.lora_a"], s * b.T @ d_w) < 1e-5, name
    assert rel_err(expected.d_router_w @ a.T, expected_conv.d_router_w @ a.T) > 1e-2
    assert rel_err(dx.reshape(x2d.shape), expected.d_x) < 1e-5

    adapter.lora_a.requires_grad_(False)
    adapter.lora_b.requires_grad_(False)
    run_layer(dense, x, g)
    assert count_dense_work == [SEQ * BATCH], "a fully frozen router does no dense work"


def test_flag_turned_on_after_build_raises():
    """A layer built with the flag off has no dense reduction: turning the flag on in its
    config afterwards must fail at the next forward, not train conventionally."""
    config = make_config(moe_dense_router_grad=False)
    layer = build_dense_layer(config, seed=0)
    layer.config.moe_dense_router_grad = True
    with pytest.raises(RuntimeError, match="turned on after this DenseMixerMoELayer was built"):
        layer(torch.randn(SEQ, BATCH, config.hidden_size))
