"""DenseMixerTopKRouter: the dense weights, and token dropping against the float64 reference.

With ``moe_expert_capacity_factor`` the selected set K is the top-k pairs that survived
capacity; a dropped pair is non-selected with S, the top-k sum before dropping, that
Megatron divides the kept weights by; the padding pairs that
``moe_pad_expert_input_to_capacity`` adds to the routing map are not selected either.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_cpu import init_model_parallel, run_distributed, shard_moe_state_dict
from megatron_cpu.models import (
    EXPERTS,
    HIDDEN,
    TOPK,
    build_dense_layer,
    build_moe_layer,
    build_pair,
    make_config,
    rel_err,
)
from megatron_densemixer.router import dense_router_probs
from tests.support import reference as ref
from tests.support.builders import parallel_config, reference_model, reference_routing, run_layer

pytestmark = pytest.mark.usefixtures("model_parallel")

SEQ, BATCH = 6, 2
# 12 tokens x top-2 over 8 experts at 0.75: capacity 3 per expert, which drops pairs (and,
# under the "position" policy, whole tokens) and leaves some experts short of capacity, so
# pad-to-capacity adds padding pairs. Each test checks that what it needs occurs.
CAPACITY_FACTOR = 0.75
# fp32 against float64 math, as in test_moe_layer: 1e-5 norm-relative (fp32 unit roundoff
# 6e-8; every entry is a few hundred fp32 operations deep). A dropped or padding pair given
# the wrong treatment moves the router gradient by more than 1e-2 here.
TOL = 1e-5


def dropping(policy: str, pad: bool) -> dict:
    """The config fields of one token-dropping setting."""
    return dict(
        moe_expert_capacity_factor=CAPACITY_FACTOR,
        moe_token_drop_policy=policy,
        moe_pad_expert_input_to_capacity=pad,
    )


def capture_router_output(layer) -> tuple[dict, object]:
    """Keeps the router's last (probs, routing_map), detached; returns (store, hook handle)."""
    seen = {}

    def hook(module, args, output):
        seen["probs"], seen["routing_map"] = (t.detach().clone() for t in output)

    return seen, layer.router.register_forward_hook(hook)


def reference_kept(
    policy: str, top: torch.Tensor, weights: torch.Tensor, routing_map: torch.Tensor
) -> torch.Tensor:
    """The kept top-k pairs of one rank's tokens, checked against the rules of ``policy``.

    "probs": the reference's own choice (each expert keeps its highest-weight tokens), which
    must equal the forward's. "position": which of an expert's tokens Megatron keeps is
    torch.topk's choice among equal entries, not a rule the reference can restate, so the
    forward's kept set is taken after checking it is one the policy allows (a subset of the
    top-k holding min(capacity, demand) tokens per expert).

    Args:
        top: The reference's top-k set, bool [tokens, experts].
        weights: The reference's top-k weights before dropping, float64 [tokens, experts].
        routing_map: Megatron's routing map after dropping (and padding), bool.
    """
    capacity = ref.expert_capacity(top.shape[0], TOPK, EXPERTS, CAPACITY_FACTOR)
    observed = routing_map & top
    if policy == "probs":
        kept = ref.keep_by_probs(weights, capacity)
        assert torch.equal(observed, kept), "the forward kept other pairs than the probs policy"
        return kept
    demand = top.sum(dim=0).clamp(max=capacity)
    assert torch.equal(observed.sum(dim=0), demand), "not a legal position-policy drop"
    return observed


# --------------------------------------------------------------------------------------
# dense_router_probs on its own
# --------------------------------------------------------------------------------------
def test_dense_router_probs_with_dropped_and_padding_pairs():
    """w_e = c s_e / S_T off K, 0 on K, with S summed over the top-k before dropping.

    Token 0: top-k {0, 1}, expert 1 dropped, expert 3 a padding pair (in the routing map,
    not selected). Token 1: both top-k pairs dropped (S is still their sum). Token 2: empty
    top-k (no dense term). Guards against S summed over K only, padding pairs counted as
    selected, and fully dropped tokens losing the dense term. Exact formulas in float64:
    tolerance 1e-12.
    """
    config = make_config(moe_router_topk_scaling_factor=2.0, **dropping("probs", True))
    logits = torch.randn(
        3, EXPERTS, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    top = torch.zeros(3, EXPERTS, dtype=torch.bool)
    top[0, [0, 1]] = top[1, [2, 5]] = True
    selected = torch.zeros_like(top)
    selected[0, 0] = True
    dense = dense_router_probs(logits, selected, config, topk_map=top)

    s = torch.softmax(logits, dim=-1)
    expected = torch.zeros_like(s)
    for t in range(2):
        S = sum(s[t, e] for e in range(EXPERTS) if top[t, e])
        for e in range(EXPERTS):
            if not selected[t, e]:
                expected[t, e] = 2.0 * s[t, e] / S
    assert torch.allclose(dense, expected, rtol=1e-12, atol=0)
    # Without topk_map, S would be token 0's kept sum: the dropped pair changes S.
    assert not torch.allclose(dense_router_probs(logits, selected, config)[0], expected[0])


# --------------------------------------------------------------------------------------
# One rank: both drop policies, with and without pad-to-capacity
# --------------------------------------------------------------------------------------
DROP_CASES = {
    "probs": dropping("probs", False),
    "probs_pad": dropping("probs", True),
    "position": dropping("position", False),
    "position_pad": dropping("position", True),
    "probs_pad_sigmoid_expert_bias": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        **dropping("probs", True),
    ),
    "position_pad_pre_softmax_scaling": dict(
        moe_router_pre_softmax=True,
        moe_router_topk_scaling_factor=2.5,
        **dropping("position", True),
    ),
    "probs_pad_gated_variant": dict(
        moe_dense_router_grad_variant="gated", **dropping("probs", True)
    ),
    "probs_pad_alltoall": dict(moe_token_dispatcher_type="alltoall", **dropping("probs", True)),
}


@pytest.mark.parametrize("case", list(DROP_CASES))
def test_token_dropping_matches_reference(case):
    """Under token dropping the forward and expert grads stay bitwise conventional, and the
    router and input grads are the float64 reference's with K = the kept top-k pairs.

    Guards against a dropped pair losing its dense term or getting S summed over the kept
    pairs only, against Megatron's padding pairs being taken as selected (they would lose
    their dense term), and against the wrong pairs being treated as kept.
    Tolerance: TOL (1e-5, fp32 against float64).
    """
    overrides = DROP_CASES[case]
    config = make_config(**overrides)
    dense, conventional = build_pair(config)
    torch.manual_seed(1)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    g = torch.randn(SEQ, BATCH, HIDDEN)

    seen, handle = capture_router_output(dense)
    y, dx, grads = run_layer(dense, x, g)
    handle.remove()
    y_conv, _, grads_conv = run_layer(conventional, x, g)
    assert torch.equal(y, y_conv), "the forward value must be the conventional one, bitwise"
    for name, grad in grads_conv.items():
        if not name.startswith("router."):
            assert torch.equal(grads[name], grad), f"{name} must keep its conventional grad"

    model, routing = reference_model(dense, config), reference_routing(dense, config)
    x2d, g2d = x.reshape(-1, HIDDEN), g.reshape(-1, HIDDEN)
    undropped = ref.reference(model, x2d, g2d, routing, dense=True)
    top = undropped.selected
    policy = overrides["moe_token_drop_policy"]
    kept = reference_kept(policy, top, undropped.extras["weights"], seen["routing_map"])
    expected = ref.reference(model, x2d, g2d, routing, dense=True, kept=kept)
    expected_conv = ref.reference(model, x2d, g2d, routing, dense=False, kept=kept)

    # The case exercises what it claims: pairs dropped, padding pairs where padded.
    assert (top & ~kept).any(), "no pair was dropped"
    padding = seen["routing_map"] & ~top
    assert padding.any() == overrides["moe_pad_expert_input_to_capacity"]
    assert torch.all(seen["probs"][padding] == 0)
    assert rel_err(expected.d_router_w, expected_conv.d_router_w) > 1e-2

    assert rel_err(y.reshape(x2d.shape), expected.y) < TOL
    assert rel_err(grads_conv["router.weight"], expected_conv.d_router_w) < TOL
    assert rel_err(grads["router.weight"], expected.d_router_w) < TOL
    assert rel_err(dx.reshape(x2d.shape), expected.d_x) < TOL


def test_fully_dropped_tokens_keep_the_dense_term():
    """A token whose every top-k pair was dropped has no output, yet each expert adds
    c G_e / S to its router gradient, S being its top-k sum (DESIGN section 6).

    Guards against such rows being zeroed like tokens with an empty top-k. Checks that the
    case occurs, then the router gradient restricted to those tokens (loss gradient g only on
    them) against the float64 reference. Tolerance: TOL.
    """
    config = make_config(**dropping("position", False))
    dense = build_dense_layer(config, seed=0)
    torch.manual_seed(1)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    g = torch.randn(SEQ, BATCH, HIDDEN)
    seen, handle = capture_router_output(dense)
    with torch.no_grad():
        dense(x)
    handle.remove()
    model, routing = reference_model(dense, config), reference_routing(dense, config)
    x2d = x.reshape(-1, HIDDEN)
    top = ref.reference(model, x2d, g.reshape(-1, HIDDEN), routing, dense=True).selected
    fully_dropped = ~seen["routing_map"].any(dim=-1)
    assert fully_dropped.any(), "no token lost all its pairs at this capacity"
    g_only = (g.reshape(-1, HIDDEN) * fully_dropped.unsqueeze(1)).reshape(g.shape)

    _, _, grads = run_layer(dense, x, g_only)
    expected = ref.reference(
        model, x2d, g_only.reshape(-1, HIDDEN), routing, dense=True, kept=seen["routing_map"] & top
    )
    assert expected.d_router_w.norm() > 0
    assert rel_err(grads["router.weight"], expected.d_router_w) < TOL


def test_routing_replay_with_dropping(fresh_model_parallel):
    """Routing replay and token dropping together: the replayed top-k sets S, capacity drops
    from it, and the router keeps its own RouterReplay afterwards.

    Guards the router's temporary stand-in for ``router_replay`` (which records the top-k
    before dropping): it must pass the replayed indices through and restore the attribute.
    Tolerance: TOL.
    """
    config = make_config(moe_enable_routing_replay=True, **dropping("probs", True))
    RouterReplay.clear_global_router_replay_instances()
    try:
        dense = build_dense_layer(config, seed=0)
        replay = dense.router.router_replay
        num_tokens = SEQ * BATCH
        gen = torch.Generator().manual_seed(7)
        indices = torch.rand(num_tokens, EXPERTS, generator=gen).argsort(dim=-1)[:, :TOPK]
        forced = torch.zeros(num_tokens, EXPERTS, dtype=torch.bool).scatter_(1, indices, True)
        replay.set_target_indices(indices)
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        torch.manual_seed(1)
        x = torch.randn(SEQ, BATCH, HIDDEN)
        g = torch.randn(SEQ, BATCH, HIDDEN)
        seen, handle = capture_router_output(dense)
        _, dx, grads = run_layer(dense, x, g)
        handle.remove()
        assert dense.router.router_replay is replay
    finally:
        RouterReplay.clear_global_router_replay_instances()

    model, routing = reference_model(dense, config), reference_routing(dense, config)
    x2d, g2d = x.reshape(-1, HIDDEN), g.reshape(-1, HIDDEN)
    undropped = ref.reference(model, x2d, g2d, routing, dense=True, forced_selection=forced)
    assert torch.equal(undropped.selected, forced)
    kept = reference_kept("probs", forced, undropped.extras["weights"], seen["routing_map"])
    assert (forced & ~kept).any()
    expected = ref.reference(
        model, x2d, g2d, routing, dense=True, forced_selection=forced, kept=kept
    )
    assert rel_err(grads["router.weight"], expected.d_router_w) < TOL
    assert rel_err(dx.reshape(x2d.shape), expected.d_x) < TOL


# --------------------------------------------------------------------------------------
# EP=2 with the all-to-all dispatcher
# --------------------------------------------------------------------------------------
EP_CASES = {
    "probs_pad": ("probs", True),
    "position": ("position", False),
}
EP_BATCH = 4  # two sequences per data-parallel (= expert-parallel) rank


def _ep_case(policy: str, pad: bool) -> dict:
    """One EP=2 case on this rank: errors against the reference and the conventional layer."""
    from megatron.core import parallel_state as ps

    kw = dropping(policy, pad)
    init_model_parallel(tp=1, ep=1)
    single = build_dense_layer(parallel_config("alltoall", **kw), seed=0)
    state = {  # _extra_state entries are None
        k: v.detach().clone() if isinstance(v, torch.Tensor) else v
        for k, v in single.state_dict().items()
    }
    init_model_parallel(tp=1, ep=2)
    config = parallel_config("alltoall", ep=2, **kw)
    model, routing = reference_model(single, config), reference_routing(single, config)
    dense = build_dense_layer(config)
    rank = ps.get_expert_model_parallel_rank()
    dense.load_state_dict(
        shard_moe_state_dict(state, num_experts=EXPERTS, ep_size=2, ep_rank=rank), strict=True
    )
    conventional = build_moe_layer(dataclasses.replace(config, moe_dense_router_grad=False))
    conventional.load_state_dict(dense.state_dict(), strict=True)

    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(SEQ, EP_BATCH, HIDDEN, generator=gen)
    g = torch.randn(SEQ, EP_BATCH, HIDDEN, generator=gen)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    # This rank's tokens in the global [SEQ * EP_BATCH] order.
    local = torch.arange(SEQ * EP_BATCH).reshape(SEQ, EP_BATCH).chunk(dp_size, dim=1)[dp_rank]
    local = local.reshape(-1)

    seen, handle = capture_router_output(dense)
    y, dx, grads = run_layer(dense, *(t.chunk(dp_size, dim=1)[dp_rank] for t in (x, g)))
    handle.remove()
    y_conv, _, grads_conv = run_layer(
        conventional, *(t.chunk(dp_size, dim=1)[dp_rank] for t in (x, g))
    )
    router_grad = grads["router.weight"].clone()
    dist.all_reduce(router_grad, group=ps.get_data_parallel_group())

    x2d, g2d = x.reshape(-1, HIDDEN), g.reshape(-1, HIDDEN)
    undropped = ref.reference(model, x2d, g2d, routing, dense=True)
    # Capacity is per rank (each rank's router drops among its own tokens).
    local_kept = reference_kept(
        policy,
        undropped.selected[local],
        undropped.extras["weights"][local],
        seen["routing_map"],
    )
    everyone = [torch.empty_like(local_kept) for _ in range(dp_size)]
    dist.all_gather(everyone, local_kept, group=ps.get_data_parallel_group())
    kept = torch.zeros_like(undropped.selected)
    for r, block in enumerate(everyone):
        owned = torch.arange(SEQ * EP_BATCH).reshape(SEQ, EP_BATCH).chunk(dp_size, dim=1)[r]
        kept[owned.reshape(-1)] = block
    expected = ref.reference(model, x2d, g2d, routing, dense=True, kept=kept)
    expected_conv = ref.reference(model, x2d, g2d, routing, dense=False, kept=kept)
    expert_names = [n for n in grads if n.startswith("experts.")]
    return {
        "dropped": float((undropped.selected & ~kept).sum()),
        "padding": float((seen["routing_map"] & ~undropped.selected[local]).sum()),
        "dense_term": rel_err(expected_conv.d_router_w, expected.d_router_w),
        "output_vs_conventional": float(not torch.equal(y, y_conv)),
        "expert_grads_vs_conventional": float(
            not all(torch.equal(grads[n], grads_conv[n]) for n in expert_names)
        ),
        "output": rel_err(y.reshape(-1, HIDDEN), expected.y[local]),
        "input_grad": rel_err(dx.reshape(-1, HIDDEN), expected.d_x[local]),
        "router_grad": rel_err(router_grad, expected.d_router_w),
    }


def _ep_world(rank: int, world_size: int, out_path: str) -> None:
    """Runs every EP case; rank 0 writes {case: {quantity: max over ranks}}."""
    results = {name: _ep_case(*args) for name, args in EP_CASES.items()}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(
                {n: {q: max(r[n][q] for r in everyone) for q in results[n]} for n in results}, f
            )


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory) -> dict:
    """The EP=2 cases' errors, from one two-rank gloo world."""
    path = str(tmp_path_factory.mktemp("dropping") / "ep2.json")
    run_distributed(_ep_world, 2, path)
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("name", list(EP_CASES))
def test_token_dropping_ep2_alltoall(name, ep_results):
    """EP=2, all-to-all dispatcher, token dropping: the output and expert grads equal a
    conventional MoELayer's on the same ranks (bitwise), and the output, input grad and the
    data-parallel-summed router grad equal the float64 reference with each rank's kept set.

    Guards the kept/top-k bookkeeping across the dispatcher's drop-and-pad path and the
    dense backward's token exchange. Tolerance: TOL.
    """
    errors = ep_results[name]
    assert errors["dropped"] > 0, "no pair was dropped"
    assert (errors["padding"] > 0) == EP_CASES[name][1]
    assert errors["dense_term"] > 1e-2
    assert errors["output_vs_conventional"] == 0.0
    assert errors["expert_grads_vs_conventional"] == 0.0
    for quantity in ("output", "input_grad", "router_grad"):
        assert errors[quantity] < TOL, f"{quantity}: norm-relative error {errors[quantity]:.3g}"
