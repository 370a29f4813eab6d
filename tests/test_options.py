"""The moe_dense_router_grad* options: defaults, and every unsupported value or combination
raising a clear ValueError."""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
from megatron.core.transformer.enums import CudaGraphScope

from megatron_cpu.models import make_config
from megatron_densemixer.options import replays_router, validate_dense_router_grad


def test_defaults():
    """The flag is off by default and the options default to the reference's behaviour."""
    plain = make_config(moe_dense_router_grad=False)
    assert plain.moe_dense_router_grad is False
    assert plain.moe_dense_router_grad_variant == "partscale"
    assert plain.moe_dense_router_grad_topm is None
    assert plain.moe_dense_router_grad_token_fraction == 1.0


def test_flag_off_skips_validation():
    """Options that DenseMixer rejects are fine for conventional training."""
    make_config(moe_dense_router_grad=False, moe_expert_capacity_factor=1.0, moe_router_fusion=True)


BAD = [
    (
        dict(num_moe_experts=None, moe_ffn_hidden_size=None),
        "requires an MoE model; set num_moe_experts",
    ),
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
    (dict(moe_dense_router_grad_topm=2), "moe_dense_router_grad_topm=2 must satisfy"),
    (dict(moe_dense_router_grad_topm=9), "moe_dense_router_grad_topm=9 must satisfy"),
    (
        dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
        "'sinkhorn' is not supported",
    ),
    (
        dict(moe_expert_capacity_factor=1.25, moe_router_fusion=True),
        "moe_expert_capacity_factor=1.25 .* requires moe_router_fusion=False",
    ),
    (
        dict(moe_apply_probs_on_input=True, moe_router_topk=1, moe_router_pre_softmax=True),
        "moe_apply_probs_on_input=True is not supported",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_raises(overrides, message):
    """Each unsupported combination fails at config time, naming the option and the fix."""
    with pytest.raises(ValueError, match=message) as info:
        make_config(**overrides)
    assert str(info.value).startswith("moe_dense_router_grad=True: ")


# Each option's type and range on its own: refused whether or not the flag is on, so a bad
# value fails where it is written rather than when someone flips the flag.
BAD_VALUES = [
    (dict(moe_dense_router_grad="false"), "moe_dense_router_grad must be a bool .* got 'false'"),
    (dict(moe_dense_router_grad=1), "moe_dense_router_grad must be a bool .* got 1 \\(int\\)"),
    (dict(moe_dense_router_grad_variant="dense"), "must be one of \\('partscale', 'gated'\\)"),
    (dict(moe_dense_router_grad_chunk_size=0), "chunk_size must be a positive integer or None"),
    (dict(moe_dense_router_grad_chunk_size=1.5), "chunk_size must be a positive integer or None"),
    (dict(moe_dense_router_grad_chunk_size=True), "chunk_size must be a positive integer or None"),
    (dict(moe_dense_router_grad_chunk_budget_mb=-1.0), "chunk_budget_mb must be a positive number"),
    (dict(moe_dense_router_grad_chunk_budget_mb="256"), "chunk_budget_mb must be a positive"),
    (dict(moe_dense_router_grad_chunk_budget_mb=float("nan")), "chunk_budget_mb must be a"),
    (dict(moe_dense_router_grad_topm=3.0), "moe_dense_router_grad_topm must be an integer"),
    (dict(moe_dense_router_grad_topm=-1), "moe_dense_router_grad_topm must be an integer"),
    (dict(moe_dense_router_grad_token_fraction=0.0), "token_fraction must be in \\(0, 1\\]"),
    # Positive, but below the fp32 sampler's 2**-24 steps: kept at that rate, rescaled by 1/f.
    (dict(moe_dense_router_grad_token_fraction=1e-46), "at least 2\\*\\*-24"),
    (dict(moe_dense_router_grad_token_fraction=2.0**-25), "at least 2\\*\\*-24"),
    (dict(moe_dense_router_grad_token_fraction=1.5), "token_fraction must be in \\(0, 1\\]"),
    (dict(moe_dense_router_grad_token_fraction="0.5"), "token_fraction must be in \\(0, 1\\]"),
    (dict(moe_dense_router_grad_token_fraction=Fraction(1, 2)), "token_fraction must be in"),
    (dict(moe_dense_router_grad_chunk_budget_mb=10**400), "chunk_budget_mb must be a positive"),
    (dict(moe_router_topk=9), "moe_router_topk \\(9\\) must not exceed num_moe_experts \\(8\\)"),
]


@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[m[:40] for _, m in BAD_VALUES])
def test_bad_value_raises_with_flag_on_or_off(overrides, message, flag):
    """A bad option value raises at config time even with the flag off (a string "false"
    used to turn the flag on; chunk_size=1.5 used to fail inside the backward)."""
    overrides = {"moe_dense_router_grad": flag, **overrides}
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_bad_value_raises_on_plain_config():
    """validate_dense_router_grad checks attributes set on any config object (frameworks)."""
    cfg = copy.copy(make_config(moe_dense_router_grad=False))
    cfg.moe_dense_router_grad_chunk_size = 1.5
    with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
        validate_dense_router_grad(cfg)


GPU_ONLY_BAD = [
    (dict(fp8="hybrid"), "fp8/fp4 expert weights are not supported"),
    (dict(cuda_graph_impl="transformer_engine"), "cuda_graph_impl='transformer_engine'"),
    (dict(moe_latent_size=8), "moe_latent_size .* is not supported"),
]


@pytest.mark.parametrize("fields,message", GPU_ONLY_BAD, ids=[m[:30] for _, m in GPU_ONLY_BAD])
def test_bad_gpu_only_options_raise(fields, message):
    """Options whose Megatron validation needs TE/CUDA are checked on a valid config's copy,
    by the same validate_dense_router_grad that __post_init__ calls."""
    cfg = copy.copy(make_config())
    for name, value in fields.items():
        setattr(cfg, name, value)
    with pytest.raises(ValueError, match=message):
        validate_dense_router_grad(cfg)


@pytest.mark.parametrize(
    "scope, replays",
    [
        (CudaGraphScope.moe_router, True),
        (["full"], True),
        ("attn,moe_router", True),
        ([], True),
        (CudaGraphScope.attn, False),
        (["attn"], False),
        ("attn", False),
    ],
)
def test_replays_router_reads_every_scope_form(scope, replays):
    """A cuda_graph_scope assigned after the config was built keeps the form it was given (one
    scope, strings, a comma string): each is read as Megatron's __post_init__ would."""
    cfg = copy.copy(make_config())
    cfg.cuda_graph_impl, cfg.cuda_graph_scope = "transformer_engine", scope
    assert replays_router(cfg) is replays
