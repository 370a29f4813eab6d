"""The EMA estimator (moe_dense_router_grad_estimator="ema") against naive float64 loops.

The table A is checked against a loop over steps, experts and tokens that calls the float64
reference experts one token at a time; the router gradient against the float64 conventional
reference plus the dense term written out per token with <g_t, A_j> in place of G_j.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

from megatron_cpu import (
    init_model_parallel,
    install_grouped_gemm_fallback,
    run_distributed,
    shard_moe_state_dict,
)
from megatron_cpu.models import (
    EXPERTS,
    HIDDEN,
    build_dense_layer,
    build_moe_layer,
    build_pair,
    make_config,
    rel_err,
)
from megatron_densemixer import compat, densemixer_spec
from megatron_densemixer.ema import expert_output_sums
from megatron_densemixer.integrations.megatron_lm import extra_args_provider
from tests.support import reference as ref
from tests.support.builders import parallel_config, reference_model, reference_routing, run_layer

pytestmark = pytest.mark.usefixtures("model_parallel")

f64 = torch.float64
# fp32 layer against float64 math: the same 1e-5 norm-relative tolerance as test_moe_layer
# (fp32 unit roundoff 6e-8; every entry is at most a few hundred fp32 operations deep).
TOL = 1e-5


def ema_config(**overrides):
    return make_config(moe_dense_router_grad_estimator="ema", **overrides)


def capture_routing(layer) -> tuple[List[torch.Tensor], object]:
    """The routing map of every router call, and the hook handle."""
    seen: List[torch.Tensor] = []
    handle = layer.router.register_forward_hook(
        lambda module, args, output: seen.append(output[1].detach().clone())
    )
    return seen, handle


def naive_tables(model: ref.Model, xs, selections, decay: float):
    """A and the update counts after each step, one token and one expert at a time, float64.

    The rule of DESIGN section 6: an expert's first batch sets A_e to the mean of its outputs,
    later batches blend it in with ``decay``, a step where no token selected e leaves A_e.
    Also returns which rules the steps went through, so a test can check it covered them.
    """
    num_experts = len(model.experts)
    table = torch.zeros(num_experts, HIDDEN, dtype=f64)
    updates = [0] * num_experts
    history = []
    events = {"first_after_step_1": False, "skipped_after_seen": False, "unseen": False}
    for step, (x, selected) in enumerate(zip(xs, selections, strict=True)):
        x = x.reshape(-1, HIDDEN).double()
        for e in range(num_experts):
            outputs = [
                model.experts[e](x[t], model.act, model.glu)
                for t in range(x.shape[0])
                if selected[t, e]
            ]
            if not outputs:
                events["skipped_after_seen"] |= updates[e] > 0
                continue
            mean = sum(outputs) / len(outputs)
            if updates[e] == 0:
                events["first_after_step_1"] |= step > 0
                table[e] = mean
            else:
                table[e] = decay * table[e] + (1 - decay) * mean
            updates[e] += 1
        events["unseen"] |= 0 in updates
        history.append((table.clone(), list(updates)))
    return history, events


def naive_dense_term(x, g, z, selected, table, routing: ref.Routing, router_w):
    """The dense part of dL/dW_r and of dL/dx with <g_t, A_j> for G_j, token by token.

    dL/ds_j = c <g, A_j> / S (partscale), c (<g, A_j> - sum_{e in K} (s_e / S) <g, A_e>) / S
    (gated), or c <g, A_j> (not renormalised), for j not in K; then the score function's
    Jacobian, dW_r = dz^T x and dx = dz W_r.
    """
    x, g, z = x.double(), g.double(), z.double()
    c = routing.scaling_factor or 1.0
    eps = 0.0 if routing.score_function == "softmax" else 1e-20
    dz = torch.zeros_like(z)
    for t in range(x.shape[0]):
        if routing.score_function == "softmax":
            s = torch.softmax(z[t], -1)
        else:
            s = torch.sigmoid(z[t])
        K = selected[t].nonzero()[:, 0].tolist()
        if not K:
            continue
        S = sum(s[e] for e in K) + eps
        G = [float(g[t] @ table[j]) for j in range(len(s))]
        baseline = sum(s[e] / S * G[e] for e in K)
        ds = torch.zeros_like(s)
        for j in range(len(s)):
            if j in K:
                continue
            if not routing.renormalised:
                ds[j] = c * G[j]
            elif routing.variant == "gated":
                ds[j] = c * (G[j] - baseline) / S
            else:
                ds[j] = c * G[j] / S
        if routing.score_function == "softmax":
            dz[t] = s * (ds - (s * ds).sum())
        else:
            dz[t] = ds * s * (1 - s)
    return dz.T @ x, dz @ router_w


CASES = {
    "softmax_partscale": {},
    "softmax_gated": dict(moe_dense_router_grad_variant="gated"),
    "softmax_pre_softmax": dict(moe_router_pre_softmax=True),
    "sigmoid_scaling_gated": dict(
        moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=2.0,
        moe_dense_router_grad_variant="gated",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_table_and_router_grad_match_naive_loops(case):
    """Three training forwards (2, 12 and 2 tokens) against the float64 loops.

    Guards the update rule (first batch sets A_e, later ones blend with decay, an expert no
    token selected keeps its entry, a never-selected one stays 0), the division of the
    experts' weighted outputs by their probs, and the backward's use of the table: router
    and input gradients = float64 conventional reference + the <g, A>-based dense term.
    Forward and expert gradients stay bitwise conventional. Tolerance TOL (see its comment).
    """
    decay = 0.75
    config = ema_config(moe_dense_router_grad_ema_decay=decay, **CASES[case])
    layer, conventional = build_pair(config)
    gen = torch.Generator().manual_seed(5)
    shapes = [(2, 1), (6, 2), (1, 2)]
    xs = [torch.randn(s, b, HIDDEN, generator=gen) for s, b in shapes]
    gs = [torch.randn(s, b, HIDDEN, generator=gen) for s, b in shapes]

    seen, handle = capture_routing(layer)
    ema = layer.dense_router_grad_ema
    tables = []
    for x, g in zip(xs, gs, strict=True):
        y, dx, grads = run_layer(layer, x, g)
        tables.append((ema.table.clone(), ema.updates.tolist()))
    handle.remove()
    y_conv, dx_conv, grads_conv = run_layer(conventional, xs[-1], gs[-1])

    model = reference_model(layer, config)
    history, events = naive_tables(model, xs, seen, decay)
    assert all(events.values()), f"the steps must exercise every rule: {events}"
    for step, ((table, updates), (expected, expected_updates)) in enumerate(
        zip(tables, history, strict=True)
    ):
        assert updates == expected_updates, f"step {step}"
        assert rel_err(table, expected) < TOL, f"step {step}"
        unseen = torch.tensor(updates) == 0
        assert torch.equal(table[unseen], torch.zeros_like(table[unseen])), "unseen must be 0"
    expected = history[-1][0]

    assert torch.equal(y, y_conv), "the forward value must be the conventional one, bitwise"
    for name, grad in grads_conv.items():
        if not name.startswith("router."):
            assert torch.equal(grads[name], grad), f"{name} must keep its conventional grad"

    routing = reference_routing(layer, config)
    x2d, g2d = xs[-1].reshape(-1, HIDDEN), gs[-1].reshape(-1, HIDDEN)
    conv_ref = ref.reference(model, x2d, g2d, routing, dense=False)
    z = x2d.double() @ model.router_w.T
    d_w, d_x = naive_dense_term(x2d, g2d, z, seen[-1], expected, routing, model.router_w)
    # Without a visible dense term a dropped one would pass.
    assert rel_err(conv_ref.d_router_w + d_w, conv_ref.d_router_w) > 1e-2
    assert rel_err(grads["router.weight"], conv_ref.d_router_w + d_w) < TOL
    assert rel_err(dx.reshape(x2d.shape), conv_ref.d_x + d_x) < TOL


def test_expert_output_sums_skip_zero_weight_rows():
    """Rows of zero weight (quantization padding, an underflowed prob) are left out.

    Against a loop over rows; exact in float64 (one division and a few additions per entry).
    """
    gen = torch.Generator().manual_seed(0)
    unweighted = torch.randn(7, 4, generator=gen, dtype=f64)
    probs = torch.tensor([0.5, 0.0, 0.25, 1.0, 0.0, 0.125, 2.0], dtype=f64)
    tokens_per_expert = torch.tensor([3, 0, 4])
    sums, counts = expert_output_sums(unweighted * probs[:, None], tokens_per_expert, probs, 3)
    expected = torch.zeros(3, 4, dtype=f64)
    expected_counts = [0, 0, 0]
    expert_of_row = [0, 0, 0, 2, 2, 2, 2]
    for row, e in enumerate(expert_of_row):
        if probs[row] != 0:
            expected[e] += unweighted[row]
            expected_counts[e] += 1
    assert counts.tolist() == expected_counts
    assert rel_err(sums, expected) < 1e-6  # fp32 sums of float64 inputs


def _grouped_mlp_layer():
    if compat.GroupedMLP is None:
        pytest.skip("GroupedMLP was removed in megatron-core 0.17")
    install_grouped_gemm_fallback()
    config = ema_config(moe_grouped_gemm=True, bf16=True, params_dtype=torch.bfloat16)
    spec = get_moe_module_spec(use_te=False, num_experts=EXPERTS, moe_grouped_gemm=True)
    torch.manual_seed(0)
    return build_moe_layer(config, spec=densemixer_spec(spec))


EXPERT_MODULES = {
    "sequential_swiglu": lambda: build_dense_layer(ema_config(), seed=0),
    "sequential_gelu": lambda: build_dense_layer(
        ema_config(gated_linear_unit=False, activation_func=F.gelu), seed=0
    ),
    "grouped_mlp_bf16": _grouped_mlp_layer,
}


@pytest.mark.parametrize("name", list(EXPERT_MODULES))
def test_sums_recover_each_expert_modules_unweighted_output(name):
    """Dividing the experts module's rows by their probs gives E_e(x): the per-expert sums
    equal those of the same module called with unit probs, for every expert module here.

    Guards the assumption that Megatron applies the routing weight linearly inside the expert
    (to the activation and fc2's bias). Tolerance 1e-5 in fp32 (the same products, rounded
    once more by the division); 2e-2 in bf16 (the weighted activation is rounded to bf16
    before fc2: unit roundoff 4e-3, a few roundings per output).
    """
    experts = EXPERT_MODULES[name]().experts
    dtype = next(experts.parameters()).dtype
    tokens_per_expert = torch.tensor([3, 0, 2, 4, 1, 0, 5, 2])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(int(tokens_per_expert.sum()), HIDDEN, generator=gen).to(dtype)
    probs = torch.rand(x.shape[0], generator=gen) + 0.05
    with torch.no_grad():
        weighted, _ = experts(x, tokens_per_expert, probs)
        unweighted, _ = experts(x, tokens_per_expert, torch.ones_like(probs))
    sums, counts = expert_output_sums(weighted, tokens_per_expert, probs, EXPERTS)
    expected = torch.zeros(EXPERTS, HIDDEN, dtype=f64)
    row = 0
    for e, n in enumerate(tokens_per_expert.tolist()):
        for _ in range(n):
            expected[e] += unweighted[row].double()
            row += 1
    assert counts.tolist() == tokens_per_expert.tolist()
    assert rel_err(sums, expected) < (2e-2 if dtype == torch.bfloat16 else TOL)


def test_no_grad_eval_and_frozen_router_do_nothing():
    """No-grad forwards (eval, RL log-prob passes) and a frozen router leave the table alone.

    Guards against the experts hook accumulating or updating outside training forwards.
    """
    layer = build_dense_layer(ema_config(), seed=0)
    ema = layer.dense_router_grad_ema
    x = torch.randn(6, 2, HIDDEN)
    with torch.no_grad():
        layer(x)
    assert int(ema.updates.sum()) == 0 and float(ema.table.abs().sum()) == 0.0
    layer.router.weight.requires_grad_(False)
    run_layer(layer, x, torch.randn_like(x))
    assert int(ema.updates.sum()) == 0 and float(ema.table.abs().sum()) == 0.0
    layer.router.weight.requires_grad_(True)
    run_layer(layer, x, torch.randn_like(x))
    assert int(ema.updates.sum()) > 0, "a training forward must update the table"


def test_full_recompute_updates_once(fresh_model_parallel):
    """Full-layer recompute runs the forward twice (no-grad, then with grad): one update.

    Table, update counts and router grad are bitwise those of a plain run.
    """
    config = ema_config(moe_dense_router_grad_ema_decay=0.5)
    plain, recomputed = build_dense_layer(config, seed=0), build_dense_layer(config, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, g = (torch.randn(6, 2, HIDDEN, generator=gen) for _ in range(2))
        _, _, grads = run_layer(plain, x, g)
        _, _, grads_recomputed = run_layer(recomputed, x, g, full_recompute=True)
    a, b = plain.dense_router_grad_ema, recomputed.dense_router_grad_ema
    assert torch.equal(a.updates, b.updates) and int(a.updates.max()) == 2
    assert torch.equal(a.table, b.table)
    assert torch.equal(grads["router.weight"], grads_recomputed["router.weight"])


def test_state_dict_and_parameters_unchanged():
    """The table is not saved: state dict keys and parameter names are the conventional ones,
    and checkpoints load strictly in both directions (no "unexpected key" either way)."""
    layer, conventional = build_pair(ema_config())
    assert list(layer.state_dict()) == list(conventional.state_dict())
    assert [n for n, _ in layer.named_parameters()] == [
        n for n, _ in conventional.named_parameters()
    ]
    run_layer(layer, torch.randn(4, 2, HIDDEN), torch.randn(4, 2, HIDDEN))
    conventional.load_state_dict(layer.state_dict(), strict=True)
    layer.load_state_dict(conventional.state_dict(), strict=True)
    assert all("dense_router_grad_ema" not in key for key in layer.state_dict())


BAD = [
    (dict(moe_dense_router_grad_estimator="mean"), "moe_dense_router_grad_estimator must be"),
    (dict(moe_dense_router_grad_ema_decay=1.0), r"moe_dense_router_grad_ema_decay must be in"),
    (dict(moe_dense_router_grad_ema_decay=-0.1), r"moe_dense_router_grad_ema_decay must be in"),
    (dict(moe_dense_router_grad_ema_decay=math.nan), r"ema_decay must be in \[0, 1\), got nan"),
    (dict(moe_dense_router_grad_ema_decay="0.9"), r"ema_decay must be in \[0, 1\), got '0.9'"),
    (
        dict(moe_dense_router_grad_estimator="ema", moe_dense_router_grad_topm=4),
        "'ema' does not combine with moe_dense_router_grad_topm",
    ),
    (
        dict(moe_dense_router_grad_estimator="ema", moe_dense_router_grad_token_fraction=0.5),
        "'ema' does not combine with",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_options_raise(overrides, message):
    """Each bad estimator option fails at config time with a message naming it."""
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_megatron_lm_flags():
    """The two options come with Megatron-LM flags, parsed into the field names."""
    parser = extra_args_provider(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--moe-dense-router-grad-estimator", "ema", "--moe-dense-router-grad-ema-decay", "0.9"]
    )
    assert args.moe_dense_router_grad_estimator == "ema"
    assert args.moe_dense_router_grad_ema_decay == 0.9
    with pytest.raises(SystemExit):
        parser.parse_args(["--moe-dense-router-grad-estimator", "mean"])


# --------------------------------------------------------------------------------------
# Parallel: the table is identical on every rank and equals the single-rank one
# --------------------------------------------------------------------------------------
SEQ, BATCH = 6, 4
PARALLEL_CASES = {
    "ep2_alltoall": dict(dispatcher="alltoall", ep=2),
    "ep2_allgather": dict(dispatcher="allgather", ep=2),
    "dp2": dict(dispatcher="alltoall"),
    "tp2_sp_alltoall": dict(dispatcher="alltoall", tp=2),
    "etp2_tp1_allgather": dict(dispatcher="allgather", etp=2),
}


def _batches():
    gen = torch.Generator().manual_seed(77)
    return [
        (
            torch.randn(SEQ, BATCH, HIDDEN, generator=gen),
            torch.randn(SEQ, BATCH, HIDDEN, generator=gen),
        )
        for _ in range(2)
    ]


def _local_tokens(tensor: torch.Tensor, tp: int) -> torch.Tensor:
    """This rank's [s, b, H] share: its data-parallel batch slice and, under SP (TP > 1), its
    sequence slice."""
    from megatron.core import parallel_state as ps

    tensor = tensor.chunk(ps.get_data_parallel_world_size(), dim=1)[ps.get_data_parallel_rank()]
    if tp > 1:
        tensor = tensor.chunk(tp, dim=0)[ps.get_tensor_model_parallel_rank()]
    return tensor


def _parallel_world(rank: int, world_size: int, state_path: str, out_path: str) -> None:
    """Runs every parallel case for two steps; rank 0 writes each rank's table and grads."""
    from megatron.core import parallel_state as ps

    state = torch.load(state_path)
    results: Dict[str, dict] = {}
    for name, case in PARALLEL_CASES.items():
        tp, ep, etp = case.get("tp", 1), case.get("ep", 1), case.get("etp")
        init_model_parallel(tp=tp, ep=ep, etp=etp)
        config = parallel_config(
            case["dispatcher"],
            tp=tp,
            ep=ep,
            etp=etp,
            moe_dense_router_grad_estimator="ema",
            moe_dense_router_grad_ema_decay=0.5,
        )
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
        layer.load_state_dict(shard_moe_state_dict(state, **shard), strict=True)
        for x, g in _batches():
            _, _, grads = run_layer(layer, _local_tokens(x, tp), _local_tokens(g, tp))
        # Every rank's router grad covers its own tokens: their sum is the whole batch's.
        router_grad = grads["router.weight"]
        dist.all_reduce(router_grad)
        ema = layer.dense_router_grad_ema
        results[name] = dict(
            table=ema.table.tolist(), updates=ema.updates.tolist(), router=router_grad.tolist()
        )
    everyone = [None] * world_size
    dist.all_gather_object(everyone, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(everyone, f)


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    """The single-rank expected values and every rank's results of each parallel case."""
    init_model_parallel(tp=1, ep=1)
    config = parallel_config(
        "alltoall", moe_dense_router_grad_estimator="ema", moe_dense_router_grad_ema_decay=0.5
    )
    layer = build_dense_layer(config, seed=0)
    state = {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else v
        for k, v in layer.state_dict().items()
    }
    for x, g in _batches():
        _, _, grads = run_layer(layer, x, g)
    expected = dict(
        table=layer.dense_router_grad_ema.table.clone(),
        updates=layer.dense_router_grad_ema.updates.tolist(),
        router=grads["router.weight"],
    )
    directory = tmp_path_factory.mktemp("ema_parallel")
    state_path, out_path = str(directory / "state.pt"), str(directory / "out.json")
    torch.save(state, state_path)
    run_distributed(_parallel_world, 2, state_path, out_path)
    with open(out_path) as f:
        return expected, json.load(f)


@pytest.mark.parametrize("name", list(PARALLEL_CASES))
def test_parallel_table_matches_single_rank(name, parallel_results):
    """Under EP, DP, TP + SP and expert TP the table is the same on both ranks and equals
    the single-rank table of the whole batch; so does the summed router gradient.

    Guards against a rank keeping its own table (missing DP or EP reduction), counting
    expert-TP members twice, or skipping their partial outputs. Tolerance TOL: the parallel
    run sums the same fp32 terms in another order (see test_parallel's TOL).
    """
    expected, ranks = parallel_results
    for rank, results in enumerate(ranks):
        got = results[name]
        assert got["updates"] == expected["updates"], f"rank {rank}"
        table = torch.tensor(got["table"])
        assert rel_err(table, expected["table"]) < TOL, f"rank {rank}"
        assert rel_err(torch.tensor(got["router"]), expected["router"]) < TOL, f"rank {rank}"
    assert ranks[0][name]["table"] == ranks[1][name]["table"], "tables differ between ranks"
