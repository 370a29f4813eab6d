"""DenseMixerTransformerConfig: every unsupported combination raises a clear ValueError."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from megatron_densemixer import DenseMixerTransformerConfig, validate_dense_router_grad
from megatron_densemixer.moe_layer import local_expert_weights
from tests.test_moe_layer import make_config


def config(**overrides) -> DenseMixerTransformerConfig:
    return make_config(**overrides)


def test_defaults():
    """The flag is off by default and the options default to the reference's behaviour."""
    plain = config(moe_dense_router_grad=False)
    assert plain.moe_dense_router_grad is False
    assert plain.moe_dense_router_grad_variant == "partscale"
    assert plain.moe_dense_router_grad_topm is None
    assert plain.moe_dense_router_grad_token_fraction == 1.0


def test_flag_off_skips_validation():
    """Options that DenseMixer rejects are fine for conventional training."""
    config(moe_dense_router_grad=False, moe_expert_capacity_factor=1.0)


BAD = [
    (
        dict(num_moe_experts=None, moe_ffn_hidden_size=None),
        "requires an MoE model; set num_moe_experts",
    ),
    (dict(moe_dense_router_grad_variant="dense"), "must be one of \\('partscale', 'gated'\\)"),
    (
        dict(moe_dense_router_grad_variant="gated", moe_router_pre_softmax=True),
        "'gated' requires renormalised top-k weights",
    ),
    (
        dict(
            moe_dense_router_grad_variant="gated",
            moe_router_score_function="sigmoid",
            moe_router_topk=1,
        ),
        "'gated' requires renormalised top-k weights",
    ),
    (dict(moe_dense_router_grad_chunk_size=0), "chunk_size must be a positive integer, got 0"),
    (dict(moe_dense_router_grad_chunk_budget_mb=-1.0), "chunk_budget_mb must be positive"),
    (dict(moe_dense_router_grad_topm=2), "moe_dense_router_grad_topm=2 must satisfy"),
    (dict(moe_dense_router_grad_topm=9), "moe_dense_router_grad_topm=9 must satisfy"),
    (dict(moe_dense_router_grad_token_fraction=0.0), "token_fraction=0.0 must be in \\(0, 1\\]"),
    (dict(moe_dense_router_grad_token_fraction=1.5), "token_fraction=1.5 must be in \\(0, 1\\]"),
    (
        dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
        "'sinkhorn' is not supported",
    ),
    (dict(moe_expert_capacity_factor=1.25), "moe_expert_capacity_factor=1.25 .* not supported"),
    (
        dict(moe_apply_probs_on_input=True, moe_router_topk=1, moe_router_pre_softmax=True),
        "moe_apply_probs_on_input=True is not supported",
    ),
    (dict(moe_token_dispatcher_type="flex"), "moe_token_dispatcher_type='flex' is not supported"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_raises(overrides, message):
    """Each unsupported combination fails at config time, naming the option and the fix."""
    with pytest.raises(ValueError, match=message) as info:
        config(**overrides)
    assert str(info.value).startswith("moe_dense_router_grad=True: ")


def test_replace_revalidates():
    """dataclasses.replace re-runs validation, so a valid config cannot be made invalid."""
    good = config()
    with pytest.raises(ValueError, match="token_fraction"):
        dataclasses.replace(good, moe_dense_router_grad_token_fraction=2.0)


GPU_ONLY_BAD = [
    (dict(fp8="hybrid"), "fp8/fp4 expert weights are not supported"),
    (dict(cuda_graph_impl="transformer_engine"), "cuda_graph_impl='transformer_engine'"),
    (dict(overlap_moe_expert_parallel_comm=True), "overlap_moe_expert_parallel_comm=True"),
    (dict(moe_latent_size=8), "moe_latent_size .* is not supported"),
]


@pytest.mark.parametrize("fields,message", GPU_ONLY_BAD, ids=[m[:30] for _, m in GPU_ONLY_BAD])
def test_bad_gpu_only_options_raise(fields, message):
    """Options whose Megatron validation needs TE/CUDA are checked on a valid config's copy,
    by the same validate_dense_router_grad that __post_init__ calls."""
    cfg = copy.copy(config())
    for name, value in fields.items():
        setattr(cfg, name, value)
    with pytest.raises(ValueError, match=message):
        validate_dense_router_grad(cfg)


def test_raises_for_unsupported_expert_module():
    """A layer whose experts are not SequentialMLP/GroupedMLP/TEGroupedMLP is refused."""

    class CustomExperts(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="does not support expert module CustomExperts"):
        local_expert_weights(CustomExperts())
