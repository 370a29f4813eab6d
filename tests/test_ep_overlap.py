"""Megatron's EP all-to-all overlap schedule (``overlap_moe_expert_parallel_comm``) on CPU.

With the flag on, Megatron's ``forward_backward_no_pipelining`` runs
``combined_1f1b_schedule_for_no_pipelining``: each micro-batch's model is a
``TransformerModelChunkSchedulePlan`` (``GPTModel.build_schedule_plan``) whose MoE layers are
cut into schedule nodes -- attention + route + preprocess | dispatch | experts | combine +
postprocess -- with every node's outputs detached, and one micro-batch's forward runs
interleaved with the previous one's backward, node by node. ``tests/support/cuda_streams``
stands in for the CUDA streams and events of that schedule.

Two gloo processes, EP = 2 (so also data-parallel 2), alltoall dispatcher, a two-layer
GPTModel with MoE layers, bf16 parameters, three micro-batches per rank. Each case runs the
same weights and data through ``get_forward_backward_func()`` with the flag off and on, and
compares every rank's loss and its (local, not yet data-parallel-reduced) router, expert and
word-embedding gradients. The DenseMixer cases also hold the overlapped run's MoE layers to
the float64 reference of the math: each layer's router weight gradient and, per micro-batch,
the gradient of its input, from the x and dL/dy each micro-batch's route and postprocess saw
and every EP rank's experts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cpu import init_model_parallel, run_distributed
from megatron_cpu.models import make_config, rel_err
from megatron_densemixer import DenseMixerMoELayer, densemixer_spec
from tests.support.builders import reference_model, reference_routing
from tests.support.cuda_streams import apply_cuda_stream_standins
from tests.support.reference import reference

WORLD, EP = 2, 2
VOCAB, SEQ, LAYERS, EXPERTS = 32, 8, 2, 4
MICRO_BATCH, MICRO_BATCHES = 2, 3

# Tolerances, norm-relative, of the overlapped run against the plain one: same weights, same
# data, same bf16 arithmetic. (On megatron-core 0.16.1 the two agree bitwise: every error is
# 0.0.) The forward is the same operations in the same order, micro-batch by micro-batch, so
# the loss (an fp32 sum of the per-token losses) leaves room for fp32 reassociation only. The
# backward is cut into nodes whose graphs run separately; where a gradient reaches one tensor
# from several nodes (the residual's and the MoE path's share of dL/dx), a Megatron version
# may sum it in another order, which in bf16 (unit roundoff 2^-9 = 2e-3) moves single entries
# by an ulp or so and a norm-relative error by well under 1e-2. A backward that used another
# micro-batch's saved activations, a node's gradient lost or added twice, or an all-to-all
# with another micro-batch's split sizes moves these gradients by O(1e-1) to O(1) (reading a
# DenseMixer layer's latest forward instead of the call's own: router error 0.55).
TOL_LOSS = 1e-5
TOL_GRAD = 1e-2
# Tolerances, norm-relative, of the overlapped run's MoE layers against the float64
# reference of the math (tests/support/reference.py), per layer and rank: the router weight
# gradient (summed over the micro-batches, as .grad accumulates it) and each micro-batch's
# gradient of the layer's input. The reference takes the run's own bf16 weights (every
# expert, gathered over the EP ranks) and the bf16 x and g that each micro-batch's route and
# postprocess saw, upcast to float64, so what separates the two is bf16 rounding in the run
# (unit roundoff 2^-9 = 2e-3): the expert GEMMs and SwiGLU behind G[t, e] = <g_t, E_e(x_t)>
# and dL/dx, each micro-batch's router gradient stored in bf16 (1.6e-3 norm-relative alone)
# and the two bf16 additions of the three into the bf16 .grad. Measured on megatron-core
# 0.16.1, the worst layer and rank: router 6.4e-3 (flag on, dense reference), 6.1e-3 (flag
# off, conventional reference); input gradient 5.0e-3 (either). The bounds are ~3x those.
# The check can fail: the reference router gradient of the other kind (conventional for
# flag on, dense for flag off) differs from the right one by 0.74 / 1.03 at least (REF_GAP
# asks for 0.2), so a run that lost the dense term or added it with the flag off, used
# another micro-batch's x or g, or only the local experts, fails the router check. The
# dense term moves dL/dx far less (2.6e-2 at least, through the router's share alone): the
# input-gradient check guards the expert path and the schedule's sum of dL/dx, not the
# dense term.
TOL_REFERENCE = 2e-2
TOL_REFERENCE_DX = 1.5e-2
REF_GAP = 0.2


@dataclasses.dataclass(frozen=True)
class Case:
    densemixer: bool  # DenseMixer's config class and spec (else Megatron's own)
    dense: bool = False  # moe_dense_router_grad


CASES = {
    "megatron": Case(densemixer=False),
    "densemixer_flag_off": Case(densemixer=True, dense=False),
    "densemixer_flag_on": Case(densemixer=True, dense=True),
}
# Each group runs in its own gloo world, so that a failure in one cannot leave the other's
# processes waiting in a collective.
GROUPS = {
    "conventional": ["megatron", "densemixer_flag_off"],
    "dense": ["densemixer_flag_on"],
}


# --------------------------------------------------------------------------------------
# Model, data and one run
# --------------------------------------------------------------------------------------
def model_config(case: Case, overlap: bool) -> TransformerConfig:
    """Two MoE layers (4 experts, top-2, SwiGLU), EP = 2, alltoall, bf16, no dropout."""
    fields = dict(
        num_layers=LAYERS,
        hidden_size=16,
        ffn_hidden_size=24,
        moe_ffn_hidden_size=24,
        num_attention_heads=4,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        use_cpu_initialization=True,
        expert_model_parallel_size=EP,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=True,
        params_dtype=torch.bfloat16,
        # Sums over tokens and micro-batches, no division by counts.
        calculate_per_token_loss=True,
        overlap_moe_expert_parallel_comm=overlap,
    )
    if case.densemixer:
        return make_config(moe_dense_router_grad=case.dense, **fields)
    return TransformerConfig(**fields)


def layer_spec(case: Case):
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    return densemixer_spec(spec) if case.densemixer else spec


def build_model(case: Case, overlap: bool) -> Float16Module:
    """The GPTModel in Megatron's bf16 wrapper (which casts every parameter to bf16)."""
    torch.manual_seed(0)
    config = model_config(case, overlap)
    model = GPTModel(
        config,
        layer_spec(case),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        share_embeddings_and_output_weights=False,
    )
    moe_class = DenseMixerMoELayer if case.densemixer else MoELayer
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe_layers) == LAYERS and all(type(m) is moe_class for m in moe_layers)
    return Float16Module(config, model)


def microbatches(rank: int) -> List[Dict[str, torch.Tensor]]:
    """This rank's micro-batches (its data-parallel share of one global batch)."""
    gen = torch.Generator().manual_seed(1234)
    n = WORLD * MICRO_BATCH * MICRO_BATCHES
    tokens = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    share = slice(rank * n // WORLD, (rank + 1) * n // WORLD)
    tokens, labels = tokens[share], labels[share]
    return [
        {
            "tokens": tokens[i : i + MICRO_BATCH],
            "labels": labels[i : i + MICRO_BATCH],
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ).clone(),
        }
        for i in range(0, tokens.shape[0], MICRO_BATCH)
    ]


CAUSAL_MASK = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]

# Schedule plans built by forward_step in this process: proof that the overlap schedule ran.
_PLANS_BUILT = [0]


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Megatron's forward_step_func, as Megatron-LM's pretrain_gpt writes it: the overlap
    schedule passes the unwrapped GPTModel and asks for its schedule plan instead of its
    output; the plain schedule passes the Float16Module."""
    batch = next(data_iterator)
    args = (batch["tokens"], batch["position_ids"], CAUSAL_MASK)
    if return_schedule_plan:
        _PLANS_BUILT[0] += 1
        output = model.build_schedule_plan(*args, labels=batch["labels"])
    else:
        output = model(*args, labels=batch["labels"])

    def loss_func(losses: torch.Tensor):
        # fp32, as the overlap schedule's post-process node hands the losses over.
        total = losses.float().sum()
        return total, torch.tensor(losses.numel()), {"loss": total.detach()}

    return output, loss_func


class MoECapture:
    """Records, per forward call of one MoE layer, its input x (what ``route`` hands the
    router: the pre-MLP layernorm's output, which preprocess dispatches too), the gradient dx
    of x, and the gradient g of its output (what ``postprocess`` returns, DenseMixer's
    wrapper included), all as [tokens, hidden]. Entry i of each list is micro-batch i: every
    schedule runs the micro-batches' forwards in order, and a gradient lands in the slot of
    the forward call that made its tensor, whenever that call's backward runs."""

    def __init__(self, layer: MoELayer):
        self.x: List[torch.Tensor] = []
        self.dx: List[Optional[torch.Tensor]] = []
        self.g: List[Optional[torch.Tensor]] = []
        hidden = layer.config.hidden_size

        def on_route(router, args) -> None:
            x, slot = args[0], len(self.x)
            self.x.append(x.detach().reshape(-1, hidden).clone())
            self.dx.append(None)

            def hook(grad: torch.Tensor) -> None:
                assert self.dx[slot] is None, "an MoE input got two gradients"
                self.dx[slot] = grad.detach().reshape(-1, hidden).clone()

            x.register_hook(hook)

        layer.router.register_forward_pre_hook(on_route)
        postprocess = layer.postprocess  # the bound method, looked up by the schedule per call

        def recording_postprocess(*args, **kwargs):
            output = postprocess(*args, **kwargs)
            slot = len(self.g)
            self.g.append(None)

            def hook(grad: torch.Tensor) -> None:
                assert self.g[slot] is None, "an MoE output got two gradients"
                self.g[slot] = grad.detach().reshape(-1, hidden).clone()

            output.register_hook(hook)
            return output

        layer.postprocess = recording_postprocess


def moe_layers(model: Float16Module) -> List[MoELayer]:
    return [layer.mlp for layer in model.module.decoder.layers]


def run(
    case: Case, overlap: bool, state: dict, rank: int, capture: bool = False
) -> Dict[str, torch.Tensor]:
    """One forward_backward_func call; returns the loss and the flat gradients by kind, and
    with ``capture`` the model and each MoE layer's MoECapture."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = build_model(case, overlap)
    model.load_state_dict(state, strict=True)
    captures = [MoECapture(layer) for layer in moe_layers(model)] if capture else None
    plans_before = _PLANS_BUILT[0]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches(rank)),
        model=model,
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
    )
    # Only combined_1f1b_schedule_for_no_pipelining asks for schedule plans: one per
    # micro-batch with the flag on, none without it.
    plans = _PLANS_BUILT[0] - plans_before
    assert plans == (MICRO_BATCHES if overlap else 0), f"overlap={overlap}: {plans} plans"
    grads: Dict[str, List[torch.Tensor]] = {"router": [], "experts": [], "embedding": []}
    everything = []
    for name, param in model.module.named_parameters():
        assert param.grad is not None, f"{name}: no gradient"
        kind = (
            "router"
            if name.endswith("router.weight")
            else "experts"
            if ".experts." in name
            else "embedding"
            if name == "embedding.word_embeddings.weight"
            else None
        )
        if kind is not None:
            grads[kind].append(param.grad.flatten())
        everything.append(param.grad.flatten())
    out = {kind: torch.cat(g) for kind, g in grads.items()}
    out["all_params"] = torch.cat(everything)
    out["loss"] = torch.stack([entry["loss"] for entry in losses])
    if capture:
        out["model"], out["captures"] = model, captures
    return out


def reference_errors(
    case: Case, model: Float16Module, captures: List[MoECapture]
) -> Dict[str, float]:
    """This rank's MoE layers against the float64 reference, fed each micro-batch's captured
    x and g and the layer's weights with every EP rank's experts. Norm-relative, the worst
    layer (and micro-batch): ``reference``, the router weight gradient (summed over the
    micro-batches, as .grad accumulates it); ``reference_dx``, the layer's input gradient.
    ``reference_gap``, the best layer: how far the reference router gradient of the other
    kind (conventional for dense, and back) is from this kind's."""
    config = model.module.config
    errors = {"reference": 0.0, "reference_dx": 0.0, "reference_gap": float("inf")}
    for layer, cap in zip(moe_layers(model), captures, strict=True):
        assert len(cap.x) == len(cap.g) == MICRO_BATCHES, (len(cap.x), len(cap.g))
        assert all(g is not None for g in cap.g + cap.dx), "an MoE output or input got no grad"
        # Every EP rank's experts in rank order, as shard_moe_state_dict splits them:
        # contiguously, global expert = rank * local experts + local index.
        local = reference_model(layer, config)
        num_local = len(local.experts)
        assert list(layer.local_expert_indices) == [
            dist.get_rank() * num_local + i for i in range(num_local)
        ]
        everyone: List[Optional[list]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local.experts)
        full = dataclasses.replace(local, experts=[e for part in everyone for e in part])
        assert len(full.experts) == EXPERTS
        routing = reference_routing(layer, config)
        expected = other = 0
        for x, dx, g in zip(cap.x, cap.dx, cap.g, strict=True):
            result = reference(full, x, g, routing, dense=case.dense)
            expected = expected + result.d_router_w
            other = other + reference(full, x, g, routing, dense=not case.dense).d_router_w
            errors["reference_dx"] = max(errors["reference_dx"], rel_err(dx, result.d_x))
        errors["reference"] = max(errors["reference"], rel_err(layer.router.weight.grad, expected))
        errors["reference_gap"] = min(errors["reference_gap"], rel_err(other, expected))
    return errors


def _run_world(rank: int, world_size: int, names: List[str], out_path: str) -> None:
    """Runs ``names``; rank 0 writes {case: {quantity: max error over ranks}}."""
    apply_cuda_stream_standins()
    init_model_parallel(ep=EP)
    results = {}
    for name in names:
        case = CASES[name]
        state = build_model(case, overlap=False).state_dict()
        plain = run(case, False, state, rank)
        overlapped = run(case, True, state, rank, capture=case.densemixer)
        errors = {q: rel_err(overlapped[q], plain[q]) for q in plain}
        if case.densemixer:
            errors.update(reference_errors(case, overlapped["model"], overlapped["captures"]))
        if case.dense:
            conventional = run(dataclasses.replace(case, dense=False), False, state, rank)
            errors["dense_term"] = rel_err(conventional["router"], plain["router"])
        results[name] = errors
    everyone: List[Optional[dict]] = [None] * world_size
    dist.all_gather_object(everyone, results)
    if rank == 0:
        # Errors: the worst rank; the reference gap (a lower bound): the best.
        merged = {
            name: {
                q: (min if q == "reference_gap" else max)(r[name][q] for r in everyone)
                for q in results[name]
            }
            for name in names
        }
        with open(out_path, "w") as f:
            json.dump(merged, f)


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """Runs each group of cases once (lazily), in its own gloo world of WORLD processes."""
    cache: Dict[str, dict] = {}

    def get(group: str) -> dict:
        if group not in cache:
            path = os.path.join(str(tmp_path_factory.mktemp("ep_overlap")), f"{group}.json")
            run_distributed(_run_world, WORLD, GROUPS[group], path, timeout_s=120.0)
            with open(path) as f:
                cache[group] = json.load(f)
        return cache[group]

    return get


def _check(errors: Dict[str, float]) -> None:
    assert errors["loss"] < TOL_LOSS, f"loss: norm-relative error {errors['loss']:.3g}"
    for quantity in ("router", "experts", "embedding", "all_params"):
        assert errors[quantity] < TOL_GRAD, (
            f"{quantity}: norm-relative error {errors[quantity]:.3g}"
        )
    if "reference" in errors:
        # The router check can fail: the other kind's reference is far outside its bound.
        assert errors["reference_gap"] > REF_GAP, errors
        assert errors["reference"] < TOL_REFERENCE, (
            f"router vs float64 reference: norm-relative error {errors['reference']:.3g}"
        )
        assert errors["reference_dx"] < TOL_REFERENCE_DX, (
            f"MoE input gradient vs float64 reference: error {errors['reference_dx']:.3g}"
        )


@pytest.mark.parametrize("name", GROUPS["conventional"])
def test_overlap_schedule_matches_plain_schedule(name, group_results):
    """EP overlap schedule vs the plain one, conventional router gradient: same loss, router,
    expert, word-embedding (and every other) gradient on every rank.

    Guards the CPU stand-ins of the schedule's CUDA streams and events and the schedule
    itself (node-by-node backward, interleaved micro-batches, the all-to-alls of one
    micro-batch's dispatch and combine between another's backward nodes), for Megatron's
    MoELayer and for DenseMixerMoELayer with the flag off, which must stay exactly MoELayer:
    its router gradient and MoE input gradients also match the float64 conventional
    reference (and not the dense one). Tolerances: TOL_LOSS, TOL_GRAD, TOL_REFERENCE,
    TOL_REFERENCE_DX (bf16, see there).
    """
    _check(group_results("conventional")[name])


def test_overlap_schedule_dense_router_grad(group_results):
    """EP overlap schedule vs the plain one with moe_dense_router_grad=True: same loss and
    gradients, the router's dense term included.

    Guards DenseMixer under the schedule that cuts each MoE layer's graph between the
    attention node (route) and the combine node (postprocess) and back-propagates the nodes
    one at a time, combine first: the dense gradient, made in the combine node's backward,
    must reach the router in the attention node's backward without an autograd edge between
    the two graphs, and each micro-batch's own (the next micro-batch's forward of the same
    layer runs in between). A dense gradient carried across the cut by an autograd edge fails
    here with "Trying to backward through the graph a second time".

    The overlapped run's router gradient, per MoE layer and rank and summed over the
    micro-batches, is also held to the float64 DenseMixer reference of that layer (fed the
    x and dL/dy each micro-batch's route and postprocess saw, and every EP rank's experts),
    and each micro-batch's MoE input gradient too; the conventional reference is far
    outside that bound (REF_GAP). The dense term must be visible here: the router gradient
    differs from the conventional one (same weights and data, flag off) by more than 1e-2.
    Tolerances: TOL_LOSS, TOL_GRAD, TOL_REFERENCE, TOL_REFERENCE_DX.
    """
    errors = group_results("dense")["densemixer_flag_on"]
    assert errors["dense_term"] > 1e-2, "the dense router term must be visible in this batch"
    _check(errors)
