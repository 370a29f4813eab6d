"""DenseMixerMoELayer: Megatron's MoELayer with DenseMixer router gradients."""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer import compat
from megatron_densemixer.autograd import (
    DenseBackwardInputs,
    DenseEstimator,
    DenseRouterGradCall,
    dense_router_grad,
    dense_weight_grad,
)
from megatron_densemixer.check import watch_moe_layer
from megatron_densemixer.ema import EMAEstimator, ExpertOutputEMA, build_expert_output_ema
from megatron_densemixer.experts import expert_functions, local_expert_weights
from megatron_densemixer.options import (
    dense_router_grad_enabled,
    dense_router_grad_options,
    validate_dense_router_grad,
)
from megatron_densemixer.ring import (
    ExactEstimator,
    TokenRing,
    dense_chunk_size,
    dense_pairs,
)
from megatron_densemixer.router import DenseMixerTopKRouter, recording_dense_router_grad


class DenseMixerMoELayer(MoELayer):
    """MoELayer whose router also learns from every expert's output (DenseMixer).

    With ``moe_dense_router_grad`` off, or when no gradient is being computed, it is exactly
    MoELayer. With it on, the forward is MoELayer's, bitwise; ``postprocess`` wraps the output
    in ``dense_router_grad``, whose backward recomputes every local expert on the layer's input
    chunk by chunk and returns DenseMixer's gradient for the router's dense weights.

    Takes MoELayer's arguments. A router spec left at Megatron's TopKRouter is upgraded to
    DenseMixerTopKRouter, so swapping the layer class in a spec is enough.

    Raises:
        ValueError: the config's DenseMixer options are invalid, or the flag is on and the
            router or expert module is one the dense reduction does not cover.
    """

    dense_call: Optional[DenseRouterGradCall]
    """The forward call in flight between ``route`` and ``postprocess``: set by ``route``
    when the dense gradient is active, taken by ``postprocess`` (the same lifetime as
    Megatron's token dispatcher's own per-call state). The backward never reads it: each
    autograd Function holds its own call's record."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        tp_group: Any = None,
        **kwargs: Any,
    ) -> None:
        # tp_group: what TransformerLayer (<= 0.17) may pass to an MLP that is not MoELayer
        # itself; the layer's process groups come from compat.mlp_process_groups instead.
        del tp_group
        # Validated at every layer build, also for a DenseMixer config class that validated
        # itself: a field assigned after the config was built (a dataclass does not re-run
        # __post_init__) would otherwise reach the backward unchecked.
        validate_dense_router_grad(config)
        pg_collection = compat.mlp_process_groups(pg_collection)
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
        self.dense_call = None
        self.dense_options = dense_router_grad_options(config)
        self.dense_token_ring: Optional[TokenRing] = None
        # The opt-in token sampling draws from its own generator, never the global one.
        self.dense_pair_generator = torch.Generator().manual_seed(
            torch.initial_seed() + (layer_number or 0)
        )
        self.dense_router_grad_ema: Optional[ExpertOutputEMA] = None
        if not enabled:
            return
        if not isinstance(self.router, DenseMixerTopKRouter):
            raise ValueError(
                f"moe_dense_router_grad=True requires DenseMixerTopKRouter, got router "
                f"{type(self.router).__name__}; build the spec with densemixer_spec()."
            )
        weights = local_expert_weights(self.experts)
        ffn_size = weights[0].fc2_weight.shape[1]
        self.dense_token_ring = TokenRing(
            config=config,
            chunk_size=dense_chunk_size(config, ffn_size, weights[0].fc2_weight.dtype),
            tp_ep_group=pg_collection.tp_ep,
            expert_tp_size=pg_collection.expt_tp.size(),
            expert_tp_rank=pg_collection.expt_tp.rank(),
            local_expert_offset=self.local_expert_indices[0],
        )
        if self.dense_options.moe_dense_router_grad_estimator == "ema":
            self.dense_router_grad_ema = build_expert_output_ema(
                self, config, pg_collection, self.dense_options.moe_dense_router_grad_ema_decay
            )
            self.experts.register_forward_hook(self._add_expert_output_sums, with_kwargs=True)
        watch_moe_layer(self)

    def densemixer_router(self) -> DenseMixerTopKRouter:
        """The DenseMixer router, also behind PEFT wrappers (``to_wrap``) added after build.

        Raises:
            ValueError: no DenseMixerTopKRouter is found under ``self.router``.
        """
        router = self.router
        while not isinstance(router, DenseMixerTopKRouter):
            inner = getattr(router, "to_wrap", None)
            if inner is None:
                raise ValueError(
                    f"moe_dense_router_grad=True: the layer's router {type(self.router).__name__}"
                    " wraps no DenseMixerTopKRouter (a wrapper must keep it as ``to_wrap`` and "
                    "call its ``routing``); build the spec with densemixer_spec() before wrapping."
                )
            router = inner
        return router

    def dense_router_grad_active(self) -> bool:
        """Whether this forward call takes the dense gradient.

        Flag on (at build), grad enabled (not eval without grad, RL log-prob passes or the
        first pass of activation recompute) and any router parameter trainable, a PEFT
        wrapper's adapter included; a fully frozen router stays exactly conventional.

        Raises:
            RuntimeError: the flag was turned on after the layer was built with it off.
        """
        if self.dense_token_ring is None:
            if dense_router_grad_enabled(self.config):
                raise RuntimeError(
                    "moe_dense_router_grad was turned on after this DenseMixerMoELayer was "
                    "built with it off, so it has no dense reduction; set the flag in the "
                    "config before building the model."
                )
            return False
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.router.parameters())

    def route(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        """MoELayer.route; when active, the router side of the dense gradient.

        Raises:
            RuntimeError: active, but the router made no dense weights: its forward did not
                run (a CUDA graph replayed the router) or its logits carry no gradient.
        """
        self.dense_call = None
        call = DenseRouterGradCall() if self.dense_router_grad_active() else None
        with recording_dense_router_grad(call):
            probs, routing_map = super().route(hidden_states, *args, **kwargs)
        if call is None:
            return probs, routing_map
        if call.dense_probs is None:
            raise RuntimeError(
                "moe_dense_router_grad=True: this training forward's route step made no dense "
                "router weights (the router did not run, e.g. replayed from a CUDA graph whose "
                "cuda_graph_scope holds moe_router, moe or the whole layer, or its logits have "
                "no gradient), so the router would train conventionally. Capture attention "
                "only (cuda_graph_scope=['attn']) or set cuda_graph_impl='none'."
            )
        dense_probs, call.dense_probs = call.dense_probs, None
        call.hidden_states = hidden_states.detach()
        call.probs = probs.detach()
        call.pairs = dense_pairs(
            dense_probs.detach(), call.selected, self.dense_options, self.dense_pair_generator
        )
        self.dense_call = call
        return dense_router_grad(probs, dense_probs, call), routing_map

    def postprocess(self, output: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """MoELayer.postprocess; when active, the output side of the dense gradient."""
        output = super().postprocess(output, *args, **kwargs)
        call, self.dense_call = self.dense_call, None
        if call is None:
            return output
        hidden_states = call.hidden_states
        if output.numel() != hidden_states.numel():
            raise RuntimeError(
                f"moe_dense_router_grad: postprocess got {tuple(output.shape)} but the route "
                f"step of the call in flight saw {tuple(hidden_states.shape)}; a schedule must "
                "run an MoE layer's route ... postprocess of one forward call before the next."
            )
        options = self.dense_options
        inputs = DenseBackwardInputs(
            hidden_states=hidden_states,
            probs=call.probs,
            selected=call.selected,
            estimator=self._estimator(call),
            variant=options.moe_dense_router_grad_variant,
            topk_scaling_factor=self.config.moe_router_topk_scaling_factor,
            token_fraction=options.moe_dense_router_grad_token_fraction,
            pairs=call.pairs,
        )
        # From here the saved tensors live in the Function alone; the record keeps the slot
        # for the gradient.
        call.hidden_states = call.probs = call.selected = call.pairs = None
        return dense_weight_grad(output, inputs, call)

    def _estimator(self, call: DenseRouterGradCall) -> DenseEstimator:
        """The estimator of G for this call: the EMA table after this call's update, or the
        exact reduction over this rank's experts."""
        if self.dense_router_grad_ema is not None:
            sums, call.expert_output_sums = call.expert_output_sums, None
            return EMAEstimator(self.dense_router_grad_ema.update(sums))
        return ExactEstimator(self.dense_token_ring, expert_functions(self.experts, self.config))

    def _add_expert_output_sums(
        self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        """Forward hook of the experts module (EMA estimator): adds this call's sums."""
        call = self.dense_call
        if call is None:
            return
        block = self.dense_router_grad_ema.expert_output_block(module, args, kwargs, output)
        sums = call.expert_output_sums
        call.expert_output_sums = block if sums is None else sums + block
