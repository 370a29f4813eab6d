"""DenseMixerMoELayer under EP, TP + SP and expert TP, recompute and routing replay, on CPU.

Every multi-rank case runs the same model on the same global batch as one rank does and must
reproduce that rank's output, input gradient, router gradient and expert gradients. The
parallel cases of one world size run one after another inside a single gloo world (one
process start-up per world size); their errors come back to the parent, where one test per
case checks them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_cpu import cached_world_runs, init_model_parallel, shard_moe_state_dict
from megatron_cpu.models import EXPERTS, HIDDEN, TOPK, build_dense_layer, build_moe_layer, rel_err
from tests.support import reference as ref
from tests.support.builders import parallel_config, reference_model, run_layer

SEQ, BATCH = 6, 4

# Norm-relative tolerance of every fp32 comparison with the single-rank run. The parallel run
# computes the same products; only the order of the sums differs (cross-rank all-reduces,
# expert-TP partial sums of fc2 and of G, the dispatchers' permutations). fp32's unit
# roundoff is 6e-8 and no entry here sums more than a few hundred terms, so honest results
# agree to ~1e-6; a token, expert or F-slice scored on the wrong rank or summed twice moves
# the norm by more than 1e-2.
TOL = 1e-5


# --------------------------------------------------------------------------------------
# Model, data and gradient reduction shared by the single- and multi-rank runs
# --------------------------------------------------------------------------------------
def global_batch():
    """x and g of the whole batch, [SEQ, BATCH, HIDDEN], identical in every process."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    g = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    return x, g


def finalize_grads(layer, config) -> None:
    """The gradient reductions of Megatron's DDP + finalize_model_grads, as plain sums.

    DDP.finish_grad_sync all-reduces expert params over the expert data-parallel group and
    every other param over the data-parallel group; then finalize_model_grads sums params
    marked ``sequence_parallel`` (the router weight under SP) over the tensor-parallel
    group, with Megatron's own function. Sums, not means, are right for loss = sum(y * g):
    they are what calculate_per_token_loss=True does, and averaging scales every grad by the
    same 1/dp.

    Expert params are picked by module here. megatron-core 0.16.1's DDP picks them by
    ``param.allreduce``, which its linears set to False only when EP > 1; with EP = 1 and
    expert TP != TP it would sum different F-slices over the data-parallel group (a
    conventional-MoE limitation, independent of this plugin).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads,
    )

    expert_params = {id(p) for p in layer.experts.parameters()}
    for param in layer.parameters():
        if id(param) in expert_params:
            group = ps.get_expert_data_parallel_group()
        else:
            group = ps.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(param.grad, group=group)

    class _Chunk:  # what finalize_model_grads unwraps: a DDP-like holder of the module
        def __init__(self, module):
            self.module, self.ddp_config = module, DistributedDataParallelConfig()

    _allreduce_non_tensor_model_parallel_grads(
        [_Chunk(layer)], config, ps.get_tensor_model_parallel_group()
    )


# --------------------------------------------------------------------------------------
# Multi-rank cases
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    world: int
    dispatcher: str
    tp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    recompute: Optional[str] = None  # None, "moe" (selective) or "full" (layer checkpoint)
    float64: bool = False  # also compare with the float64 reference
    # Unequal batch shares on the two data-parallel ranks (3 and 1 of BATCH), as packed or
    # dynamically batched sequences give; only the alltoall dispatcher accepts them.
    uneven: bool = False


def _cases() -> Dict[str, Case]:
    cases = {}
    for d in ("allgather", "alltoall"):
        cases[f"ep2_{d}"] = Case(2, d, ep=2)
        cases[f"tp2_sp_{d}"] = Case(2, d, tp=2)  # expert TP = TP = 2
        cases[f"etp2_tp1_{d}"] = Case(2, d, etp=2)
        cases[f"ep4_{d}"] = Case(4, d, ep=4)
        cases[f"ep2_tp2_sp_{d}"] = Case(4, d, tp=2, ep=2, float64=d == "alltoall")
        # Expert TP smaller than TP: the tp_ep group is the EP group alone.
        cases[f"ep2_tp2_sp_etp1_{d}"] = Case(4, d, tp=2, ep=2, etp=1)
        # Expert data parallelism: expert grads are summed over two EP replicas.
        cases[f"ep2_dp2_{d}"] = Case(4, d, ep=2)
        cases[f"etp2_ep2_tp1_{d}"] = Case(4, d, ep=2, etp=2)
    cases["ep2_alltoall_uneven"] = Case(2, "alltoall", ep=2, uneven=True)
    cases["etp2_tp1_alltoall_uneven"] = Case(2, "alltoall", etp=2, uneven=True)
    cases["ep2_tp2_sp_alltoall_uneven"] = Case(4, "alltoall", tp=2, ep=2, uneven=True)
    cases["ep2_alltoall_recompute_moe"] = Case(2, "alltoall", ep=2, recompute="moe")
    cases["ep2_allgather_recompute_full"] = Case(2, "allgather", ep=2, recompute="full")
    cases["ep2_tp2_sp_alltoall_recompute_moe"] = Case(4, "alltoall", tp=2, ep=2, recompute="moe")
    return cases


CASES = _cases()


def _single_rank(dispatcher: str) -> dict:
    """The whole batch through one rank's model (no parallelism): the expected values."""
    init_model_parallel(tp=1, ep=1)
    config = parallel_config(dispatcher)
    torch.manual_seed(0)
    layer = build_dense_layer(config)
    x, g = global_batch()
    y, dx, grads = run_layer(layer, x, g, zero_missing_grads=True)
    conventional = build_moe_layer(dataclasses.replace(config, moe_dense_router_grad=False))
    conventional.load_state_dict(layer.state_dict(), strict=True)
    _, _, grads_conv = run_layer(conventional, x, g, zero_missing_grads=True)
    return dict(
        config=config,
        layer=layer,
        state_dict={
            k: v.detach().clone() if isinstance(v, torch.Tensor) else v  # _extra_state: None
            for k, v in layer.state_dict().items()
        },
        y=y,
        dx=dx,
        grads=grads,
        router_grad_conventional=grads_conv["router.weight"],
    )


def _local_tokens(tensor: torch.Tensor, config, uneven: bool = False) -> torch.Tensor:
    """This rank's share of a [SEQ, BATCH, H] tensor: its DP batch slice and, under SP, its
    TP sequence slice (the layout Megatron's data loader and SP scatter produce)."""
    from megatron.core import parallel_state as ps

    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if uneven:
        assert dp_size == 2, "uneven cases split the batch 3:1 over two data-parallel ranks"
        tensor = tensor.split([3, BATCH - 3], dim=1)[dp_rank]
    else:
        tensor = tensor.chunk(dp_size, dim=1)[dp_rank]
    if config.sequence_parallel:
        tp_size = ps.get_tensor_model_parallel_world_size()
        tensor = tensor.chunk(tp_size, dim=0)[ps.get_tensor_model_parallel_rank()]
    return tensor


def _check_case(case: Case, expected: dict) -> Dict[str, float]:
    """Runs one case on every rank; returns this rank's errors against ``expected``."""
    from megatron.core import parallel_state as ps

    init_model_parallel(tp=case.tp, ep=case.ep, etp=case.etp)
    overrides = {}
    if case.recompute == "moe":
        overrides = dict(recompute_granularity="selective", recompute_modules=["moe"])
    config = parallel_config(case.dispatcher, tp=case.tp, ep=case.ep, etp=case.etp, **overrides)
    layer = build_dense_layer(config)
    shard = dict(
        num_experts=EXPERTS,
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        gated_linear_unit=True,
    )
    layer.load_state_dict(shard_moe_state_dict(expected["state_dict"], **shard), strict=True)

    x, g = global_batch()

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return _local_tokens(tensor, config, case.uneven)

    y, dx, grads = run_layer(
        layer, local(x), local(g), case.recompute == "full", zero_missing_grads=True
    )
    for name, param in layer.named_parameters():
        param.grad = grads[name]
    finalize_grads(layer, config)

    expected_experts = shard_moe_state_dict(expected["grads"], **shard)
    expert_names = [n for n, _ in layer.named_parameters() if n.startswith("experts.")]
    errors = {
        "output": rel_err(y, local(expected["y"])),
        "input_grad": rel_err(dx, local(expected["dx"])),
        "router_grad": rel_err(layer.router.weight.grad, expected["grads"]["router.weight"]),
        "expert_grads": rel_err(
            torch.cat([layer.get_parameter(n).grad.flatten() for n in expert_names]),
            torch.cat([expected_experts[n].flatten() for n in expert_names]),
        ),
        # Guards the test itself: without a visible dense term a dropped dense gradient
        # would pass.
        "dense_term": rel_err(
            expected["router_grad_conventional"], expected["grads"]["router.weight"]
        ),
        # TokenRing places expert-TP partials and EP blocks by tp_ep group rank,
        # assuming rank = ep_rank * etp + etp_rank (as Megatron's dispatchers do).
        "tp_ep_order": float(
            dist.get_rank(ps.get_expert_tensor_and_model_parallel_group())
            != shard["ep_rank"] * shard["etp_size"] + shard["etp_rank"]
        ),
    }
    if case.float64:
        single = expected["layer"]
        r = ref.Routing(topk=TOPK)
        result = ref.reference(
            reference_model(single, expected["config"]),
            x.reshape(-1, HIDDEN),
            g.reshape(-1, HIDDEN),
            r,
            dense=True,
        )
        shape = (SEQ, BATCH, HIDDEN)
        errors["float64_output"] = rel_err(y, local(result.y.reshape(shape)))
        errors["float64_input_grad"] = rel_err(dx, local(result.d_x.reshape(shape)))
        errors["float64_router_grad"] = rel_err(layer.router.weight.grad, result.d_router_w)
    return errors


def _run_world(rank: int, world_size: int, names: List[str], out_path: str) -> None:
    """Runs ``names`` in this world; rank 0 writes {case: {quantity: max error over ranks}}."""
    expected, results = {}, {}
    for name in names:
        case = CASES[name]
        if case.dispatcher not in expected:
            expected[case.dispatcher] = _single_rank(case.dispatcher)
        results[name] = _check_case(case, expected[case.dispatcher])
    everyone = [None] * world_size
    dist.all_gather_object(everyone, results)
    if rank == 0:
        merged = {
            name: {q: max(r[name][q] for r in everyone) for q in results[name]} for name in names
        }
        with open(out_path, "w") as f:
            json.dump(merged, f)


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    """Runs each world size's cases once (lazily) and returns their errors by case name."""
    return cached_world_runs(
        _run_world,
        {name: case.world for name, case in CASES.items()},
        lambda: str(tmp_path_factory.mktemp("parallel")),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_matches_single_rank(name, world_results):
    """Output, input grad, router grad (after Megatron's DP/SP reductions) and each rank's
    expert-grad shard equal a single-rank run of the same model and batch.

    Guards against the dense backward's gather / all-to-all misplacing tokens or experts,
    double-counting expert-TP partial scores, scoring only local tokens, or assuming equal
    token counts per rank, under every EP / TP+SP / expert-TP layout, both dispatchers, and
    MoE or full-layer recompute.
    Tolerance: TOL (1e-5 norm-relative, see its comment).
    """
    errors = world_results(CASES[name].world)[name]
    assert errors["tp_ep_order"] == 0.0, "tp_ep group is not ordered EP-major, ETP-minor"
    assert errors["dense_term"] > 1e-2, "the dense router term must be visible in this batch"
    for quantity in ("output", "input_grad", "router_grad", "expert_grads"):
        assert errors[quantity] < TOL, f"{quantity}: norm-relative error {errors[quantity]:.3g}"
    for quantity in ("float64_output", "float64_input_grad", "float64_router_grad"):
        if quantity in errors:
            # fp32 against float64 math: the same 1e-5 as test_moe_layer's reference checks.
            assert errors[quantity] < TOL, f"{quantity}: {errors[quantity]:.3g}"


# --------------------------------------------------------------------------------------
# Single-rank recompute and routing replay
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("recompute", ["moe", "full"])
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_recompute_gives_the_same_gradients(fresh_model_parallel, dispatcher, recompute):
    """MoE activation recompute and full-layer recompute give bitwise the gradients of a plain
    run. Guards the dense backward against the recompute's two forwards: the first runs under
    no_grad (so must not stash dense probs), the second must attach the dense gradient."""
    config = parallel_config(dispatcher)
    torch.manual_seed(0)
    plain = build_dense_layer(config)
    if recompute == "moe":
        config = parallel_config(
            dispatcher, recompute_granularity="selective", recompute_modules=["moe"]
        )
    recomputed = build_dense_layer(config)
    recomputed.load_state_dict(plain.state_dict(), strict=True)
    assert recomputed.moe_layer_recompute == (recompute == "moe")
    x, g = global_batch()
    y, dx, grads = run_layer(plain, x, g, zero_missing_grads=True)
    y_re, dx_re, grads_re = run_layer(
        recomputed, x, g, full_recompute=recompute == "full", zero_missing_grads=True
    )
    assert torch.equal(y, y_re) and torch.equal(dx, dx_re)
    for name in grads:
        assert torch.equal(grads[name], grads_re[name]), name


def _random_selection(num_tokens: int, seed: int) -> torch.Tensor:
    """TOPK distinct random experts per token, as indices [num_tokens, TOPK]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, EXPERTS, generator=gen).argsort(dim=-1)[:, :TOPK]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_routing_replay(fresh_model_parallel, score_function, recompute):
    """With moe_enable_routing_replay, K is the replayed set, the forward and expert grads are
    a conventional MoELayer's under the same replay (bitwise), and the router and input grads
    are the float64 reference's with that K forced.

    Guards against the dense weights being built from a recomputed top-k instead of the
    replayed one, in the forward (REPLAY_FORWARD) and in the MoE recompute of the backward
    (REPLAY_BACKWARD, which pops the indices again).
    """
    kw = dict(moe_router_score_function=score_function, moe_enable_routing_replay=True)
    if recompute:
        kw.update(recompute_granularity="selective", recompute_modules=["moe"])
    config = parallel_config("alltoall", **kw)
    RouterReplay.clear_global_router_replay_instances()
    try:
        torch.manual_seed(0)
        dense = build_dense_layer(config)
        conventional = build_moe_layer(dataclasses.replace(config, moe_dense_router_grad=False))
        assert type(conventional) is MoELayer
        conventional.load_state_dict(dense.state_dict(), strict=True)
        x, g = global_batch()
        num_tokens = SEQ * BATCH
        indices = _random_selection(num_tokens, seed=7)
        forced = torch.zeros(num_tokens, EXPERTS, dtype=torch.bool).scatter_(1, indices, True)

        seen = []
        hook = dense.router.register_forward_hook(lambda m, a, out: seen.append(out[1].clone()))
        results = {}
        for name, layer in (("dense", dense), ("conventional", conventional)):
            # Queues the indices for REPLAY_FORWARD and once for REPLAY_BACKWARD, which the
            # MoE recompute in the backward pops.
            layer.router.router_replay.set_target_indices(indices)
            layer.router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            layer.zero_grad(set_to_none=True)
            x_leaf = x.clone().requires_grad_(True)
            y, _ = layer(x_leaf)
            layer.router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
            y.backward(g)
            grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
            results[name] = (y.detach(), x_leaf.grad, grads)
        hook.remove()
    finally:
        RouterReplay.clear_global_router_replay_instances()

    # Every routing of the dense layer (the forward, and the recompute's) used K.
    assert len(seen) == (2 if recompute else 1)
    for routing_map in seen:
        assert torch.equal(routing_map, forced)
    y, dx, grads = results["dense"]
    y_conv, _, grads_conv = results["conventional"]
    assert torch.equal(y, y_conv), "the forward must be plain replay's, bitwise"
    for name, grad in grads_conv.items():
        if not name.startswith("router."):
            assert torch.equal(grads[name], grad), name

    routing = ref.Routing(score_function=score_function, topk=TOPK)
    model = reference_model(dense, config)
    x2d, g2d = x.reshape(-1, HIDDEN), g.reshape(-1, HIDDEN)
    expected = ref.reference(model, x2d, g2d, routing, dense=True, forced_selection=forced)
    natural = ref.reference(model, x2d, g2d, routing, dense=True)
    expected_conv = ref.reference(model, x2d, g2d, routing, dense=False, forced_selection=forced)
    # The replayed K must differ from the natural top-k, or replay would not be exercised.
    assert not torch.equal(natural.selected, forced)
    assert rel_err(expected.d_router_w, natural.d_router_w) > 1e-2
    assert rel_err(expected.d_router_w, expected_conv.d_router_w) > 1e-2
    # Tolerance as in test_moe_layer: fp32 vs float64, 1e-5 norm-relative.
    assert rel_err(y.reshape(x2d.shape), expected.y) < 1e-6
    assert rel_err(grads["router.weight"], expected.d_router_w) < 1e-5
    assert rel_err(grads_conv["router.weight"], expected_conv.d_router_w) < 1e-5
    assert rel_err(dx.reshape(x2d.shape), expected.d_x) < 1e-5
