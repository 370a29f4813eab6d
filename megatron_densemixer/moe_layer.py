"""DenseMixerMoELayer: Megatron's MoELayer with DenseMixer router gradients."""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer import compat
from megatron_densemixer.autograd import DenseReduction, ExpertWeights, dense_router_grad
from megatron_densemixer.config import dense_router_grad_enabled, validate_dense_router_grad
from megatron_densemixer.router import DenseMixerTopKRouter


def _optional(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Transformer Engine keeps an empty tensor where a module has no bias.
    return tensor if tensor is not None and tensor.numel() > 0 else None


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


def dense_chunk_bytes_per_token(
    config: TransformerConfig, ffn_size: int, dtype: torch.dtype
) -> int:
    """Activation bytes per token of one chunk of the dense reduction, for one expert.

    W1 x (F1 values), h and W2^T g (F each) in the weights' dtype, plus h and W2^T g in fp32.
    """
    f1 = 2 * ffn_size if config.gated_linear_unit else ffn_size
    element = torch.empty((), dtype=dtype).element_size()
    return element * (f1 + 2 * ffn_size) + 4 * 2 * ffn_size


def dense_chunk_size(config: TransformerConfig, ffn_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk of the dense reduction.

    ``moe_dense_router_grad_chunk_size`` if set; otherwise the most tokens whose chunk
    activations (``dense_chunk_bytes_per_token``) fit ``moe_dense_router_grad_chunk_budget_mb``.
    """
    chunk_size = getattr(config, "moe_dense_router_grad_chunk_size", None)
    if chunk_size:
        return chunk_size
    budget = getattr(config, "moe_dense_router_grad_chunk_budget_mb", 256.0) * 2**20
    return max(1, int(budget // dense_chunk_bytes_per_token(config, ffn_size, dtype)))


def dense_pairs(
    dense_probs: torch.Tensor, routing_map: torch.Tensor, config: TransformerConfig
) -> Optional[torch.Tensor]:
    """The (token, expert) pairs the backward scores under the opt-in approximations.

    None (every pair, the exact gradient) unless ``moe_dense_router_grad_topm`` or
    ``moe_dense_router_grad_token_fraction`` is set. Top-M keeps K plus the M - k
    non-selected experts with the highest scores (K stays in, as the gated baseline needs
    its G); the token fraction keeps each token with probability f.
    """
    topm = getattr(config, "moe_dense_router_grad_topm", None)
    fraction = getattr(config, "moe_dense_router_grad_token_fraction", 1.0)
    if topm is None and fraction >= 1.0:
        return None
    pairs = torch.ones_like(routing_map)
    if topm is not None:
        extra = dense_probs.topk(topm - config.moe_router_topk, dim=-1).indices
        pairs = routing_map.clone().scatter_(1, extra, True)
    if fraction < 1.0:
        keep = torch.rand(routing_map.shape[0], device=routing_map.device) < fraction
        pairs &= keep.unsqueeze(1)
    return pairs


class DenseMixerMoELayer(MoELayer):
    """MoELayer whose router also learns from every expert's output (DenseMixer).

    With ``moe_dense_router_grad`` off, or when no gradient is being computed, it is exactly
    MoELayer. With it on, the forward is MoELayer's, bitwise; ``postprocess`` wraps the output
    in ``dense_router_grad``, whose backward recomputes every local expert on the layer's input
    chunk by chunk and returns DenseMixer's gradient for the router's dense weights.

    Takes MoELayer's arguments. A router spec left at Megatron's TopKRouter is upgraded to
    DenseMixerTopKRouter, so swapping the layer class in a spec is enough.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        tp_group: Any = None,
        **kwargs: Any,
    ) -> None:
        # tp_group: TransformerLayer (<= 0.17) passes it instead of pg_collection to any MLP
        # whose module is not MoELayer itself; MoELayer then uses the default process groups.
        del tp_group
        validate_dense_router_grad(config)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        enabled = dense_router_grad_enabled(config)
        if enabled and submodules is not None and submodules.router is TopKRouter:
            submodules = compat.replace_router(submodules, DenseMixerTopKRouter)
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            **kwargs,
        )
        self._pending_dense: Optional[tuple] = None
        self.dense_reduction: Optional[DenseReduction] = None
        if not enabled:
            return
        if not isinstance(self.router, DenseMixerTopKRouter):
            raise ValueError(
                f"moe_dense_router_grad=True requires DenseMixerTopKRouter, got router "
                f"{type(self.router).__name__}; build the spec with densemixer_spec()."
            )
        weights = local_expert_weights(self.experts)
        ffn_size = weights[0].fc2_weight.shape[1]
        self.dense_reduction = DenseReduction(
            config=config,
            local_experts=lambda: local_expert_weights(self.experts),
            chunk_size=dense_chunk_size(config, ffn_size, weights[0].fc2_weight.dtype),
            tp_ep_group=pg_collection.tp_ep,
            expert_tp_size=pg_collection.expt_tp.size(),
            expert_tp_rank=pg_collection.expt_tp.rank(),
            local_expert_offset=self.local_expert_indices[0],
        )

    def route(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        """MoELayer.route; when active, also keeps what the dense backward needs."""
        probs, routing_map = super().route(hidden_states, *args, **kwargs)
        dense_probs = self.router.pop_dense_probs() if self.dense_reduction else None
        if dense_probs is not None:
            pairs = dense_pairs(dense_probs.detach(), routing_map, self.config)
            self._pending_dense = (dense_probs, hidden_states, probs.detach(), routing_map, pairs)
        return probs, routing_map

    def postprocess(self, output: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """MoELayer.postprocess, then DenseMixer's straight-through function when active."""
        output = super().postprocess(output, *args, **kwargs)
        pending, self._pending_dense = self._pending_dense, None
        if pending is not None:
            dense_probs, hidden_states, probs, routing_map, pairs = pending
            output = dense_router_grad(
                output,
                dense_probs,
                hidden_states,
                probs,
                routing_map,
                self.dense_reduction,
                getattr(self.config, "moe_dense_router_grad_variant", "partscale"),
                pairs,
                getattr(self.config, "moe_dense_router_grad_token_fraction", 1.0),
            )
        return output
