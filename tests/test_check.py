"""Flag on, nothing happens: the automatic check, frozen routers and CUDA graphs."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import CudaGraphScope
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cpu.models import build_pair, make_config, rel_err
from megatron_densemixer import densemixer_spec, validate_dense_router_grad
from tests.support import reference as ref
from tests.support.builders import reference_model, reference_routing, run_layer

pytestmark = pytest.mark.usefixtures("model_parallel")

SEQ, BATCH, VOCAB = 8, 2, 64


def _gpt(config, spec, seed=0):
    torch.manual_seed(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=True,
        post_process=True,
    )


def _loss(model):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.ones(BATCH, 1, SEQ, SEQ, dtype=torch.bool).triu(1)  # True = masked out
    return model(tokens, position_ids, mask, labels=tokens).float().mean()


def _config(**overrides):
    return make_config(num_layers=2, hidden_dropout=0.0, attention_dropout=0.0, **overrides)


def _spec():
    return get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)


def _router_hooks(model):
    return sum(len(layer.mlp.router._forward_pre_hooks) for layer in model.decoder.layers)


def test_unrewritten_spec_raises_at_the_first_training_forward():
    """The flag on with a plain spec and no explicit check used to train conventionally without
    a word; the first training forward now raises, and so does every later one. A forward
    without grad (an inference copy, an RL log-prob pass) is not refused."""
    model = _gpt(_config(), _spec())
    with torch.no_grad():
        _loss(model)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"MoE layers \['layer_number=1', 'layer_number=2'"):
            _loss(model).backward()


def test_rewritten_spec_is_looked_at_once():
    """With densemixer_spec the check passes silently and removes its hooks at the first
    training forward: nothing runs per step afterwards."""
    model = _gpt(_config(), densemixer_spec(_spec()))
    assert _router_hooks(model) == 2
    with torch.no_grad():
        _loss(model)
    assert _router_hooks(model) == 2  # no-grad forwards do not count as a look
    _loss(model).backward()
    assert _router_hooks(model) == 0


def test_frozen_routers_warn_once_per_model(caplog):
    """freeze_moe_router (NeMo-RL, verl) or PEFT freezing the router made the flag a silent
    no-op; one warning per model now names the frozen layers and the fix, not one per step."""
    model = _gpt(_config(), densemixer_spec(_spec()))
    for layer in model.decoder.layers:
        layer.mlp.router.weight.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="megatron_densemixer"):
        for _ in range(3):
            _loss(model).backward()
    warnings = [r.getMessage() for r in caplog.records if r.name == "megatron_densemixer"]
    assert len(warnings) == 1
    assert "['layer_number=1', 'layer_number=2'] have no trainable parameter" in warnings[0]
    assert "freeze_moe_router: false" in warnings[0]


def test_trainable_routers_do_not_warn(caplog):
    """No warning when every router trains."""
    model = _gpt(_config(), densemixer_spec(_spec()))
    with caplog.at_level(logging.WARNING, logger="megatron_densemixer"):
        _loss(model).backward()
    assert not [r for r in caplog.records if r.name == "megatron_densemixer"]


# --------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------
ROUTER_SCOPES = [
    [CudaGraphScope.moe_router, CudaGraphScope.moe_preprocess],
    [CudaGraphScope.attn, CudaGraphScope.moe_router],
    [CudaGraphScope.moe],
    [],  # the whole layer
]


@pytest.mark.parametrize("scope", ROUTER_SCOPES, ids=lambda s: ",".join(x.name for x in s))
def test_te_cuda_graph_capturing_the_router_is_refused(scope):
    """A Transformer Engine CUDA graph that replays the router would make no dense weights: the
    config check refuses it (set on a valid config's copy: Megatron's own CUDA-graph checks
    need TE)."""
    cfg = copy.copy(make_config())
    cfg.cuda_graph_impl, cfg.cuda_graph_scope = "transformer_engine", scope
    with pytest.raises(ValueError, match="captures the router .*cuda_graph_scope=\\['attn'\\]"):
        validate_dense_router_grad(cfg)


def test_attention_only_and_local_cuda_graphs_pass_the_config_check():
    """Attention-only scopes train with DenseMixer; the local implementation also builds
    inference copies, so it is not refused at config time."""
    for impl, scope in [
        ("transformer_engine", [CudaGraphScope.attn]),
        ("local", []),
        ("local", [CudaGraphScope.moe_router]),
    ]:
        cfg = copy.copy(make_config())
        cfg.cuda_graph_impl, cfg.cuda_graph_scope = impl, scope
        validate_dense_router_grad(cfg)


def _with_cuda_graphs(config, impl, scope):
    cfg = copy.copy(config)
    cfg.cuda_graph_impl, cfg.cuda_graph_scope = impl, scope
    return cfg


def test_local_cuda_graph_replaying_the_router_refuses_training_not_inference():
    """An inference copy built from the training overrides with cuda_graph_impl='local' runs
    without grad and is not refused; the same model's first training forward raises."""
    config = _config()
    model = _gpt(config, densemixer_spec(_spec()))
    # Set after build: Megatron's CudaGraphManager needs a CUDA RNG tracker to be built.
    config.cuda_graph_impl, config.cuda_graph_scope = "local", []
    with torch.no_grad():
        _loss(model)
    with pytest.raises(RuntimeError, match=r"cuda_graph_impl='local' .* \(the whole layer\)"):
        _loss(model).backward()


@pytest.mark.parametrize("scope", [CudaGraphScope.moe_router, "attn,moe_router"])
def test_local_cuda_graph_refusal_names_the_scope_in_any_form(scope):
    """A scope assigned after build keeps the form it was given (one enum, a comma string):
    the refusal still names the scope that replays the router."""
    config = _config()
    model = _gpt(config, densemixer_spec(_spec()))
    config.cuda_graph_impl, config.cuda_graph_scope = "local", scope
    with pytest.raises(RuntimeError, match=r"replays the router \((attn, )?moe_router\)"):
        _loss(model).backward()


def test_route_replayed_by_a_cuda_graph_raises():
    """Runtime guard behind the config check: Megatron's replay path (the router step's CUDA
    graph decorator, fed from the layer's tensor store) returns probs without running the
    router; a training forward then raises instead of training conventionally."""
    config = make_config()
    dense, _ = build_pair(config)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    with torch.no_grad():
        probs, routing_map = dense.route(x)
    dense.config = _with_cuda_graphs(dense.config, "transformer_engine", ROUTER_SCOPES[0])
    dense.cudagraph_tensor_store.set(probs=probs, routing_map=routing_map)
    with pytest.raises(RuntimeError, match="made no dense router weights"):
        dense(x)


def test_attention_only_te_cuda_graph_trains_exactly():
    """With a Transformer Engine CUDA graph on attention only, the router runs through
    Megatron's CUDA-graph decorator unskipped and gets DenseMixer's gradient (float64
    reference, 1e-5: fp32 layer against float64 loops)."""
    config = make_config()
    dense, _ = build_pair(config)
    dense.config = _with_cuda_graphs(dense.config, "transformer_engine", [CudaGraphScope.attn])
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    g = torch.randn_like(x)
    _, _, grads = run_layer(dense, x, g)
    x2d, g2d = x.reshape(-1, config.hidden_size).double(), g.reshape(-1, config.hidden_size)
    model, routing = reference_model(dense, config), reference_routing(dense, config)
    expected = ref.reference(model, x2d, g2d.double(), routing, dense=True)
    assert rel_err(grads["router.weight"], expected.d_router_w) < 1e-5


def test_flag_off_model_is_looked_at_once_and_unhooked():
    """A DenseMixer config with the flag off: its layers are watched until the first training
    forward (the flag may still be switched on), which looks, finds it off, raises nothing,
    warns nothing and removes every hook."""
    model = _gpt(dataclasses.replace(_config(), moe_dense_router_grad=False), _spec())
    assert _router_hooks(model) == 2
    _loss(model).backward()
    assert _router_hooks(model) == 0


def test_plain_config_with_flag_off_is_not_watched():
    """A plain TransformerConfig without the flag (nothing of DenseMixer's) gets no hook."""
    fields = {f.name: getattr(_config(), f.name) for f in dataclasses.fields(TransformerConfig)}
    model = _gpt(TransformerConfig(**fields), _spec())
    assert _router_hooks(model) == 0


def test_flag_switched_on_after_building_a_plain_spec_raises():
    """A plain spec built under a DenseMixer config with the flag off, the flag then set on
    the config object: the first training forward raises instead of training conventionally."""
    config = dataclasses.replace(_config(), moe_dense_router_grad=False)
    model = _gpt(config, _spec())
    config.moe_dense_router_grad = True
    with pytest.raises(RuntimeError, match="would train conventionally"):
        _loss(model).backward()


@pytest.mark.parametrize(
    "field, value",
    [
        ("moe_dense_router_grad_chunk_size", -4),
        ("moe_dense_router_grad_token_fraction", 0.0),
        ("moe_dense_router_grad_topm", 1),
        ("moe_dense_router_grad_variant", "nope"),
    ],
)
def test_option_assigned_after_the_config_was_built_is_refused_at_layer_build(field, value):
    """A dataclass does not re-run __post_init__ on assignment: the layer validates again when
    it is built, so an option written after the config fails there, not in the backward."""
    config = _config()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=field):
        _gpt(config, densemixer_spec(_spec()))
