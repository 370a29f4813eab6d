"""Multi-token prediction (MTP) layers with MoE: DenseMixer reaches their MoE layers too.

Megatron builds the MTP block's layers from the decoder's last layer spec
(``get_gpt_mtp_block_spec(config, decoder_spec, ...)``), so an MTP block spec built from a
``densemixer_spec``-rewritten decoder spec already holds DenseMixer MoE layers, and
``densemixer_spec`` also rewrites an MTP block spec built from the plain one.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_cpu.models import EXPERTS, HIDDEN, make_config, rel_err
from megatron_densemixer import (
    DenseMixerMoELayer,
    DenseMixerTopKRouter,
    check_dense_router_grad_applied,
    densemixer_spec,
)
from tests.support import reference as ref
from tests.support.builders import reference_model, reference_routing

pytestmark = pytest.mark.usefixtures("model_parallel")

VOCAB, SEQ, BATCH = 32, 8, 2


def mtp_config(**overrides):
    """Two decoder layers and one MTP layer, all MoE (the tests' small SwiGLU experts)."""
    return make_config(num_layers=2, mtp_num_layers=1, **overrides)


def layer_spec():
    return get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)


def mtp_moe_layers(model) -> list:
    """The MoE layers inside the model's MTP block."""
    return [m for m in model.mtp.modules() if isinstance(m, MoELayer)]


def build_model(config, mtp_block_spec, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(
        config,
        densemixer_spec(layer_spec()),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        mtp_block_spec=mtp_block_spec,
    )


def test_mtp_block_spec_forms():
    """Both ways of building the MTP block spec give DenseMixer MoE layers with their router;
    an MTP block spec from the plain decoder spec alone does not, and the built-model check
    says so.

    Guards against densemixer_spec passing MultiTokenPredictionBlockSubmodules (or an MTP
    layer's ModuleSpec) through untouched, which would train the MTP MoE layers conventionally.
    """
    config = mtp_config()
    from_rewritten = get_gpt_mtp_block_spec(
        config, densemixer_spec(layer_spec()), use_transformer_engine=False
    )
    plain = get_gpt_mtp_block_spec(config, layer_spec(), use_transformer_engine=False)
    rewritten = densemixer_spec(plain)
    assert type(rewritten) is type(plain)
    for spec in (from_rewritten, rewritten):
        layers = mtp_moe_layers(build_model(config, spec))
        assert len(layers) == 1
        assert type(layers[0]) is DenseMixerMoELayer
        assert type(layers[0].router) is DenseMixerTopKRouter

    conventional = build_model(config, plain)
    assert type(mtp_moe_layers(conventional)[0]) is MoELayer
    with pytest.raises(RuntimeError, match="mtp.layers.0.* would train conventionally"):
        check_dense_router_grad_applied(conventional)


def test_mtp_router_gradient_matches_reference():
    """The MTP layer's MoE router gradient, in a GPTModel trained on its main and MTP losses,
    equals the float64 DenseMixer reference on that layer's input x and output gradient g.

    Guards against the MTP block's MoE layer getting the conventional router gradient. The
    reference is evaluated on the x and g the layer saw (captured by hooks); the router
    weight reaches the loss only through that layer (no aux loss), so its gradient is
    exactly the reference's. Tolerance: 1e-5 norm-relative, fp32 against float64, as in
    test_moe_layer.
    """
    config = mtp_config()
    spec = densemixer_spec(
        get_gpt_mtp_block_spec(config, layer_spec(), use_transformer_engine=False)
    )
    model = build_model(config, spec)
    (layer,) = mtp_moe_layers(model)
    seen = {}

    def hook(module, args, output):
        seen["x"] = args[0].detach().clone()
        output[0].register_hook(lambda grad: seen.__setitem__("g", grad.detach().clone()))

    handle = layer.register_forward_hook(hook)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    # Causal mask made explicitly: the default one is created on "cuda".
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    loss = model(tokens, position_ids, mask, labels=labels)
    loss.sum().backward()
    handle.remove()

    x2d, g2d = seen["x"].reshape(-1, HIDDEN), seen["g"].reshape(-1, HIDDEN)
    model_ref, routing = reference_model(layer, config), reference_routing(layer, config)
    expected = ref.reference(model_ref, x2d, g2d, routing, dense=True)
    expected_conv = ref.reference(model_ref, x2d, g2d, routing, dense=False)
    assert rel_err(expected.d_router_w, expected_conv.d_router_w) > 1e-2
    assert rel_err(layer.router.weight.grad, expected.d_router_w) < 1e-5
