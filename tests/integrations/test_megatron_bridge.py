"""Megatron-Bridge providers (NeMo-RL, verl's default path) made DenseMixer ones.

A stand-in provider (a TransformerConfig dataclass with a ``transformer_layer_spec`` field, as
GPTModelProvider is) covers the logic with megatron-core alone. The tests after it drive the
installed Megatron-Bridge (0.5.x, 0.6.x: Python 3.12 and megatron-core >= 0.18, installed by
``make test-matrix`` in those lanes):
a Qwen3-MoE provider made by Bridge's own ``AutoBridge.from_hf_config`` from a tiny config (no
download), built and trained one step on CPU, saved and loaded through Bridge's allowlist, and
verl's ``apply_overrides_and_finalize`` path. They skip, with the reason, where Bridge is absent.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cpu.models import rel_err
from megatron_densemixer import DenseMixerMoELayer, DenseMixerTopKRouter
from megatron_densemixer.integrations import megatron_bridge
from tests.support import reference as ref
from tests.support import transformer_engine_stub
from tests.support.builders import (
    MOE_FIELDS,
    TINY_QWEN3_MOE,
    mlp_modules,
    reference_model,
    reference_routing,
)

pytestmark = pytest.mark.usefixtures("model_parallel")


def local_block_spec(config: Any, vp_stage: int | None = None) -> Any:
    return get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage)


@dataclasses.dataclass
class ToyProvider(TransformerConfig):
    """Shaped like Megatron-Bridge's GPTModelProvider: the config, plus a spec field."""

    transformer_layer_spec: Any = local_block_spec


def toy_provider() -> ToyProvider:
    return ToyProvider(**MOE_FIELDS)


def provide_spec(provider: Any, vp_stage: int | None = None) -> Any:
    """What GPTModelProvider.provide does with transformer_layer_spec."""
    spec = provider.transformer_layer_spec
    if "vp_stage" in inspect.signature(spec).parameters:
        return spec(provider, vp_stage=vp_stage)
    return spec(provider)


def test_provider_builds_densemixer_layers():
    """The wrapped spec callable rewrites the provider's own spec when the flag is on."""
    provider = megatron_bridge.densemixer_provider(toy_provider(), moe_dense_router_grad=True)
    spec = provider.transformer_layer_spec
    assert isinstance(spec, functools.partial)
    assert spec.func is megatron_bridge.densemixer_provider_layer_spec
    assert spec.keywords["base_spec"] is local_block_spec
    assert mlp_modules(provide_spec(provider, vp_stage=None)) == [DenseMixerMoELayer] * 2


def test_flag_off_stays_conventional_and_verl_override_turns_it_on():
    """verl sets overrides with hasattr checks after the provider is made: both must work."""
    provider = megatron_bridge.densemixer_provider(toy_provider())
    assert provider.moe_dense_router_grad is False
    assert mlp_modules(provide_spec(provider)) == [MoELayer] * 2
    provider.moe_dense_router_grad = True  # Megatron-Bridge's apply_overrides_and_finalize
    assert mlp_modules(provide_spec(provider)) == [DenseMixerMoELayer] * 2


def test_options_survive_dataclasses_replace():
    """NeMo-RL rebuilds providers with dataclasses.replace, which drops non-field attributes."""
    provider = megatron_bridge.densemixer_provider(toy_provider(), moe_dense_router_grad=True)
    rebuilt = dataclasses.replace(provider, hidden_size=16)
    assert not hasattr(rebuilt, "moe_dense_router_grad")
    assert mlp_modules(provide_spec(rebuilt)) == [DenseMixerMoELayer] * 2
    assert rebuilt.moe_dense_router_grad is True


def test_wrapping_twice_does_not_nest():
    """Calling densemixer_provider again updates the options instead of nesting partials."""
    provider = megatron_bridge.densemixer_provider(toy_provider(), moe_dense_router_grad=True)
    provider = megatron_bridge.densemixer_provider(provider, moe_dense_router_grad_topm=3)
    assert provider.transformer_layer_spec.keywords["base_spec"] is local_block_spec
    assert provider.transformer_layer_spec.keywords["moe_dense_router_grad_topm"] == 3


def test_invalid_options_raise():
    """Unknown names fail at once; invalid values fail when the spec is built."""
    with pytest.raises(ValueError, match="unknown DenseMixer option"):
        megatron_bridge.densemixer_provider(toy_provider(), moe_densemixer=True)
    provider = megatron_bridge.densemixer_provider(
        toy_provider(), moe_dense_router_grad=True, moe_dense_router_grad_topm=9
    )
    with pytest.raises(ValueError, match="moe_dense_router_grad_topm=9 must satisfy"):
        provide_spec(provider)
    with pytest.raises(TypeError, match="has no transformer_layer_spec"):
        megatron_bridge.densemixer_provider(object())


def test_spec_target_is_a_public_module_level_function():
    """Megatron-Bridge serialises the partial as its function's dotted path and rejects
    '_private' segments; the path must import back to the same function."""
    import importlib

    function = megatron_bridge.densemixer_provider_layer_spec
    path = f"{function.__module__}.{function.__qualname__}"
    assert not any(part.startswith("_") for part in path.split("."))
    module, name = path.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is function
    assert path.startswith(megatron_bridge.TARGET_PREFIX)


# --------------------------------------------------------------------------------------
# Against the installed Megatron-Bridge
# --------------------------------------------------------------------------------------
needs_bridge = pytest.mark.skipif(
    not transformer_engine_stub.megatron_bridge_installed(),
    reason="Megatron-Bridge is not installed (releases 0.5+ need Python >= 3.12 and "
    "megatron-core >= 0.18; make test-matrix installs it in its 0.18 and 0.19 lanes)",
)


# verl's provider overrides (MegatronEngine, moe_token_dispatcher_type and the load balancing
# it forces), plus what CPU needs: no Transformer Engine, apex or CUDA fusions, local attention.
CPU_OVERRIDES = dict(
    moe_token_dispatcher_type="alltoall",
    moe_router_load_balancing_type="none",
    variable_seq_lengths=True,
    use_cpu_initialization=True,
    moe_grouped_gemm=False,
    moe_permute_fusion=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
)


@pytest.fixture(scope="module")
def bridge(model_parallel):
    """Megatron-Bridge's modules, imported with the Transformer Engine stub; CPU layer specs.

    Bridge's default layer spec is Transformer Engine's; on CPU its
    ``transformer_engine_layer_spec`` answers with Bridge's own ``local_layer_spec`` (same
    fields, local modules).
    """
    transformer_engine_stub.import_megatron_bridge()
    from megatron.bridge.models import gpt_provider
    from megatron.bridge.models.conversion.auto_bridge import AutoBridge
    from megatron.bridge.utils import instantiate_utils
    from megatron.core.transformer.enums import AttnBackend

    patch = pytest.MonkeyPatch()
    patch.setattr(gpt_provider, "transformer_engine_layer_spec", gpt_provider.local_layer_spec)
    yield {
        "AutoBridge": AutoBridge,
        "gpt_provider": gpt_provider,
        "instantiate_utils": instantiate_utils,
        "overrides": dict(CPU_OVERRIDES, attention_backend=AttnBackend.local),
    }
    patch.undo()


def qwen3_moe_provider(bridge) -> Any:
    """A fresh provider from Bridge's Qwen3-MoE bridge, as verl and NeMo-RL get one."""
    import transformers

    config = transformers.Qwen3MoeConfig(**TINY_QWEN3_MOE, dtype="float32")
    auto_bridge = bridge["AutoBridge"].from_hf_config(config)
    # verl's external lib (test_verl.py, same process) may have patched it: take Bridge's own.
    to_provider = type(auto_bridge).to_megatron_provider
    return getattr(to_provider, "__wrapped__", to_provider)(auto_bridge, load_weights=False)


def build(provider: Any) -> Any:
    torch.manual_seed(0)
    return provider.provide(pre_process=True, post_process=True)


def moe_layers(model: Any) -> list[Any]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def train_step(model: Any) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
    """Forward + backward of one batch; each MoE layer's input x and output gradient g."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(moe_layers(model)):

        def hook(module, args, output, i=i):
            seen[i] = {"x": args[0].detach().clone()}
            output[0].register_hook(lambda grad: seen[i].__setitem__("g", grad.detach().clone()))

        handles.append(layer.register_forward_hook(hook))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, 8), generator=gen)
    position_ids = torch.arange(8).expand(2, 8)
    # Causal mask made explicitly: GPTModel's default one is created on "cuda".
    mask = torch.triu(torch.ones(8, 8, dtype=torch.bool), diagonal=1)[None, None]
    loss = model(tokens, position_ids, mask, labels=tokens).mean()
    loss.backward()
    for handle in handles:
        handle.remove()
    return loss.detach(), seen


@needs_bridge
def test_bridge_qwen3_moe_provider_builds_densemixer_layers_and_trains(bridge):
    """Bridge's Qwen3-MoE provider, wrapped: DenseMixer MoE layers, the unwrapped provider's
    parameter names, the conventional loss bitwise, and after one training step on CPU each
    router's gradient equals the float64 DenseMixer reference on the x and g the layer saw.

    Guards against Bridge's provider building conventional layers under the flag (its spec
    callable bypassed) and against a renamed parameter (Bridge's HF weight mapping is by name).
    Tolerance 1e-5 norm-relative: fp32 against float64, as in test_moe_layer; the dense and
    conventional references differ by more than 1e-2 here, so a conventional gradient fails.
    """
    plain = qwen3_moe_provider(bridge)
    plain.apply_overrides_and_finalize(dtype=torch.float32, overrides=bridge["overrides"])
    wrapped = megatron_bridge.densemixer_provider(
        qwen3_moe_provider(bridge), moe_dense_router_grad=True
    )
    wrapped.apply_overrides_and_finalize(dtype=torch.float32, overrides=bridge["overrides"])
    conventional, dense = build(plain), build(wrapped)

    assert [type(m) for m in moe_layers(conventional)] == [MoELayer] * 2
    assert [type(m) for m in moe_layers(dense)] == [DenseMixerMoELayer] * 2
    assert all(type(m.router) is DenseMixerTopKRouter for m in moe_layers(dense))
    names = [name for name, _ in dense.named_parameters()]
    assert names == [name for name, _ in conventional.named_parameters()]
    conventional.load_state_dict(dense.state_dict())

    conventional_loss, _ = train_step(conventional)
    loss, seen = train_step(dense)
    assert torch.equal(loss, conventional_loss), "the forward must stay conventional"
    for i, layer in enumerate(moe_layers(dense)):
        x, g = seen[i]["x"].reshape(-1, 16), seen[i]["g"].reshape(-1, 16)
        model_ref, routing = reference_model(layer, wrapped), reference_routing(layer, wrapped)
        expected = ref.reference(model_ref, x, g, routing, dense=True)
        expected_conv = ref.reference(model_ref, x, g, routing, dense=False)
        assert rel_err(expected.d_router_w, expected_conv.d_router_w) > 1e-2
        assert rel_err(layer.router.weight.grad, expected.d_router_w) < 1e-5, i

    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    torch.optim.SGD(dense.parameters(), lr=0.1).step()
    for name, param in dense.named_parameters():
        if "router" in name:
            assert torch.isfinite(param).all() and not torch.equal(param, before[name]), name


@needs_bridge
def test_bridge_verl_path_apply_overrides_and_finalize(bridge):
    """verl's Bridge path: the provider from to_megatron_provider, then
    apply_overrides_and_finalize(overrides={..., moe_dense_router_grad: True}), then
    provide_distributed_model. Guards the attribute check that makes Bridge raise
    AttributeError for a field the provider lacks, and the pre-wrap hook that refuses a model
    whose spec was swapped after wrapping (verl's QAT path assigns transformer_layer_spec)."""
    overrides = dict(bridge["overrides"], moe_dense_router_grad=True)
    with pytest.raises(AttributeError, match="moe_dense_router_grad"):
        qwen3_moe_provider(bridge).apply_overrides_and_finalize(overrides=overrides)

    provider = megatron_bridge.densemixer_provider(qwen3_moe_provider(bridge))
    provider.apply_overrides_and_finalize(dtype=torch.float32, overrides=overrides)
    (model,) = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    assert [type(m) for m in moe_layers(model)] == [DenseMixerMoELayer] * 2

    provider.transformer_layer_spec = bridge["gpt_provider"].local_layer_spec
    with pytest.raises(RuntimeError, match="would train conventionally"):
        provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)

    off = megatron_bridge.densemixer_provider(qwen3_moe_provider(bridge))
    off.apply_overrides_and_finalize(dtype=torch.float32, overrides=bridge["overrides"])
    (model,) = off.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    assert [type(m) for m in moe_layers(model)] == [MoELayer] * 2


@needs_bridge
def test_bridge_saved_provider_loads_through_the_allowlist(bridge, tmp_path):
    """A provider whose flag came as an override (not a spec keyword) is built, saved with
    Bridge's save_hf_pretrained and loaded with from_hf_pretrained, which instantiates every
    _target_ through Bridge's allowlist: the loaded provider builds DenseMixer layers again.

    Guards against the override being lost on save (attributes that are not dataclass fields
    are not written) and against the spec callable being refused on load.
    """
    instantiate_utils = bridge["instantiate_utils"]
    with pytest.raises(Exception, match="not in the allowlist"):
        instantiate_utils._validate_target_prefix(target="not_allowlisted.f", full_key="x")

    provider = megatron_bridge.densemixer_provider(qwen3_moe_provider(bridge))
    provider.apply_overrides_and_finalize(
        dtype=torch.float32, overrides=dict(bridge["overrides"], moe_dense_router_grad=True)
    )
    build(provider)
    provider.save_hf_pretrained(tmp_path)

    assert megatron_bridge.allow_densemixer_targets() is True
    loaded = type(provider).from_hf_pretrained(tmp_path, trust_remote_code=True)
    spec = loaded.transformer_layer_spec
    assert spec.func is megatron_bridge.densemixer_provider_layer_spec
    assert spec.keywords["moe_dense_router_grad"] is True
    assert spec.keywords["base_spec"] is bridge["gpt_provider"].default_layer_spec
    assert [type(m) for m in moe_layers(build(loaded))] == [DenseMixerMoELayer] * 2


# --------------------------------------------------------------------------------------
# LoRA through Megatron-Bridge's PEFT (the published DenseMixer LoRA setting)
# --------------------------------------------------------------------------------------
LORA_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def effective_weight(linear: Any) -> torch.Tensor:
    """The [out, in] matrix a bias-free adapted linear applies, read by calling it on the
    identity: W + (alpha / r) B A for LoRA, m (W + s B A) / ||W + s B A|| for DoRA."""
    in_features = linear.to_wrap.weight.shape[1]
    with torch.no_grad():
        output, bias = linear(torch.eye(in_features))
    assert bias is None
    return output.T.double()


def adapted_reference_model(layer: Any, config: Any) -> ref.Model:
    """The float64 reference of a PEFT-adapted MoE layer: effective expert weights."""

    def weight(linear: Any) -> torch.Tensor:
        if hasattr(linear, "adapter"):
            return effective_weight(linear)
        return linear.weight.detach().double()

    router = layer.densemixer_router()
    router_weight = router.weight.detach().double()
    if hasattr(layer.router, "adapter"):  # LoRATopKRouter: logits + (alpha / r) B A x
        adapter = layer.router.adapter
        delta = adapter.linear_out.weight.double() @ adapter.linear_in.weight.double()
        router_weight = router_weight + adapter.alpha / adapter.dim * delta.detach()
    return ref.Model(
        router_w=router_weight,
        router_b=None,
        experts=[
            ref.Expert(weight(mlp.linear_fc1), None, weight(mlp.linear_fc2), None)
            for mlp in layer.experts.local_experts
        ],
        act=config.activation_func,
        glu=config.gated_linear_unit,
    )


@needs_bridge
@pytest.mark.parametrize(
    "peft,router", [("lora", "trainable"), ("lora", "lora_adapter"), ("dora", "trainable")]
)
def test_bridge_peft_gets_densemixer_router_gradients(bridge, peft, router, monkeypatch):
    """Bridge's LoRA (and DoRA) on attention and expert linears of a wrapped Qwen3-MoE
    provider, with
    (a) the router weight trainable (DenseMixer's published LoRA setting) or (b) a LoRA adapter
    on the router (Bridge's LoRATopKRouter): the forward equals the conventional model's,
    expert base weights get no gradient, the last MoE layer's expert adapters get exactly the
    conventional gradient, and the router's trainable parameters get DenseMixer's gradient of
    the *adapted* model (float64 reference with W + (alpha/r) B A), 1e-5 norm-relative (fp32
    against float64). Guards the dense reduction reading the base weight behind a wrapper and
    the layer missing the router behind LoRATopKRouter.
    """
    from megatron.bridge.peft import utils as peft_utils
    from megatron.bridge.peft.dora import DoRA
    from megatron.bridge.peft.lora import LoRA

    # megatron-core defines its TE wrapper classes even without Transformer Engine, so Bridge
    # believes TE is there; on CPU every linear is a local one.
    monkeypatch.setattr(peft_utils, "HAVE_TE", False)
    targets = LORA_TARGETS + (["router"] if router == "lora_adapter" else [])
    if peft == "dora":
        # Bridge 0.6.2's DoRA on SequentialMLP expert linears fails in Megatron's own
        # (conventional) expert forward on CPU ("Sizes of tensors must match"): attention only.
        targets = ["linear_qkv", "linear_proj"]
    models = []
    for flag in (True, False):
        provider = megatron_bridge.densemixer_provider(
            qwen3_moe_provider(bridge), moe_dense_router_grad=flag
        )
        provider.apply_overrides_and_finalize(dtype=torch.float32, overrides=bridge["overrides"])
        model = build(provider)
        torch.manual_seed(3)
        # B initialised non-zero, so the adapters change the expert function from step one.
        transform = LoRA if peft == "lora" else DoRA
        model = transform(target_modules=targets, dim=4, alpha=8, lora_B_init_method="xavier")(
            model, training=True
        )
        if router == "trainable":
            for name, param in model.named_parameters():
                if name.endswith("router.weight"):
                    param.requires_grad_(True)
        models.append(model)
    dense, conventional = models
    # Copied parameter by parameter: Bridge's adapter state-dict hooks rename keys on save.
    source = dict(dense.named_parameters())
    with torch.no_grad():
        for name, param in conventional.named_parameters():
            param.copy_(source[name])
    assert all(type(m) is DenseMixerMoELayer for m in moe_layers(dense))

    conventional_loss, _ = train_step(conventional)
    loss, seen = train_step(dense)
    assert torch.equal(loss, conventional_loss), "the forward must stay conventional"
    conv_grads = {n: p.grad for n, p in conventional.named_parameters() if p.grad is not None}
    grads = {n: p.grad for n, p in dense.named_parameters() if p.grad is not None}
    assert not any(".experts." in n and "adapter" not in n for n in grads), "base weights frozen"
    last = [n for n in conv_grads if "layers.1.mlp.experts." in n]
    assert all(torch.equal(grads[n], conv_grads[n]) for n in last)
    assert last or peft == "dora"

    for i, layer in enumerate(moe_layers(dense)):
        x, g = seen[i]["x"].reshape(-1, 16), seen[i]["g"].reshape(-1, 16)
        model_ref = adapted_reference_model(layer, layer.config)
        base_router = layer.densemixer_router()
        routing = reference_routing(SimpleNamespace(router=base_router), layer.config)
        expected = ref.reference(model_ref, x, g, routing, dense=True)
        expected_conv = ref.reference(model_ref, x, g, routing, dense=False)
        assert rel_err(expected.d_router_w, expected_conv.d_router_w) > 1e-2
        if router == "trainable":
            assert rel_err(base_router.weight.grad, expected.d_router_w) < 1e-5, i
        else:
            adapter = layer.router.adapter
            scale = adapter.alpha / adapter.dim
            a = adapter.linear_in.weight.detach().double()
            b = adapter.linear_out.weight.detach().double()
            assert base_router.weight.grad is None
            assert rel_err(adapter.linear_out.weight.grad, scale * expected.d_router_w @ a.T) < 1e-5
            assert rel_err(adapter.linear_in.weight.grad, scale * b.T @ expected.d_router_w) < 1e-5


# --------------------------------------------------------------------------------------
# Bridge's Hopper recipe settings: the flex dispatcher with DeepEP, EP = 2
# --------------------------------------------------------------------------------------
# What Bridge's Qwen3-MoE recipes (qwen3_moe.py) set before calling
# apply_flex_dispatcher_backend, which switches them to flex on Ampere / Hopper / B200.
H100_RECIPE_MOE = dict(
    moe_token_dispatcher_type="alltoall",
    moe_flex_dispatcher_backend="deepep",
    moe_shared_expert_overlap=False,
    expert_model_parallel_size=2,
)


def _h100_device_properties(device: Any = None) -> SimpleNamespace:
    """What torch.cuda.get_device_properties answers on an H100 (Bridge reads major, name)."""
    return SimpleNamespace(major=9, minor=0, name="NVIDIA H100 80GB HBM3")


def _recipe_provider(bridge: dict, dense: bool, dispatcher: str) -> Any:
    """A tiny Qwen3-MoE provider with the H100 recipe's MoE settings, switched by Bridge's own
    apply_flex_dispatcher_backend ("flex") or left on alltoall, finalized for CPU."""
    from megatron.bridge.training import flex_dispatcher_backend

    provider = qwen3_moe_provider(bridge)
    if dense:
        provider = megatron_bridge.densemixer_provider(provider, moe_dense_router_grad=True)
    for name, value in H100_RECIPE_MOE.items():
        setattr(provider, name, value)
    if dispatcher == "flex":
        flex_dispatcher_backend.apply_flex_dispatcher_backend(
            provider, provider.moe_flex_dispatcher_backend
        )
        flex_dispatcher_backend.validate_flex_dispatcher_backend(provider)
        assert provider.moe_token_dispatcher_type == "flex"
    overrides = {k: v for k, v in bridge["overrides"].items() if k != "moe_token_dispatcher_type"}
    provider.apply_overrides_and_finalize(dtype=torch.float32, overrides=overrides)
    return provider


def _h100_flex_world(rank: int, world_size: int, out_path: str) -> None:
    """EP = 2: the recipe-configured provider built conventional-flex, DenseMixer-flex and
    DenseMixer-alltoall (same weights), one training step each; rank 0 writes the worst
    figures over ranks."""
    import json

    from megatron.core.transformer.enums import AttnBackend

    from megatron_cpu import init_model_parallel
    from tests.support.fused_a2a_standin import apply_fused_a2a_standin

    torch._dynamo.config.disable = True  # the flex preprocess is torch.compiled; not on CPU
    init_model_parallel(tp=1, ep=world_size)
    apply_fused_a2a_standin()
    transformer_engine_stub.import_megatron_bridge()
    from megatron.bridge.models import gpt_provider
    from megatron.bridge.models.conversion.auto_bridge import AutoBridge

    # This process is discarded after the run: plain assignments, no undo.
    gpt_provider.transformer_engine_layer_spec = gpt_provider.local_layer_spec
    torch.cuda.get_device_properties = _h100_device_properties
    bridge = {
        "AutoBridge": AutoBridge,
        "overrides": dict(CPU_OVERRIDES, attention_backend=AttnBackend.local),
    }
    dense_flex = build(_recipe_provider(bridge, dense=True, dispatcher="flex"))
    state = dense_flex.state_dict()
    conv_flex = build(_recipe_provider(bridge, dense=False, dispatcher="flex"))
    dense_a2a = build(_recipe_provider(bridge, dense=True, dispatcher="alltoall"))
    for model in (conv_flex, dense_a2a):
        model.load_state_dict(state)

    runs = {
        name: train_step(m)
        for name, m in [
            ("dense_flex", dense_flex),
            ("conv_flex", conv_flex),
            ("dense_a2a", dense_a2a),
        ]
    }

    def router_grads(model: Any) -> torch.Tensor:
        return torch.cat([m.router.weight.grad.flatten() for m in moe_layers(model)])

    layers = moe_layers(dense_flex)
    figures = {
        "layer_types": sorted({type(m).__name__ for m in layers}),
        "router_types": sorted({type(m.router).__name__ for m in layers}),
        "dispatchers": sorted({type(m.token_dispatcher).__name__ for m in layers}),
        "managers": sorted({type(m.token_dispatcher._comm_manager).__name__ for m in layers}),
        "conv_dispatchers": sorted(
            {type(m.token_dispatcher).__name__ for m in moe_layers(conv_flex)}
        ),
        "loss_bitwise": float(torch.equal(runs["dense_flex"][0], runs["conv_flex"][0])),
        "router_vs_alltoall": rel_err(router_grads(dense_flex), router_grads(dense_a2a)),
        "dense_term": rel_err(router_grads(dense_flex), router_grads(conv_flex)),
    }
    everyone = [None] * world_size
    torch.distributed.all_gather_object(everyone, figures)
    if rank == 0:
        worst = dict(everyone[0])
        worst["loss_bitwise"] = min(f["loss_bitwise"] for f in everyone)
        worst["router_vs_alltoall"] = max(f["router_vs_alltoall"] for f in everyone)
        worst["dense_term"] = min(f["dense_term"] for f in everyone)
        with open(out_path, "w") as f:
            json.dump(worst, f)


@needs_bridge
def test_bridge_h100_recipe_flex_deepep_provider_trains_densemixer(tmp_path):
    """Bridge's Qwen3-MoE recipe settings (alltoall, moe_flex_dispatcher_backend="deepep"),
    switched to the flex dispatcher by Bridge's own apply_flex_dispatcher_backend as on an H100
    (the GPU query answered as an H100's), wrapped with densemixer_provider and built at EP = 2
    over gloo, Megatron's MoEFlexTokenDispatcher with its DeepEP manager running on the
    fused-a2a stand-in (tests/support/fused_a2a_standin.py).

    Checks: DenseMixer layers and routers on the flex dispatcher's DeepEP manager; the loss
    bitwise the conventional flex model's; the router gradients equal those of the same
    DenseMixer model on the alltoall dispatcher (whose router gradient test_parallel holds
    against the float64 reference) and differ from the conventional ones by the dense term.
    Tolerance 1e-5 norm-relative: the two dispatchers feed the experts the same rows, and only
    fp32 summation order may differ; the dense term is > 1e-2 here.
    """
    import json

    from megatron_cpu import run_distributed

    out_path = str(tmp_path / "flex.json")
    run_distributed(_h100_flex_world, 2, out_path, timeout_s=600.0)
    with open(out_path) as f:
        figures = json.load(f)
    assert figures["layer_types"] == ["DenseMixerMoELayer"], figures
    assert figures["router_types"] == ["DenseMixerTopKRouter"], figures
    assert figures["dispatchers"] == figures["conv_dispatchers"] == ["MoEFlexTokenDispatcher"]
    assert figures["managers"] == ["_DeepepManager"], figures
    assert figures["loss_bitwise"] == 1.0, "the forward must stay the conventional flex model's"
    assert figures["router_vs_alltoall"] < 1e-5, figures
    assert figures["dense_term"] > 1e-2, figures
