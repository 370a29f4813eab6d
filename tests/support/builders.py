"""Configs, runs and reference inputs that several test modules share.

The config and layer builders themselves (``make_config``, ``build_dense_layer``,
``build_pair``, ...) live in ``megatron_cpu.models``, where the demo and the benchmarks use
them too. ``parallel_config`` adds the dispatcher and the TP/EP/expert-TP sizes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from megatron_cpu.models import make_config
from megatron_densemixer import DenseMixerTransformerConfig, compat
from megatron_densemixer.experts import ExpertWeights
from tests.support import reference as ref

# A plain (not DenseMixer) two-layer MoE TransformerConfig, as Megatron-LM, Megatron-Bridge
# providers or verl build one.
MOE_FIELDS = dict(
    num_layers=2,
    hidden_size=16,
    num_attention_heads=4,
    ffn_hidden_size=32,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_token_dispatcher_type="allgather",
    use_cpu_initialization=True,
)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------
def parallel_config(
    dispatcher: str = "alltoall", tp: int = 1, ep: int = 1, etp: Optional[int] = None, **kw: Any
) -> DenseMixerTransformerConfig:
    """``make_config`` with a dispatcher and TP / EP / expert-TP sizes (SP on when TP > 1)."""
    fields = dict(
        moe_token_dispatcher_type=dispatcher,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        # Megatron's MoELayer refuses to train with TP > 1 unless SP is on.
        sequence_parallel=tp > 1,
    )
    fields.update(kw)
    return make_config(**fields)


# --------------------------------------------------------------------------------------
# Specs and runs
# --------------------------------------------------------------------------------------
def mlp_module(layer_spec: Any) -> Any:
    """The module (class) a TransformerLayer spec builds its MLP from, in either spec form."""
    mlp = layer_spec.submodules.mlp
    parts = compat.moe_spec_parts(mlp)
    if parts is not None:
        return parts[0]
    return mlp.func if isinstance(mlp, functools.partial) else mlp.module


def mlp_modules(block_spec: Any) -> List[Any]:
    """``mlp_module`` of every layer of a TransformerBlock spec."""
    return [mlp_module(layer_spec) for layer_spec in block_spec.layer_specs]


def run_layer(
    layer,
    x: torch.Tensor,
    g: torch.Tensor,
    full_recompute: bool = False,
    zero_missing_grads: bool = False,
):
    """Forward + backward of loss = sum(y * g); returns y, dL/dx and the param grads.

    ``full_recompute`` wraps the call in tensor_parallel.checkpoint, as TransformerBlock's
    full-layer recompute does. Params without a grad are left out, or given zeros with
    ``zero_missing_grads`` (for callers that hand every grad to Megatron's reductions).
    """
    from megatron.core import tensor_parallel

    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    if full_recompute:
        y, _ = tensor_parallel.checkpoint(layer, False, x)
    else:
        y, _ = layer(x)
    y.backward(g)
    if zero_missing_grads:
        grads = {
            name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in layer.named_parameters()
        }
    else:
        grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


# --------------------------------------------------------------------------------------
# The float64 reference of a layer
# --------------------------------------------------------------------------------------
def reference_model(layer, config) -> ref.Model:
    """The float64 reference model holding ``layer``'s weights (biases, shared expert)."""

    def expert(mlp):
        bias = lambda lin: None if lin.bias is None else lin.bias.detach().double()  # noqa: E731
        return ref.Expert(
            mlp.linear_fc1.weight.detach().double(),
            bias(mlp.linear_fc1),
            mlp.linear_fc2.weight.detach().double(),
            bias(mlp.linear_fc2),
        )

    shared = layer.shared_experts
    return ref.Model(
        router_w=layer.router.weight.detach().double(),
        router_b=None if layer.router.bias is None else layer.router.bias.detach().double(),
        experts=[expert(mlp) for mlp in layer.experts.local_experts],
        act=config.activation_func,
        glu=config.gated_linear_unit,
        shared=expert(shared) if shared is not None else None,
        shared_gate=(
            shared.gate_weight.detach().double()
            if shared is not None and shared.gate_weight is not None
            else None
        ),
    )


def reference_routing(layer, config) -> ref.Routing:
    """The reference's routing options for ``layer`` under ``config``."""
    bias = layer.router.expert_bias
    aux = config.moe_aux_loss_coeff if config.moe_router_load_balancing_type == "aux_loss" else 0
    return ref.Routing(
        score_function=config.moe_router_score_function,
        topk=config.moe_router_topk,
        pre_softmax=config.moe_router_pre_softmax,
        scaling_factor=config.moe_router_topk_scaling_factor,
        num_groups=config.moe_router_num_groups,
        group_topk=config.moe_router_group_topk,
        expert_bias=None if bias is None else bias.detach().double(),
        variant=config.moe_dense_router_grad_variant,
        aux_loss_coeff=aux,
        z_loss_coeff=config.moe_z_loss_coeff,
    )


# --------------------------------------------------------------------------------------
# Raw expert weights and the one-token-at-a-time scores
# --------------------------------------------------------------------------------------
def make_expert_weights(
    num_experts: int,
    hidden: int,
    ffn: int,
    glu: bool,
    bias: bool,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> List[ExpertWeights]:
    """``num_experts`` random ExpertWeights (fc1 [F1, H], fc2 [H, F]; F1 = 2F if GLU)."""
    gen = torch.Generator().manual_seed(seed)
    f1 = 2 * ffn if glu else ffn

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return [
        ExpertWeights(
            rand(f1, hidden),
            rand(f1) if bias else None,
            rand(hidden, ffn),
            rand(hidden) if bias else None,
        )
        for _ in range(num_experts)
    ]


def loop_scores(
    x: torch.Tensor,
    g: torch.Tensor,
    experts: List[ExpertWeights],
    act: Callable[[torch.Tensor], torch.Tensor],
    glu: bool,
    offset: float = 0.0,
    clamp: Optional[float] = None,
) -> torch.Tensor:
    """G[t, e] = sum_h g[t, h] * E_e(x_t)[h], one token and one expert at a time, float64."""
    G = torch.zeros(x.shape[0], len(experts), dtype=torch.float64)
    for e, w in enumerate(experts):
        ffn = w.fc2_weight.shape[1]
        for t in range(x.shape[0]):
            a = w.fc1_weight.double() @ x[t].double()
            if w.fc1_bias is not None:
                a = a + w.fc1_bias.double()
            if glu:
                a_glu, a_lin = a[:ffn], a[ffn:]
                if clamp is not None:
                    a_glu, a_lin = a_glu.clamp(max=clamp), a_lin.clamp(-clamp, clamp)
                h = act(a_glu) * (a_lin + offset)
            else:
                h = act(a)
            out = w.fc2_weight.double() @ h
            if w.fc2_bias is not None:
                out = out + w.fc2_bias.double()
            G[t, e] = (g[t].double() * out).sum()
    return G


# --------------------------------------------------------------------------------------
# Megatron's MoE layer-wise metrics (test-only access)
# --------------------------------------------------------------------------------------
def moe_metrics() -> Dict[str, torch.Tensor]:
    """The live per-layer values of every MoE layer-wise metric, by name."""
    tracker = compat.get_moe_metrics_tracker
    if tracker is not None:
        return {name: entry.values for name, entry in tracker().metrics.items()}
    # megatron-core 0.16: a plain dict in moe_utils.
    from megatron.core.transformer.moe import moe_utils

    return {
        name: entry["values"]
        for name, entry in moe_utils.get_moe_layer_wise_logging_tracker().items()
    }


def remove_moe_metrics(names: Iterable[str]) -> None:
    """Drops the MoE layer-wise metrics ``names`` (absent ones are ignored)."""
    tracker = compat.get_moe_metrics_tracker
    if tracker is not None:
        metrics = tracker().metrics
    else:
        from megatron.core.transformer.moe import moe_utils

        metrics = moe_utils.get_moe_layer_wise_logging_tracker()
    for name in list(names):
        metrics.pop(name, None)


# A Hugging Face Qwen3-MoE config with 2 layers, 4 experts, top-2: every field the framework
# bridges (Megatron-Bridge, mbridge, verl) read. For transformers.Qwen3MoeConfig(**...).
TINY_QWEN3_MOE = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    moe_intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    num_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=32,
    architectures=["Qwen3MoeForCausalLM"],
)
