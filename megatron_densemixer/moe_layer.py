"""DenseMixerMoELayer: Megatron's MoELayer with DenseMixer router gradients."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer import compat
from megatron_densemixer.autograd import DenseBackwardInputs, dense_router_grad
from megatron_densemixer.ema import ExpertOutputEMA, attach_expert_output_ema
from megatron_densemixer.experts import local_expert_weights, local_experts
from megatron_densemixer.options import (
    dense_router_grad_enabled,
    dense_router_grad_options,
    validate_dense_router_grad,
)
from megatron_densemixer.reduction import DenseReduction, dense_chunk_size, dense_pairs
from megatron_densemixer.router import DenseMixerTopKRouter


class PendingDenseGrad(NamedTuple):
    """What ``route`` hands to ``postprocess`` in one forward call."""

    dense_probs: torch.Tensor
    """The router's dense weights, [num_tokens, num_experts]; receives G in the backward."""
    inputs: DenseBackwardInputs
    """Everything else the backward needs."""


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

    pending_dense_grad: Optional[PendingDenseGrad]
    """Set by ``route`` when the dense gradient is active, consumed by ``postprocess``."""

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
        self.pending_dense_grad = None
        self.dense_reduction: Optional[DenseReduction] = None
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
        self.dense_reduction = DenseReduction(
            config=config,
            chunk_size=dense_chunk_size(config, ffn_size, weights[0].fc2_weight.dtype),
            tp_ep_group=pg_collection.tp_ep,
            expert_tp_size=pg_collection.expt_tp.size(),
            expert_tp_rank=pg_collection.expt_tp.rank(),
            local_expert_offset=self.local_expert_indices[0],
        )
        options = dense_router_grad_options(config)
        if options.moe_dense_router_grad_estimator == "ema":
            self.dense_router_grad_ema = attach_expert_output_ema(
                self, config, pg_collection, options.moe_dense_router_grad_ema_decay
            )

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

    def route(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        """MoELayer.route; when active, also records what the dense backward needs."""
        probs, routing_map = super().route(hidden_states, *args, **kwargs)
        self.pending_dense_grad = None
        if self.dense_reduction is None and dense_router_grad_enabled(self.config):
            raise RuntimeError(
                "moe_dense_router_grad was turned on after this DenseMixerMoELayer was built "
                "with it off, so it has no dense reduction; set the flag in the config before "
                "building the model."
            )
        dense_probs = selected = None
        if self.dense_reduction is not None:
            router = self.densemixer_router()
            dense_probs, router.dense_probs = router.dense_probs, None
            # K: the routing map less dropped and padding pairs (token dropping).
            selected, router.dense_selected = router.dense_selected, None
            # Any trainable router parameter, the wrapper's adapter included, turns it on; a
            # fully frozen router stays exactly conventional (no reduction).
            if not any(p.requires_grad for p in self.router.parameters()):
                dense_probs = None
        if dense_probs is not None:
            options = dense_router_grad_options(self.config)
            self.pending_dense_grad = PendingDenseGrad(
                dense_probs,
                DenseBackwardInputs(
                    hidden_states=hidden_states,
                    probs=probs.detach(),
                    routing_map=selected,
                    experts=local_experts(self.experts, self.config),
                    reduction=self.dense_reduction,
                    variant=options.moe_dense_router_grad_variant,
                    token_fraction=options.moe_dense_router_grad_token_fraction,
                    pairs=dense_pairs(
                        dense_probs.detach(), selected, self.config, self.dense_pair_generator
                    ),
                ),
            )
        if self.dense_router_grad_ema is not None:
            self.dense_router_grad_ema.start(active=self.pending_dense_grad is not None)
        return probs, routing_map

    def postprocess(self, output: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """MoELayer.postprocess, then DenseMixer's straight-through function when active."""
        output = super().postprocess(output, *args, **kwargs)
        pending, self.pending_dense_grad = self.pending_dense_grad, None
        if pending is not None:
            if self.dense_router_grad_ema is not None:
                pending.inputs.ema_table = self.dense_router_grad_ema.finish()
            output = dense_router_grad(output, pending.dense_probs, pending.inputs)
        return output


def check_dense_router_grad_applied(model: Any) -> None:
    """Raises if a model's config asks for DenseMixer but an MoE layer would not apply it.

    Call it once on a built model (a module or a list of model chunks) wherever the plugin
    does not build the model itself: a custom spec, a framework's own model builder. The
    launcher, the Megatron-Bridge provider wrapper and the verl patches call it for you.

    Raises:
        RuntimeError: an MoE layer whose config has ``moe_dense_router_grad=True`` is not a
            DenseMixerMoELayer with a DenseMixerTopKRouter (its spec was not passed through
            ``densemixer_spec``), so it would train conventionally.
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if not (isinstance(module, MoELayer) and dense_router_grad_enabled(module.config)):
                continue
            if not (
                isinstance(module, DenseMixerMoELayer)
                and isinstance(module.router, DenseMixerTopKRouter)
            ):
                raise RuntimeError(
                    f"moe_dense_router_grad=True, but MoE layer {name or type(chunk).__name__} "
                    f"is a {type(module).__name__} with router {type(module.router).__name__}: "
                    "it would train conventionally. Build the layer spec with "
                    "megatron_densemixer.densemixer_spec(spec)."
                )
