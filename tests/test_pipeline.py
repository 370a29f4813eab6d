"""A GPTModel with DenseMixer MoE layers under pipeline, virtual pipeline, context and expert
parallelism, trained through Megatron's own ``forward_backward_func`` on gloo (CPU).

Each case runs several micro-batches of one global batch through the schedule Megatron picks
for its layout (``get_forward_backward_func``: no pipelining, 1F1B, or interleaved 1F1B),
sums the gradients over the data-parallel (x context-parallel) and expert-data-parallel
groups as Megatron's DDP does, and compares every rank's router, expert and word-embedding
gradients with one rank running the same model on the whole batch. The cases of one world
size run in one gloo world; the parent checks what each case reports.

Context parallelism on CPU: Megatron's only CP attention is Transformer Engine's (its local
DotProductAttention asserts ``context_parallel_size == 1``), so the CP case uses layers
without self-attention (IdentityOp), where CP still decides which tokens each rank's MoE
layers see and which groups reduce their gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

from megatron_cpu import cached_world_runs, init_model_parallel, shard_moe_state_dict
from megatron_cpu.models import make_config, rel_err
from megatron_densemixer import DenseMixerMoELayer, densemixer_spec

VOCAB, SEQ, LAYERS, EXPERTS = 32, 8, 4, 4
GLOBAL_BATCH, MICRO_BATCH = 8, 2
# Norm-relative tolerance for fp32 against the single-rank run: the same products summed in
# another order (micro-batches, data/context-parallel all-reduces, the dispatcher's
# permutations, the dense backward's exchange); fp32 roundoff 6e-8 over a few hundred terms
# per entry and a 4-layer backward stay near 1e-6, while a token, micro-batch or rank counted
# twice or left out moves a gradient by far more than 1e-2.
TOL = 1e-5


# Interleaved schedules as Megatron-LM runs them (--overlap-p2p-communication, its default
# there): unbatched p2p, which at PP=2 sends the two directions over two process groups.
# With batched p2p at PP=2 (prev and next stage are the same rank) the interleaved schedule's
# gradients came out wrong on gloo for conventional MoE too (router error 0.8).
P2P_INTERLEAVED = dict(overlap_p2p_comm=True, batch_p2p_comm=False)


@dataclasses.dataclass(frozen=True)
class Case:
    world: int
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    attention: bool = True  # False: layers without self-attention (needed for CP on CPU)


CASES = {
    "pp2": Case(2, pp=2),
    "pp2_vpp2": Case(2, pp=2, vpp=2),
    "cp2_ep2": Case(2, cp=2, ep=2, attention=False),
    "pp2_ep2": Case(4, pp=2, ep=2),
    "pp2_vpp2_ep2": Case(4, pp=2, vpp=2, ep=2),
    "cp2_pp2_ep2": Case(4, pp=2, cp=2, ep=2, attention=False),
}


# --------------------------------------------------------------------------------------
# Model, data and the single-rank run
# --------------------------------------------------------------------------------------
def model_config(case: Case, dense: bool = True):
    """4 MoE layers (4 experts, top-2, SwiGLU), fp32, no dropout, per-token loss sums."""
    return make_config(
        num_layers=LAYERS,
        num_moe_experts=EXPERTS,
        moe_token_dispatcher_type="alltoall",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_model_parallel_size=case.pp,
        virtual_pipeline_model_parallel_size=case.vpp,
        context_parallel_size=case.cp,
        expert_model_parallel_size=case.ep,
        pipeline_dtype=torch.float32,
        # Sums, not means, over tokens and micro-batches: the gradient of sum(loss) is then
        # independent of how the batch is split.
        calculate_per_token_loss=True,
        moe_dense_router_grad=dense,
        **P2P_INTERLEAVED if case.vpp else {},
    )


def layer_spec(attention: bool):
    """The local MoE layer spec, DenseMixer-rewritten; without self-attention if asked."""
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    if not attention:
        submodules = dataclasses.replace(
            spec.submodules,
            input_layernorm=IdentityOp,
            self_attention=IdentityOp,
            self_attn_bda=IdentityFuncOp,
        )
        spec = dataclasses.replace(spec, submodules=submodules)
    return densemixer_spec(spec)


def build_chunk(config, attention: bool, vp_stage: Optional[int] = None) -> GPTModel:
    """One model chunk of this pipeline rank (the whole model without pipelining)."""
    from megatron.core import parallel_state as ps

    return GPTModel(
        config,
        layer_spec(attention),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,
        vp_stage=vp_stage,
    )


def global_batch() -> Dict[str, torch.Tensor]:
    """Tokens and labels [GLOBAL_BATCH, SEQ], identical in every process."""
    gen = torch.Generator().manual_seed(1234)
    return {
        "tokens": torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen),
        "labels": torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen),
        "position_ids": torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).clone(),
    }


def causal_mask(attention: bool) -> Optional[torch.Tensor]:
    # Made explicitly: GPTModel's default causal mask is created on "cuda".
    if not attention:
        return None
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]


def single_rank_grads(attention: bool, dense: bool) -> tuple[dict, dict]:
    """(state dict, gradients) of one rank running the whole batch: the expected values.

    Needs Megatron's parallel state with every size 1 (``init_model_parallel()``).
    """
    torch.manual_seed(0)
    model = build_chunk(model_config(Case(1), dense), attention)
    batch = global_batch()
    loss = model(
        batch["tokens"], batch["position_ids"], causal_mask(attention), labels=batch["labels"]
    )
    loss.sum().backward()
    state = {  # _extra_state entries are None
        k: v.detach().clone() if isinstance(v, torch.Tensor) else v
        for k, v in model.state_dict().items()
    }
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return state, grads


# --------------------------------------------------------------------------------------
# One parallel case
# --------------------------------------------------------------------------------------
def _chunk_view(full: dict, chunk: GPTModel, ep_size: int, ep_rank: int) -> dict:
    """``full`` (single-rank names) renamed and EP-sharded for one model chunk.

    A chunk's layer j is the model's layer ``layer_number - 1``; embedding, final norm and
    output layer exist only on the stages that build them.
    """
    names = set(chunk.state_dict())
    local = {layer.layer_number - 1: j for j, layer in enumerate(chunk.decoder.layers)}
    out = {}
    for key, value in full.items():
        if key.startswith("decoder.layers."):
            index, rest = key[len("decoder.layers.") :].split(".", 1)
            if int(index) not in local:
                continue
            key = f"decoder.layers.{local[int(index)]}.{rest}"
        elif key not in names:
            continue
        out[key] = value
    return shard_moe_state_dict(out, num_experts=EXPERTS, ep_size=ep_size, ep_rank=ep_rank)


def _microbatches(case: Case) -> List[dict]:
    """This rank's micro-batches: its data-parallel share of the batch, cut in MICRO_BATCH
    sequences, and under CP its sequence chunks (Megatron's load-balanced split)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    # megatron-core 0.19 added a required is_hybrid_cp argument, and reads a missing cp_group
    # as the whole world.
    cp_kwargs = {"cp_group": ps.get_context_parallel_group()}
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        cp_kwargs["is_hybrid_cp"] = False
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = {k: v.chunk(dp_size, dim=0)[dp_rank] for k, v in global_batch().items()}
    batches = []
    for start in range(0, share["tokens"].shape[0], MICRO_BATCH):
        micro = {k: v[start : start + MICRO_BATCH] for k, v in share.items()}
        batches.append(get_batch_on_this_cp_rank(micro, **cp_kwargs))
    return batches


def _forward_step(attention: bool, data_iterator, model):
    """Megatron's forward_step_func: per-token losses, reduced to (sum, count, logs)."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], causal_mask(attention), labels=batch["labels"]
    )

    def loss_func(losses: torch.Tensor):
        total = losses.sum()
        return total, torch.tensor(losses.numel()), {"loss": total.detach()}

    return output, loss_func


def _check_case(case: Case, expected: dict) -> Dict[str, Optional[float]]:
    """Runs one case on this rank; returns its errors against the single-rank gradients."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    init_model_parallel(pp=case.pp, vpp=case.vpp, cp=case.cp, ep=case.ep)
    config = model_config(case)
    stages = [None] if case.vpp is None else list(range(case.vpp))
    chunks = [build_chunk(config, case.attention, vp_stage) for vp_stage in stages]
    ep_size = ps.get_expert_model_parallel_world_size()
    ep_rank = ps.get_expert_model_parallel_rank()
    for chunk in chunks:
        assert any(isinstance(m, DenseMixerMoELayer) for m in chunk.modules())
        weights = _chunk_view(expected["state"], chunk, ep_size, ep_rank)
        chunk.load_state_dict(weights, strict=True)

    batches = _microbatches(case)
    forward_backward = get_forward_backward_func()
    forward_backward(
        forward_step_func=functools.partial(_forward_step, case.attention),
        data_iterator=[iter(batches) for _ in chunks] if case.vpp else iter(batches),
        model=chunks if case.vpp else chunks[0],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
    )

    # DDP's gradient sums: expert params over the expert data-parallel group, every other
    # param over the data-parallel x context-parallel group.
    errors: Dict[str, Optional[float]] = {}
    actual: Dict[str, List[torch.Tensor]] = {"router": [], "experts": [], "embedding": []}
    wanted: Dict[str, List[torch.Tensor]] = {"router": [], "experts": [], "embedding": []}
    everything_actual, everything_wanted = [], []
    for chunk in chunks:
        grads = _chunk_view(expected["grads"], chunk, ep_size, ep_rank)
        for name, param in chunk.named_parameters():
            expert = ".experts." in name
            group = (
                ps.get_expert_data_parallel_group()
                if expert
                else ps.get_data_parallel_group(with_context_parallel=True)
            )
            dist.all_reduce(param.grad, group=group)
            kind = (
                "router"
                if name.endswith("router.weight")
                else "experts"
                if expert
                else "embedding"
                if name == "embedding.word_embeddings.weight"
                else None
            )
            if kind is not None:
                actual[kind].append(param.grad.flatten())
                wanted[kind].append(grads[name].flatten())
            everything_actual.append(param.grad.flatten())
            everything_wanted.append(grads[name].flatten())
    for kind in actual:
        errors[kind] = (
            rel_err(torch.cat(actual[kind]), torch.cat(wanted[kind])) if actual[kind] else None
        )
    errors["all_params"] = rel_err(torch.cat(everything_actual), torch.cat(everything_wanted))
    return errors


def _run_world(rank: int, world_size: int, names: List[str], out_path: str) -> None:
    """Runs ``names`` in this world; rank 0 writes {case: {quantity: max error over ranks}}."""
    expected = {}
    init_model_parallel()
    for attention in {CASES[name].attention for name in names}:
        state, grads = single_rank_grads(attention, dense=True)
        _, grads_conventional = single_rank_grads(attention, dense=False)
        router = [n for n in grads if n.endswith("router.weight")]
        dense_term = rel_err(
            torch.cat([grads_conventional[n].flatten() for n in router]),
            torch.cat([grads[n].flatten() for n in router]),
        )
        expected[attention] = dict(state=state, grads=grads, dense_term=dense_term)
    results = {}
    for name in names:
        case = CASES[name]
        results[name] = _check_case(case, expected[case.attention])
        results[name]["dense_term"] = expected[case.attention]["dense_term"]
    everyone = [None] * world_size
    dist.all_gather_object(everyone, results)
    if rank == 0:
        merged = {
            name: {
                q: max((r[name][q] for r in everyone if r[name][q] is not None), default=None)
                for q in results[name]
            }
            for name in names
        }
        with open(out_path, "w") as f:
            json.dump(merged, f)


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    """Runs each world size's cases once (lazily) and returns their errors by case name."""
    return cached_world_runs(
        _run_world,
        {name: case.world for name, case in CASES.items()},
        lambda: str(tmp_path_factory.mktemp("pipeline")),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_model_parallel_matches_single_rank(name, world_results):
    """Router, expert and word-embedding gradients (and every other parameter's) after
    Megatron's schedule and DDP-style sums equal one rank's on the whole batch.

    Guards the dense backward under pipeline stages (its dL/dx must reach the previous stage
    through Megatron's p2p), interleaved model chunks, micro-batches (each backward must use
    its own micro-batch's saved inputs), context-parallel token splits and EP. Tolerance: TOL.
    """
    errors = world_results(CASES[name].world)[name]
    assert errors["dense_term"] > 1e-2, "the dense router term must be visible in this batch"
    for quantity in ("router", "experts", "embedding", "all_params"):
        assert errors[quantity] is not None, f"{quantity}: no rank holds it"
        assert errors[quantity] < TOL, f"{quantity}: norm-relative error {errors[quantity]:.3g}"
