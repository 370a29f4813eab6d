"""DenseMixerMoELayer behind Megatron's flex token dispatcher (moe_token_dispatcher_type="flex").

Megatron's own ``MoEFlexTokenDispatcher`` runs unmodified, for every
``moe_flex_dispatcher_backend`` the installed megatron-core accepts; its fused all-to-all
kernels (DeepEP / HybridEP, CUDA only) are replaced by the test-only stand-in of
``tests/support/fused_a2a_standin.py``. The CPU cases run in one gloo world of two processes,
EP = 2, with a different number of tokens on each rank (sequence lengths 7 and 3), as packed
or dynamically batched sequences give. Their errors come back to the parent, where one test
per (backend, claim) checks them.

A GPU-only test runs the same comparison with the real DeepEP kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import tempfile
import traceback
import typing
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cpu import init_model_parallel, run_distributed, shard_moe_state_dict
from megatron_cpu.models import EXPERTS, HIDDEN, TOPK, build_dense_layer, build_moe_layer, rel_err
from tests.support import reference as ref
from tests.support.builders import parallel_config, reference_model, run_layer


def _flex_backends() -> List[str]:
    """The ``moe_flex_dispatcher_backend`` values the installed megatron-core accepts."""
    field = {f.name: f for f in dataclasses.fields(TransformerConfig)}.get(
        "moe_flex_dispatcher_backend"
    )
    if field is None:  # before the field existed, DeepEP was the flex dispatcher's only kernel
        return ["deepep"]
    hint = typing.get_type_hints(TransformerConfig)["moe_flex_dispatcher_backend"]
    return list(typing.get_args(hint)) or [field.default]


def _cpu_skip_reason(backend: str) -> Optional[str]:
    """Why ``backend`` cannot be built on CPU with the installed megatron-core, or None."""
    from packaging.version import Version

    from megatron_densemixer import compat

    if backend == "hybridep" and compat.get_mcore_version() >= Version("0.18"):
        return (
            "megatron-core >= 0.18's _HybridEPManager allocates its over-budget flag on CUDA "
            "when the dispatcher is built (token_dispatcher.py): runs on a GPU only"
        )
    if backend == "ncclep":
        return (
            "the ncclep backend calls Transformer Engine's NCCL EP kernels "
            "(transformer_engine.pytorch.ep), GPU only; no CPU stand-in"
        )
    if backend not in ("deepep", "hybridep"):
        return f"no CPU stand-in for the {backend!r} flex backend"
    return None


BACKENDS = _flex_backends()
CPU_BACKENDS = [b for b in BACKENDS if _cpu_skip_reason(b) is None]
EP = 2
SEQ_BY_RANK = (7, 3)  # uneven: 14 and 6 tokens on the two EP ranks
BATCH = 2

# Norm-relative tolerance of the fp32 layer against the float64 reference. The layer computes
# the same products in fp32 (unit roundoff 6e-8) and no entry sums more than a few hundred
# terms, so honest results agree to ~1e-6; a token or expert lost, scored twice or sent to
# the wrong rank by the dispatch moves the router gradient by more than 1e-2 (the dense term
# alone moves it by more, see "dense_term"). Same bound as test_parallel and test_moe_layer.
TOL = 1e-5


# --------------------------------------------------------------------------------------
# The world: every backend, conventional and DenseMixer, on uneven tokens
# --------------------------------------------------------------------------------------
def _rank_batch(rank: int):
    """x and g of EP rank ``rank``, [SEQ_BY_RANK[rank], BATCH, HIDDEN], the same in every
    process."""
    gen = torch.Generator().manual_seed(4321 + rank)
    shape = (SEQ_BY_RANK[rank], BATCH, HIDDEN)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1, HIDDEN) for t in tensors])


def _expert_grads(grads: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for n, g in sorted(grads.items()) if n.startswith("experts.")])


def _run(config, shard, x, g, dense: bool):
    """One layer of ``config`` holding ``shard``: y, dx, param grads (the router's summed over
    the data-parallel group, as DDP does) and its dispatcher's manager class name."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_densemixer import DenseMixerMoELayer

    layer = build_dense_layer(config) if dense else build_moe_layer(config)
    assert type(layer) is (DenseMixerMoELayer if dense else MoELayer)
    layer.load_state_dict(shard, strict=True)
    y, dx, grads = run_layer(layer, x, g, zero_missing_grads=True)
    dist.all_reduce(grads["router.weight"], group=ps.get_data_parallel_group())
    manager = getattr(layer.token_dispatcher, "_comm_manager", None)
    return y, dx, grads, type(layer.token_dispatcher).__name__, type(manager).__name__


def _errors(backend: str, shard, x, g, expected) -> Dict[str, dict]:
    """This rank's errors for one backend, by stage ("conventional", "dense"); a stage that
    raised records its traceback instead."""
    from megatron.core.transformer.moe import token_dispatcher as td

    from tests.support import fused_a2a_standin

    out: Dict[str, dict] = {}
    a2a = _run(parallel_config("alltoall", ep=EP, moe_dense_router_grad=False), shard, x, g, False)
    flex_config = parallel_config("flex", ep=EP, moe_flex_dispatcher_backend=backend)
    conventional = None
    try:
        conventional = _run(
            dataclasses.replace(flex_config, moe_dense_router_grad=False), shard, x, g, False
        )
        y, dx, grads, dispatcher, manager = conventional
        out["conventional"] = {
            "dispatcher": dispatcher,
            "manager": manager,
            "standin_patched": float(
                td.fused_dispatch is fused_a2a_standin.fused_dispatch
                and td.hybrid_ep_dispatch is fused_a2a_standin.hybrid_ep_dispatch
            ),
            "output_bitwise": float(torch.equal(y, a2a[0])),
            "output": rel_err(y, a2a[0]),
            "input_grad": rel_err(dx, a2a[1]),
            "router_grad": rel_err(grads["router.weight"], a2a[2]["router.weight"]),
            "expert_grads": rel_err(_expert_grads(grads), _expert_grads(a2a[2])),
            "float64_router_grad": rel_err(grads["router.weight"], expected["conv"].d_router_w),
        }
    except Exception:  # reported per stage in the parent
        out["conventional"] = {"error": traceback.format_exc()}
    try:
        y, dx, grads, dispatcher, manager = _run(flex_config, shard, x, g, True)
        errors = {
            "dispatcher": dispatcher,
            "manager": manager,
            "float64_output": rel_err(y, expected["y"]),
            "float64_input_grad": rel_err(dx, expected["dx"]),
            "float64_router_grad": rel_err(grads["router.weight"], expected["dense"].d_router_w),
            "dense_term": rel_err(expected["conv"].d_router_w, expected["dense"].d_router_w),
        }
        if conventional is not None:
            errors["output_bitwise"] = float(torch.equal(y, conventional[0]))
            errors["expert_grads_bitwise"] = float(
                torch.equal(_expert_grads(grads), _expert_grads(conventional[2]))
            )
        out["dense"] = errors
    except Exception:
        out["dense"] = {"error": traceback.format_exc()}
    return out


def _run_world(rank: int, world_size: int, out_path: str) -> None:
    """Every backend on this rank; rank 0 writes {backend: {stage: {quantity: worst}}}."""
    from megatron.core import parallel_state as ps

    from tests.support.fused_a2a_standin import apply_fused_a2a_standin

    # Megatron wraps the flex dispatcher's dispatch_preprocess in torch.compile; compiling on
    # CPU costs tens of seconds and tests nothing here (conftest does the same in the parent).
    torch._dynamo.config.disable = True
    apply_fused_a2a_standin()

    # The whole model on one rank: the weights every layer below is sharded from.
    init_model_parallel(tp=1, ep=1)
    config = parallel_config("alltoall")
    single = build_dense_layer(config, seed=0)
    state = {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else v  # _extra_state: None
        for k, v in single.state_dict().items()
    }
    batches = [_rank_batch(r) for r in range(world_size)]
    x_all, g_all = _flat(b[0] for b in batches), _flat(b[1] for b in batches)
    model, routing = reference_model(single, config), ref.Routing(topk=TOPK)
    dense = ref.reference(model, x_all, g_all, routing, dense=True)
    conv = ref.reference(model, x_all, g_all, routing, dense=False)
    lo = sum(x.numel() // HIDDEN for x, _ in batches[:rank])
    x, g = batches[rank]
    n = x.numel() // HIDDEN
    expected = dict(
        dense=dense,
        conv=conv,
        y=dense.y[lo : lo + n].reshape(x.shape),
        dx=dense.d_x[lo : lo + n].reshape(x.shape),
    )

    init_model_parallel(tp=1, ep=EP)
    assert ps.get_expert_model_parallel_world_size() == world_size == EP
    shard = shard_moe_state_dict(
        state,
        num_experts=EXPERTS,
        ep_size=EP,
        ep_rank=ps.get_expert_model_parallel_rank(),
        gated_linear_unit=True,
    )
    results = {backend: _errors(backend, shard, x, g, expected) for backend in CPU_BACKENDS}

    everyone = [None] * world_size
    dist.all_gather_object(everyone, results)
    if rank == 0:
        merged: dict = {}
        for backend in CPU_BACKENDS:
            for stage in ("conventional", "dense"):
                per_rank = [r[backend][stage] for r in everyone]
                errors = [r["error"] for r in per_rank if "error" in r]
                if errors:
                    merged.setdefault(backend, {})[stage] = {"error": errors[0]}
                    continue
                merged.setdefault(backend, {})[stage] = {
                    # Worst over ranks: the largest error, the smallest "all equal" flag.
                    q: (
                        per_rank[0][q]
                        if isinstance(per_rank[0][q], str)
                        else (min if q.endswith(("bitwise", "patched")) else max)(
                            r[q] for r in per_rank
                        )
                    )
                    for q in per_rank[0]
                }
        with open(out_path, "w") as f:
            json.dump(merged, f)


@pytest.fixture(scope="module")
def flex_results(tmp_path_factory):
    """Runs the EP = 2 world once and returns its errors by backend and stage."""
    path = str(tmp_path_factory.mktemp("flex") / "flex.json")
    run_distributed(_run_world, EP, path)
    with open(path) as f:
        return json.load(f)


def _stage(results: dict, backend: str, stage: str) -> dict:
    reason = _cpu_skip_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    errors = results[backend][stage]
    if "error" in errors:
        pytest.fail(f"{backend} / {stage} raised on a rank:\n{errors['error']}")
    return errors


_MANAGERS = {"deepep": "_DeepepManager", "hybridep": "_HybridEPManager"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_conventional_flex_matches_alltoall(backend, flex_results):
    """A conventional MoELayer on Megatron's flex dispatcher (the fused-a2a stand-in in place of
    DeepEP / HybridEP) gives bitwise the alltoall dispatcher's output on uneven tokens per
    rank, the same gradients, and the float64 reference's conventional router gradient.

    Guards the stand-in itself (tokens sent to the wrong rank or expert, rows of a token
    combined twice or not at all, per-rank token counts assumed equal, the probs' gradient
    dropped on the way back), without which the DenseMixer case below would prove nothing.
    Output: bitwise (every expert sees the same rows in the same order as under alltoall, and
    each token sums at most two expert outputs, a commutative fp32 add). Gradients: TOL.
    """
    errors = _stage(flex_results, backend, "conventional")
    assert errors["dispatcher"] == "MoEFlexTokenDispatcher"
    assert errors["manager"] == _MANAGERS.get(backend, errors["manager"])
    assert errors["standin_patched"] == 1.0
    assert errors["output_bitwise"] == 1.0, f"output differs: {errors['output']:.3g}"
    for quantity in ("input_grad", "router_grad", "expert_grads", "float64_router_grad"):
        assert errors[quantity] < TOL, f"{quantity}: norm-relative error {errors[quantity]:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_densemixer_flex(backend, flex_results):
    """DenseMixerMoELayer on the flex dispatcher, EP = 2, uneven tokens per rank: forward and
    expert gradients bitwise the conventional flex layer's; router weight gradient (summed over
    the data-parallel group) and input gradient the float64 DenseMixer reference's.

    Guards against the dense router gradient depending on the dispatcher: the dense reduction
    exchanging token blocks over the wrong group or with equal-count assumptions under flex,
    scoring only local tokens or only local experts, or the DenseMixer layer perturbing the
    flex dispatcher's forward or the experts' gradients.
    Tolerance: TOL (1e-5 norm-relative, fp32 against float64; see its comment).
    """
    errors = _stage(flex_results, backend, "dense")
    assert errors["dispatcher"] == "MoEFlexTokenDispatcher"
    assert errors["manager"] == _MANAGERS.get(backend, errors["manager"])
    assert errors["dense_term"] > 1e-2, "the dense router term must be visible in this batch"
    assert errors.get("output_bitwise") == 1.0, "forward must be the conventional flex layer's"
    assert errors.get("expert_grads_bitwise") == 1.0, "expert grads must be conventional"
    for quantity in ("float64_output", "float64_input_grad", "float64_router_grad"):
        assert errors[quantity] < TOL, f"{quantity}: norm-relative error {errors[quantity]:.3g}"


# --------------------------------------------------------------------------------------
# Real DeepEP on GPUs
# --------------------------------------------------------------------------------------
GPU_HIDDEN, GPU_FFN, GPU_SEQ_BY_RANK = 256, 128, (96, 40)


def _gpu_layer(config, dense: bool, state):
    """A (DenseMixer) MoELayer from the local spec on this rank's GPU, without the CPU shim."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_densemixer import compat, densemixer_spec

    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)
    if dense:
        spec = densemixer_spec(spec)
    module, submodules = compat.moe_spec_parts(spec)
    layer = module(config=config, submodules=submodules)
    if state is not None:
        layer.load_state_dict(state, strict=True)
    return layer.cuda()


def _gpu_world(rank: int, world_size: int, store: str, out_path: str) -> None:
    """EP = 2 over NCCL: alltoall, conventional flex and DenseMixer flex on real DeepEP."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        ps.initialize_model_parallel(expert_model_parallel_size=EP)
        model_parallel_cuda_manual_seed(1234)
        common = dict(
            hidden_size=GPU_HIDDEN,
            ffn_hidden_size=GPU_FFN,
            moe_ffn_hidden_size=GPU_FFN,
            bf16=True,
            params_dtype=torch.bfloat16,
        )
        a2a_cfg = parallel_config("alltoall", ep=EP, moe_dense_router_grad=False, **common)
        flex_cfg = parallel_config("flex", ep=EP, moe_flex_dispatcher_backend="deepep", **common)
        torch.manual_seed(0)
        dense = _gpu_layer(flex_cfg, True, None)
        state = dense.state_dict()
        conventional_cfg = dataclasses.replace(flex_cfg, moe_dense_router_grad=False)
        layers = {
            "alltoall": _gpu_layer(a2a_cfg, False, state),
            "flex": _gpu_layer(conventional_cfg, False, state),
            "dense": dense,
        }
        gen = torch.Generator().manual_seed(99 + rank)
        shape = (GPU_SEQ_BY_RANK[rank], 2, GPU_HIDDEN)
        x = torch.randn(shape, generator=gen).cuda().bfloat16()
        g = torch.randn(shape, generator=gen).cuda().bfloat16()
        runs = {
            name: run_layer(layer, x, g, zero_missing_grads=True) for name, layer in layers.items()
        }
        for _, _, grads in runs.values():
            dist.all_reduce(grads["router.weight"], group=ps.get_data_parallel_group())
        errors = {
            "flex_vs_alltoall_output": rel_err(runs["flex"][0], runs["alltoall"][0]),
            "dense_vs_flex_output": rel_err(runs["dense"][0], runs["flex"][0]),
            "dense_vs_flex_expert_grads": rel_err(
                _expert_grads(runs["dense"][2]), _expert_grads(runs["flex"][2])
            ),
            # The dense term must be there: DenseMixer's router grad differs from conventional.
            "dense_vs_flex_router_grad": rel_err(
                runs["dense"][2]["router.weight"], runs["flex"][2]["router.weight"]
            ),
        }
        everyone = [None] * world_size
        dist.all_gather_object(everyone, errors)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({q: max(e[q] for e in everyone) for q in errors}, f)
    finally:
        with contextlib.suppress(Exception):
            ps.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.gpu
def test_densemixer_flex_on_real_deepep():
    """With DeepEP's real kernels (EP = 2 over NCCL, bf16, uneven tokens per rank): the
    conventional flex layer matches the alltoall layer, and the DenseMixer flex layer keeps the
    conventional flex forward and expert gradients while its router gradient carries the dense
    term.

    Guards the CPU stand-in's assumptions about DeepEP (local expert indices, received order,
    combine without weights, probs gradient summed over receiving ranks) against the kernels
    themselves. Tolerance: 2e-2 norm-relative against alltoall (bf16 rounding of DeepEP's
    combine differs from unpermute's), 1e-6 between the two flex layers (same kernels).
    """
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: DeepEP's dispatch/combine kernels are GPU-only")
    pytest.importorskip("deep_ep", reason="the deep_ep package (DeepEP) is not installed")
    if torch.cuda.device_count() < EP:
        pytest.skip(f"needs {EP} GPUs: DeepEP's intranode dispatch runs EP = {EP} over NVLink")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "gpu.json")
        mp.spawn(_gpu_world, args=(EP, os.path.join(tmp, "store"), out_path), nprocs=EP)
        with open(out_path) as f:
            errors = json.load(f)
    assert errors["flex_vs_alltoall_output"] < 2e-2, errors
    assert errors["dense_vs_flex_output"] < 1e-6, errors
    assert errors["dense_vs_flex_expert_grads"] < 1e-6, errors
    assert errors["dense_vs_flex_router_grad"] > 1e-2, errors
