"""densemixer_spec on every spec form, parameter names, a whole GPTModel, GroupedMLP, TE."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cpu import install_grouped_gemm_fallback
from megatron_cpu.models import build_moe_layer, make_config, rel_err
from megatron_densemixer import (
    DenseMixerMoELayer,
    DenseMixerTopKRouter,
    check_dense_router_grad_applied,
    compat,
    densemixer_spec,
)
from megatron_densemixer.spec import DenseMixerSpecFunction
from tests.support import reference as ref
from tests.support.builders import MOE_FIELDS, mlp_module, mlp_modules, run_layer

pytestmark = pytest.mark.usefixtures("model_parallel")


def _native_moe_submodules() -> MoESubmodules:
    """The submodules of the installed megatron-core's local MoE spec, whatever its form."""
    return compat.moe_spec_parts(get_moe_module_spec(use_te=False, num_experts=8))[1]


def test_moe_module_spec():
    """The installed megatron-core's MoE spec gets the layer and router swapped; experts stay
    untouched, and so does the input spec."""
    spec = get_moe_module_spec(use_te=False, num_experts=8)
    module, submodules = compat.moe_spec_parts(spec)
    out = densemixer_spec(spec)
    assert type(out) is type(spec), "the spec keeps its form"
    out_module, out_submodules = compat.moe_spec_parts(out)
    assert out_module is DenseMixerMoELayer
    assert out_submodules.router is DenseMixerTopKRouter
    assert out_submodules.experts is submodules.experts
    assert out_submodules.shared_experts is submodules.shared_experts
    assert module is MoELayer and submodules.router is TopKRouter, "input untouched"


def test_module_spec_form():
    """megatron-core <= 0.17 builds MoE specs as ModuleSpec(module=MoELayer, submodules=...)."""
    spec = ModuleSpec(module=MoELayer, submodules=_native_moe_submodules())
    out = densemixer_spec(spec)
    assert isinstance(out, ModuleSpec) and out.module is DenseMixerMoELayer
    assert out.submodules.router is DenseMixerTopKRouter


def test_partial_moe_spec():
    """megatron-core >= 0.18 builds MoE specs as functools.partial(MoELayer, submodules=...)."""
    spec = functools.partial(MoELayer, submodules=_native_moe_submodules())
    out = densemixer_spec(spec)
    assert isinstance(out, functools.partial) and out.func is DenseMixerMoELayer
    assert out.keywords["submodules"].router is DenseMixerTopKRouter


def test_layer_and_block_specs():
    """A TransformerLayer spec and a block spec: MoE layers rewritten, dense layers kept."""
    layer = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    assert mlp_module(densemixer_spec(layer)) is DenseMixerMoELayer
    dense_layer = get_gpt_layer_local_spec()
    assert densemixer_spec(dense_layer) == dense_layer

    config = make_config(num_layers=4, moe_layer_freq=[0, 1, 0, 1])
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    mlps = mlp_modules(densemixer_spec(block))
    assert mlps[1] is DenseMixerMoELayer and mlps[3] is DenseMixerMoELayer
    assert mlps[0] is not DenseMixerMoELayer and mlps[2] is not DenseMixerMoELayer


def test_layer_spec_forms():
    """Every spec form GPTModel accepts from Megatron-LM gets its MoE layers rewritten."""
    config = TransformerConfig(**MOE_FIELDS)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    rewritten = densemixer_spec(block)
    assert all(module is DenseMixerMoELayer for module in mlp_modules(rewritten))

    wrapped = ModuleSpec(module=TransformerBlock, submodules=block)
    rewritten = densemixer_spec(wrapped).submodules
    assert all(module is DenseMixerMoELayer for module in mlp_modules(rewritten))

    layer = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    assert mlp_module(densemixer_spec(layer)) is DenseMixerMoELayer


def test_spec_function_is_called_then_rewritten():
    """Megatron-LM >= 0.19 accepts spec functions; the wrapper calls them per vp_stage."""
    calls = []

    def spec_function(config, vp_stage=None):
        calls.append(vp_stage)
        return get_gpt_decoder_block_spec(config, use_transformer_engine=False)

    wrapper = densemixer_spec(spec_function)
    assert isinstance(wrapper, DenseMixerSpecFunction)
    spec = wrapper(TransformerConfig(**MOE_FIELDS), vp_stage=1)
    assert calls == [1]
    assert mlp_module(spec.layer_specs[0]) is DenseMixerMoELayer
    layer = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    no_vp = densemixer_spec(lambda config: layer)
    assert mlp_module(no_vp(None, vp_stage=0)) is DenseMixerMoELayer


def test_custom_router_is_refused():
    """A router we cannot extend raises instead of silently keeping conventional grads."""

    class OtherRouter(TopKRouter):
        pass

    spec = get_moe_module_spec(use_te=False, num_experts=8)
    module, submodules = compat.moe_spec_parts(spec)
    submodules = compat.replace_router(submodules, OtherRouter)
    spec = compat.replace_moe_spec(spec, module, submodules)
    with pytest.raises(ValueError, match="uses router OtherRouter"):
        densemixer_spec(spec)
    config = make_config()
    with pytest.raises(ValueError, match="requires DenseMixerTopKRouter, got router OtherRouter"):
        DenseMixerMoELayer(config, submodules=submodules)


def test_layer_class_swap_alone_upgrades_the_router():
    """Swapping only the module class (routers left at TopKRouter) still enables DenseMixer."""
    spec = get_moe_module_spec(use_te=False, num_experts=8)
    layer = build_moe_layer(make_config(), layer_cls=DenseMixerMoELayer, spec=spec)
    assert isinstance(layer.router, DenseMixerTopKRouter)
    assert compat.moe_spec_parts(spec)[1].router is TopKRouter, "spec untouched"


def test_tp_group_kwarg_from_transformer_layer():
    """TransformerLayer (<= 0.17) passes tp_group, not pg_collection, to MoELayer subclasses."""
    _, submodules = compat.moe_spec_parts(
        densemixer_spec(get_moe_module_spec(use_te=False, num_experts=8))
    )
    layer = DenseMixerMoELayer(make_config(), submodules=submodules, tp_group=None)
    assert layer.dense_token_ring is not None


def test_transformer_layer_process_groups_reach_the_layer(caplog):
    """A TransformerLayer built with a non-default pg_collection hands it to the DenseMixer
    layer, and logs no "Unknown MLP type" warning.

    Guards megatron-core <= 0.17, whose TransformerLayer passes pg_collection only to an MLP
    that *is* MoELayer: the subclass used to fall back to the default groups (a model built
    with its own process groups then reduced over the wrong ones).
    """
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    groups = ProcessGroupCollection.use_mpu_process_groups()
    # One-rank groups that are not the defaults: the layer must hold these very objects.
    custom = {name: torch.distributed.new_group([0]) for name in ("ep", "tp_ep", "expt_tp")}
    for name, group in custom.items():
        setattr(groups, name, group)
    spec = densemixer_spec(get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False))
    with caplog.at_level("WARNING"):
        layer = build_module(spec, config=make_config(), layer_number=1, pg_collection=groups)
    assert isinstance(layer.mlp, DenseMixerMoELayer)
    assert layer.mlp.ep_group is custom["ep"]
    assert layer.mlp.dense_token_ring.tp_ep_group is custom["tp_ep"]
    assert "Unknown MLP type" not in caplog.text


def test_check_dense_router_grad_applied():
    """The flag on with a plain spec builds Megatron's own MoELayer; the check says so before
    any training step. With densemixer_spec, or with the flag off, it passes."""
    config = make_config(num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    with pytest.raises(
        RuntimeError,
        match="decoder.layers.0.mlp is a MoELayer .* with megatron_densemixer.densemixer_spec",
    ):
        check_dense_router_grad_applied(_gpt(config, spec))
    check_dense_router_grad_applied([_gpt(config, densemixer_spec(spec))])
    check_dense_router_grad_applied(
        _gpt(dataclasses.replace(config, moe_dense_router_grad=False), spec)
    )


def _gpt(config, spec, seed=0):
    torch.manual_seed(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=64,
        max_sequence_length=16,
        pre_process=True,
        post_process=True,
    )


def test_gpt_model_parameter_names_and_training():
    """A GPTModel built with densemixer_spec keeps every parameter name (checkpoints and HF
    conversion keep working), its first MoE layer is a DenseMixerMoELayer, its forward loss
    equals the conventional model's bitwise, and it trains."""
    config = make_config(num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    dense = _gpt(config, densemixer_spec(spec))
    conventional = _gpt(dataclasses.replace(config, moe_dense_router_grad=False), spec)
    assert dense.state_dict().keys() == conventional.state_dict().keys()
    conventional.load_state_dict(dense.state_dict())
    assert isinstance(dense.decoder.layers[0].mlp, DenseMixerMoELayer)

    tokens = torch.randint(0, 64, (2, 16))
    position_ids = torch.arange(16).expand(2, 16)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool).triu(1)  # True = masked out
    losses = []
    for model in (dense, conventional):
        loss = model(tokens, position_ids, mask, labels=tokens).sum()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    # Routers differ; what lies after the last router's effect on x (the last MoE layer's
    # experts, the final norm) keeps its conventional gradient bitwise. Everything upstream
    # legitimately changes, since DenseMixer changes dL/dx through W_r^T dL/dz.
    grads = dict(dense.named_parameters())
    unchanged = ("decoder.layers.1.mlp.experts.", "decoder.final_layernorm.")
    checked = 0
    for name, p in conventional.named_parameters():
        if "router" in name:
            assert not torch.equal(grads[name].grad, p.grad), name
        elif name.startswith(unchanged):
            assert torch.equal(grads[name].grad, p.grad), name
            checked += 1
    assert checked >= 8 + 1

    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    first = None
    for _ in range(5):
        optimizer.zero_grad()
        loss = dense(tokens, position_ids, mask, labels=tokens).mean()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < first


@pytest.mark.skipif(
    compat.GroupedMLP is None, reason="GroupedMLP was removed in megatron-core 0.17"
)
def test_grouped_mlp_matches_reference():
    """The legacy GroupedMLP path (stacked [E, H, F1] weights) gives the reference gradient.

    Runs with a pure-torch grouped GEMM (megatron_cpu.shim); GroupedMLP needs bf16. The
    router gradient is compared with the float64 reference at 3e-2 (see the bf16 test in
    test_moe_layer.py for why).
    """
    install_grouped_gemm_fallback()
    config = make_config(
        bf16=True, params_dtype=torch.bfloat16, moe_grouped_gemm=True, add_bias_linear=False
    )
    torch.manual_seed(0)
    spec = get_moe_module_spec(use_te=False, num_experts=8, moe_grouped_gemm=True)
    layer = build_moe_layer(config, spec=densemixer_spec(spec))
    assert isinstance(layer.experts, compat.GroupedMLP)
    x = torch.randn(6, 2, 16).bfloat16()
    g = torch.randn(6, 2, 16).bfloat16()
    _, _, grads = run_layer(layer, x, g)

    w1 = layer.experts.weight1.detach().double().view(8, 16, -1)
    w2 = layer.experts.weight2.detach().double().view(8, -1, 16)
    model = ref.Model(
        router_w=layer.router.weight.detach().double(),
        router_b=None,
        experts=[ref.Expert(w1[e].T, None, w2[e].T, None) for e in range(8)],
        act=F.silu,
        glu=True,
    )
    expected = ref.reference(
        model, x.reshape(-1, 16), g.reshape(-1, 16), ref.Routing(topk=2), dense=True
    )
    assert rel_err(grads["router.weight"], expected.d_router_w) < 3e-2


def test_te_grouped_mlp_on_gpu():
    """TEGroupedMLP (Transformer Engine, bf16 grouped GEMM) against the float64 reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA and Transformer Engine: TEGroupedMLP cannot run on CPU")
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    config = make_config(
        hidden_size=64,
        ffn_hidden_size=96,
        moe_ffn_hidden_size=96,
        moe_grouped_gemm=True,
        bf16=True,
        params_dtype=torch.bfloat16,
        moe_token_dispatcher_type="alltoall",
    )
    spec = densemixer_spec(get_moe_module_spec(use_te=True, num_experts=8, moe_grouped_gemm=True))
    module, submodules = compat.moe_spec_parts(spec)
    layer = module(config=config, submodules=submodules).cuda()
    assert isinstance(layer.experts, compat.TEGroupedMLP)
    x = torch.randn(32, 2, 64, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    _, _, grads = run_layer(layer, x, g)
    fc1, fc2 = layer.experts.linear_fc1, layer.experts.linear_fc2
    model = ref.Model(
        router_w=layer.router.weight.detach().double().cpu(),
        router_b=None,
        experts=[
            ref.Expert(
                getattr(fc1, f"weight{e}").detach().double().cpu(),
                None,
                getattr(fc2, f"weight{e}").detach().double().cpu(),
                None,
            )
            for e in range(8)
        ],
        act=F.silu,
        glu=True,
    )
    expected = ref.reference(
        model, x.reshape(-1, 64).cpu(), g.reshape(-1, 64).cpu(), ref.Routing(topk=2), dense=True
    )
    assert rel_err(grads["router.weight"].cpu(), expected.d_router_w) < 3e-2


def test_module_spec_type():
    """compat.moe_spec_parts recognises only MoE specs."""
    assert compat.moe_spec_parts(ModuleSpec(module=torch.nn.Linear)) is None
    assert compat.moe_spec_parts(functools.partial(torch.nn.Linear, 2)) is None
