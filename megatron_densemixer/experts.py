"""The expert function as the dense reduction sees it: weights, activation, G.

G[t, e] = <g_t, E_e(x_t)> is only DenseMixer's gradient when E_e is exactly the function the
forward applied. ``expert_functions`` therefore reads weights (``ExpertWeights`` views, the fast
path: two dense GEMMs per expert) only where every linear of Megatron's expert modules
(SequentialMLP, GroupedMLP, TEGroupedMLP) is one it recognises exactly; anything that wraps a
linear (Megatron-Bridge's LoRA / DoRA ``AdapterWrapper``, other adapters) or replaces the
activation gets an ``ExpertModule``, whose G comes from running the experts module itself
on every token (the same FLOPs: fc1, activation, fc2, then a row-wise dot with g).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from megatron.core.extensions.transformer_engine import (
    TEColumnParallelGroupedLinear,
    TEColumnParallelLinear,
    TERowParallelGroupedLinear,
    TERowParallelLinear,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer import compat

# Linears whose output is exactly weight @ x (+ bias): the fast path may read their weights.
_FC1_LINEARS = (ColumnParallelLinear, TEColumnParallelLinear)
_FC2_LINEARS = (RowParallelLinear, TERowParallelLinear)


class ExpertWeights(NamedTuple):
    """One local expert, E_e(x) = fc2_weight @ act(fc1_weight @ x + fc1_bias) + fc2_bias.

    Weights use torch.nn.Linear's [out, in] layout: fc1_weight [F1, H] (F1 = 2F for gated
    units), fc2_weight [H, F]. Under expert tensor parallelism they are this rank's F slice.
    """

    fc1_weight: torch.Tensor
    fc1_bias: Optional[torch.Tensor]
    fc2_weight: torch.Tensor
    fc2_bias: Optional[torch.Tensor]


class ExpertModule(NamedTuple):
    """Local experts evaluated by running their module: E_e(x) is what ``module`` computes for e.

    Used where a linear is wrapped or unrecognised; see ``expert_functions``.
    """

    module: torch.nn.Module
    """SequentialMLP, GroupedMLP or TEGroupedMLP, called as MoELayer calls it."""
    num_local_experts: int


ExpertFunctions = Union[Sequence[ExpertWeights], ExpertModule]


def expert_activation(fc1_output: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """act(a), or act(a_glu) * (a_linear + glu_linear_offset) for gated linear units.

    Mirrors megatron.core.transformer.mlp.MLP's unfused activation, clamping included.
    """
    if not config.gated_linear_unit:
        return config.activation_func(fc1_output)
    a_glu, a_linear = torch.chunk(fc1_output, 2, dim=-1)
    clamp = getattr(config, "activation_func_clamp_value", None)
    if clamp is not None:
        a_glu = a_glu.clamp(min=None, max=clamp)
        a_linear = a_linear.clamp(min=-clamp, max=clamp)
    return config.activation_func(a_glu) * (a_linear + getattr(config, "glu_linear_offset", 0.0))


def expert_routing_weight_grads(
    hidden: torch.Tensor,
    grad: torch.Tensor,
    experts: Sequence[ExpertWeights],
    config: TransformerConfig,
    chunk_size: int,
    add_fc2_bias: bool = True,
    pairs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """G[t, e] = <g_t, E_e(x_t)> for every token and local expert, chunk by chunk.

    For E_e(x) = W2 h + b2 with h = act(W1 x + b1):

        G[t, e] = <W2^T g_t, h_t> + <g_t, b2>

    so each expert costs two dense GEMMs over the shared tokens (x W1^T and g W2) and a
    row-wise dot product; no permutation. Only one chunk of h and W2^T g is alive at a time.

    Precision notes: the GEMMs run in the expert weights' dtype, as the conventional expert
    forward does; the dot products accumulate in fp32 (fp64 for fp64 weights).

    Args:
        hidden: Expert input x, [num_tokens, H].
        grad: Gradient g of the MoE output, [num_tokens, H].
        experts: The local experts' weights.
        config: The layer's config (activation function, gated linear unit).
        chunk_size: Tokens per chunk.
        add_fc2_bias: Add <g, b2>; False on all but one rank of an expert-TP group, since b2
            is replicated there while the W2 slices' partial G are summed.
        pairs: Optional bool [num_tokens, len(experts)]: compute only these (token, expert)
            pairs (gathering their tokens), leaving 0 elsewhere. None computes every pair.

    Returns:
        G, [num_tokens, len(experts)], in the accumulation dtype.
    """
    if isinstance(experts, ExpertModule):
        return _module_routing_weight_grads(hidden, grad, experts, chunk_size, pairs)
    num_tokens = hidden.shape[0]
    accumulate = torch.promote_types(experts[0].fc2_weight.dtype, torch.float32)
    shape, device = (num_tokens, len(experts)), hidden.device
    new = torch.empty if pairs is None else torch.zeros
    weight_grads = new(shape, dtype=accumulate, device=device)
    for e, w in enumerate(experts):
        rows = None if pairs is None else pairs[:, e].nonzero().squeeze(1)
        count = num_tokens if rows is None else rows.numel()
        for start in range(0, count, chunk_size):
            index = slice(start, min(start + chunk_size, count))
            if rows is not None:
                index = rows[index]
            weight_grads[index, e] = _weights_routing_weight_grads(
                hidden[index], grad[index], w, config, add_fc2_bias
            )
    return weight_grads


def _weights_routing_weight_grads(
    x: torch.Tensor,
    g: torch.Tensor,
    w: ExpertWeights,
    config: TransformerConfig,
    add_fc2_bias: bool,
) -> torch.Tensor:
    """<W2^T g_t, h_t> (+ <g_t, b2>) for one block of tokens and one expert, [C]."""
    accumulate = torch.promote_types(w.fc2_weight.dtype, torch.float32)
    x = x.to(w.fc1_weight.dtype)
    g = g.to(w.fc2_weight.dtype)
    h = expert_activation(F.linear(x, w.fc1_weight, w.fc1_bias), config)  # [C, F]
    u = g @ w.fc2_weight  # [C, F]
    weight_grads = torch.linalg.vecdot(h.to(accumulate), u.to(accumulate))
    if add_fc2_bias and w.fc2_bias is not None:
        weight_grads += g.to(accumulate) @ w.fc2_bias.to(accumulate)
    return weight_grads


def _optional(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Transformer Engine keeps an empty tensor where a module has no bias.
    return tensor if tensor is not None and tensor.numel() > 0 else None


def _module_routing_weight_grads(
    hidden: torch.Tensor,
    grad: torch.Tensor,
    experts: ExpertModule,
    chunk_size: int,
    pairs: Optional[torch.Tensor],
) -> torch.Tensor:
    """G from the experts module itself: each local expert gets every token of a chunk.

    The module is called as MoELayer's dispatcher calls it, with the chunk repeated once per
    local expert, ``tokens_per_expert`` = chunk size for each, and routing probs 1, so its
    output rows are E_e(x_t) (biases included). Under expert TP each rank's output is its
    partial sum, which the forward also sums across the group; fc2's bias is therefore never
    added separately here. ``pairs`` masks the result (no work is saved on this path).
    """
    num_tokens, num_local = hidden.shape[0], experts.num_local_experts
    dtype = next(experts.module.parameters()).dtype
    accumulate = torch.promote_types(dtype, torch.float32)
    weight_grads = hidden.new_empty((num_tokens, num_local), dtype=accumulate)
    # The chunk budget is per expert; this path holds every local expert's activations.
    step = max(1, chunk_size // num_local)
    for start in range(0, num_tokens, step):
        x = hidden[start : start + step].to(dtype)
        g = grad[start : start + step].to(accumulate)
        count = x.shape[0]
        tokens_per_expert = torch.full((num_local,), count, dtype=torch.long)
        probs = torch.ones(num_local * count, dtype=torch.float32, device=x.device)
        output, bias = experts.module(x.repeat(num_local, 1), tokens_per_expert, probs)
        if bias is not None:
            output = output + bias
        output = output.view(num_local, count, -1).to(accumulate)
        weight_grads[start : start + count] = torch.linalg.vecdot(output, g.unsqueeze(0)).T
    return weight_grads if pairs is None else weight_grads * pairs


def expert_functions(experts: torch.nn.Module, config: TransformerConfig) -> ExpertFunctions:
    """What the dense reduction evaluates for this layer's local experts, read at forward time.

    ``ExpertWeights`` views (the fast path) when every expert linear is one this module
    recognises exactly and the activation is the config's unfused one; otherwise (a PEFT
    wrapper around a linear, TE's activation module, ...) an ``ExpertModule`` that runs the
    experts module itself. Called per forward, since PEFT wraps linears after the model is
    built.

    Raises:
        ValueError: ``experts`` is not SequentialMLP, GroupedMLP or TEGroupedMLP.
    """
    if compat.GroupedMLP is not None and isinstance(experts, compat.GroupedMLP):
        return local_expert_weights(experts)
    if isinstance(experts, compat.SequentialMLP):
        recognised = not config.use_te_activation_func and all(
            type(mlp) is MLP
            and type(mlp.linear_fc1) in _FC1_LINEARS
            and type(mlp.linear_fc2) in _FC2_LINEARS
            for mlp in experts.local_experts
        )
    elif isinstance(experts, compat.TEGroupedMLP):
        recognised = (
            not config.use_te_activation_func
            and type(experts.linear_fc1) is TEColumnParallelGroupedLinear
            and type(experts.linear_fc2) is TERowParallelGroupedLinear
        )
    else:
        return local_expert_weights(experts)  # raises, naming the module
    if recognised:
        return local_expert_weights(experts)
    return ExpertModule(experts, experts.num_local_experts)


def local_expert_weights(experts: torch.nn.Module) -> List[ExpertWeights]:
    """The local experts' weights, as [out, in] views (no copies), for the dense reduction.

    Supports SequentialMLP (local or TE linears), GroupedMLP (legacy grouped GEMM, where the
    installed megatron-core has it) and TEGroupedMLP.
    """
    if isinstance(experts, compat.SequentialMLP):
        return [
            ExpertWeights(
                mlp.linear_fc1.weight,
                _optional(getattr(mlp.linear_fc1, "bias", None)),
                mlp.linear_fc2.weight,
                _optional(getattr(mlp.linear_fc2, "bias", None)),
            )
            for mlp in experts.local_experts
        ]
    if isinstance(experts, compat.TEGroupedMLP):
        fc1, fc2 = experts.linear_fc1, experts.linear_fc2
        return [
            ExpertWeights(
                getattr(fc1, f"weight{i}"),
                _optional(getattr(fc1, f"bias{i}", None)),
                getattr(fc2, f"weight{i}"),
                _optional(getattr(fc2, f"bias{i}", None)),
            )
            for i in range(experts.num_local_experts)
        ]
    if compat.GroupedMLP is not None and isinstance(experts, compat.GroupedMLP):
        hidden_size = experts.config.hidden_size
        # GroupedMLP stores x -> h as [E, H, F1] and h -> y as [E, F, H]; it has no biases.
        w1 = experts.weight1.view(experts.num_local_experts, hidden_size, -1)
        w2 = experts.weight2.view(experts.num_local_experts, -1, hidden_size)
        return [
            ExpertWeights(w1[e].t(), None, w2[e].t(), None)
            for e in range(experts.num_local_experts)
        ]
    raise ValueError(
        f"moe_dense_router_grad=True does not support expert module {type(experts).__name__}; "
        "use SequentialMLP, GroupedMLP or TEGroupedMLP."
    )
