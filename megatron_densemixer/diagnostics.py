"""Router diagnostics for any Megatron Core training loop: where the router's gradient comes from.

Attach :class:`RouterDiagnostics` to a model and call :meth:`RouterDiagnostics.step` once per
optimizer step, after the backward passes. For every MoE layer it reports:

- ``dense_share``: the share of the router weight gradient that comes from the non-selected
  experts, ||D|| / (||C|| + ||D||), where D is the DenseMixer (dense) part of dL/dW_r and C the
  rest (the selected experts' task gradient plus any aux-loss / z-loss gradient);
- ``cosine``: cos(D, C), both flattened;
- ``expert_load``: the share of the step's routed (token, expert) pairs that each expert got,
  and its entropy normalised by log(num_experts) (1 = perfectly balanced);
- ``routing_flips``: the fraction of this step's tokens whose top-k expert set under the
  router's current weights differs from the set under its weights one step earlier, i.e. the
  tokens that changed expert because the router (weight, bias, expert bias) was updated.

How the gradient is split: ``DenseMixerTopKRouter.routing`` makes ``dense_probs``, the dense
weights of the non-selected experts, and DenseMixer's backward delivers u = dL/d(dense_probs).
A tensor hook captures u; the router input x and routing map come from a forward hook on the
router; the dense part of the logits' gradient is dz = J^T u with J the Jacobian of
``dense_router_probs`` at z = W_r x, and D = dz^T x. A hook on the router weight sums the whole
gradient W_r receives, T = C + D, so C = T - D. Nothing in the layer or the router changes.

Values are per rank, before any data-parallel or sequence-parallel gradient reduction. With
``log_to_tracker`` they also go to Megatron's MoE layer-wise tracker
(``compat.record_moe_metric``). Up to 0.16, ``track_moe_metrics`` (called by Megatron-LM's
``training_log``) writes them to TensorBoard / W&B next to ``load_balancing_loss``; they are
not in its ``track_names``, so it logs but does not reduce them across ranks. From 0.17 the
tracker's ``report`` logs only the names in ``track_names`` when one is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer import compat
from megatron_densemixer.router import dense_router_probs, recording_call

TRACKER_PREFIX = "densemixer_router_"
"""Prefix of the names this module writes to Megatron's MoE layer-wise tracker."""


def router_dtype(config: TransformerConfig, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype Megatron's TopKRouter.gating computes its logits in."""
    if config.moe_router_dtype == "fp32":
        return torch.float32
    if config.moe_router_dtype == "fp64":
        return torch.float64
    return input_dtype


def dense_router_weight_grad(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    routing_map: torch.Tensor,
    grad_dense_probs: torch.Tensor,
    config: TransformerConfig,
) -> torch.Tensor:
    """The dense (non-selected experts') part of the router weight gradient, D = dz^T x.

    With d = dense_router_probs(z) (see ``megatron_densemixer.router``) and u = dL/dd,

        dz_j = sum_e u_e dd_e/dz_j,   D = sum_t dz_t x_t^T

    For softmax with renormalised top-k this is dz_j = (c / S) * s_j * (u_j - sum_e u_e s_e),
    with s = softmax(z), S the selected scores' sum and c the top-k scaling factor.

    Args:
        hidden: Router input x, [num_tokens, H].
        logits: Router logits z, [num_tokens, num_experts].
        routing_map: Selected experts, bool [num_tokens, num_experts].
        grad_dense_probs: u, [num_tokens, num_experts].
        config: The layer's config (score function, renormalisation, scaling factor).

    Returns:
        D, [num_experts, H], fp32 (fp64 for fp64 logits).
    """
    with torch.enable_grad():
        z = logits.detach().requires_grad_(True)
        dense = dense_router_probs(z, routing_map, config)
        (grad_logits,) = torch.autograd.grad(dense, z, grad_dense_probs.to(dense.dtype))
    return grad_logits.t() @ hidden.to(grad_logits.dtype)


def grad_split(
    total: torch.Tensor, dense: torch.Tensor
) -> Tuple[float, float, float, Optional[float], Optional[float]]:
    """Norms and agreement of the dense part D and the conventional part C = total - D.

    Args:
        total: The whole router weight gradient T.
        dense: Its dense part D (same shape).

    Returns:
        (||T||, ||C||, ||D||, dense_share, cosine), with dense_share = ||D|| / (||C|| + ||D||)
        and cosine = <C, D> / (||C|| ||D||); each is None where its denominator is 0.
    """
    total, dense = total.double().flatten(), dense.double().flatten()
    conventional = total - dense
    norm_t, norm_c, norm_d = (float(v.norm()) for v in (total, conventional, dense))
    share = norm_d / (norm_c + norm_d) if norm_c + norm_d > 0 else None
    cosine = float(conventional @ dense) / (norm_c * norm_d) if norm_c * norm_d > 0 else None
    return norm_t, norm_c, norm_d, share, cosine


def normalized_entropy(counts: torch.Tensor) -> Optional[float]:
    """H(p) / log(n) for p = counts / sum(counts) over n bins; None for no counts or n = 1."""
    counts = counts.double().flatten()
    total = float(counts.sum())
    if total <= 0 or counts.numel() < 2:
        return None
    p = counts[counts > 0] / total
    return float(-(p * p.log()).sum()) / math.log(counts.numel())


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> int:
    """How many rows (tokens) of two bool routing maps [num_tokens, num_experts] differ."""
    return int((before != after).any(dim=-1).sum())


@dataclass
class RouterStats:
    """One MoE layer's router diagnostics for one step (all training forwards since the last).

    Gradient fields are None where the router received no gradient (frozen, or no backward);
    dense fields are None where the dense gradient was off; ``routing_flips`` is None on the
    first step.
    """

    layer_number: int
    tokens: int
    expert_load: List[float]
    load_entropy: Optional[float]
    routing_flips: Optional[float]
    grad_norm: Optional[float]
    conventional_grad_norm: Optional[float]
    dense_grad_norm: Optional[float]
    dense_share: Optional[float]
    cosine: Optional[float]

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class _LayerState:
    """Accumulators for one MoE layer between two ``step`` calls."""

    layer: MoELayer
    layer_number: int
    tokens: int = 0
    load: Optional[torch.Tensor] = None
    flipped: int = 0
    flip_tokens: int = 0
    total_grad: Optional[torch.Tensor] = None
    dense_grad: Optional[torch.Tensor] = None
    # Router parameters at the first training forward of this step and of the previous one.
    snapshot: Optional[Tuple[torch.Tensor, ...]] = None
    previous: Optional[Tuple[torch.Tensor, ...]] = None
    new_step: bool = True
    handles: List[Any] = field(default_factory=list)
    weight_hooked: bool = False


class RouterDiagnostics:
    """Per-layer router gradient, load and routing-stability diagnostics.

    Example (one optimizer step per iteration; gradient accumulation is summed)::

        diagnostics = RouterDiagnostics(model)
        for batch in data:
            loss = forward_backward(model, batch)
            stats = diagnostics.step()   # list of RouterStats, one per MoE layer
            optimizer.step()

    Hooks run only in training forwards with grad enabled, so evaluation and no-grad passes
    are not counted. The flip count costs one extra [tokens, H] x [H, E] GEMM per layer and
    step; the gradient split one small autograd call per layer and backward.

    Args:
        model: A module, or modules (e.g. Megatron's list of model chunks), holding MoE layers.
        log_to_tracker: Also write the scalars to Megatron's MoE layer-wise tracker under
            ``TRACKER_PREFIX`` + name.
        track_flips: Count the tokens that changed expert since the last step.
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.nn.Module],
        log_to_tracker: bool = True,
        track_flips: bool = True,
    ) -> None:
        modules = [model] if isinstance(model, torch.nn.Module) else list(model)
        layers = [m for chunk in modules for m in chunk.modules() if isinstance(m, MoELayer)]
        if not layers:
            raise ValueError("RouterDiagnostics: the model has no MoELayer; nothing to track.")
        self.log_to_tracker = log_to_tracker
        self.track_flips = track_flips
        self._states: List[_LayerState] = []
        for index, layer in enumerate(layers):
            if not isinstance(layer.router, TopKRouter):
                raise ValueError(
                    f"RouterDiagnostics supports TopKRouter routers, got "
                    f"{type(layer.router).__name__} in MoE layer {index}."
                )
            number = getattr(layer, "layer_number", None) or index + 1
            state = _LayerState(layer=layer, layer_number=number)
            state.handles.append(layer.router.register_forward_hook(self._make_forward_hook(state)))
            self._states.append(state)

    def remove(self) -> None:
        """Removes every hook; the object is unusable afterwards."""
        for state in self._states:
            for handle in state.handles:
                handle.remove()
            state.handles.clear()

    # Forward: load, flips, and the hooks that catch this call's gradients.
    def _make_forward_hook(self, state: _LayerState):
        def hook(router: TopKRouter, args: Tuple[Any, ...], output: Any) -> None:
            if not (router.training and torch.is_grad_enabled()):
                return
            config = router.config
            hidden = args[0].detach().reshape(-1, config.hidden_size)
            routing_map = output[1].detach().reshape(-1, config.num_moe_experts)
            valid = self._valid_tokens(args, routing_map.shape[0])
            self._record_load(state, routing_map, valid)
            if self.track_flips:
                self._record_flips(state, router, hidden, valid)
            state.new_step = False
            if router.weight.requires_grad and not state.weight_hooked:
                state.handles.append(router.weight.register_hook(self._make_weight_hook(state)))
                state.weight_hooked = True
            # The call the layer's route step is recording (this hook runs inside it).
            call = recording_call()
            dense_probs = call.dense_probs if call is not None else None
            if dense_probs is not None and dense_probs.requires_grad:
                dense_probs.register_hook(
                    self._make_dense_hook(state, router, hidden, routing_map.clone())
                )

        return hook

    @staticmethod
    def _valid_tokens(args: Tuple[Any, ...], num_tokens: int) -> Optional[torch.Tensor]:
        # TopKRouter.routing treats padding_mask True as padding (``routing_map & ~mask``),
        # whatever its docstring says; follow the code.
        mask = args[1] if len(args) > 1 else None
        if mask is None:
            return None
        return ~mask.reshape(num_tokens).bool()

    @staticmethod
    def _record_load(
        state: _LayerState, routing_map: torch.Tensor, valid: Optional[torch.Tensor]
    ) -> None:
        counted = routing_map if valid is None else routing_map[valid]
        load = counted.sum(dim=0).double()
        state.load = load if state.load is None else state.load + load
        state.tokens += counted.shape[0]

    @staticmethod
    def _router_params(router: TopKRouter) -> Tuple[torch.Tensor, ...]:
        params = (router.weight, router.bias, router.expert_bias)
        return tuple(None if p is None else p.detach().clone() for p in params)

    def _record_flips(
        self,
        state: _LayerState,
        router: TopKRouter,
        hidden: torch.Tensor,
        valid: Optional[torch.Tensor],
    ) -> None:
        if state.new_step:
            state.previous, state.snapshot = state.snapshot, self._router_params(router)
        if state.previous is None:
            return
        with torch.no_grad():
            before = _select(router, hidden, state.previous)
            after = _select(router, hidden, self._router_params(router))
        if valid is not None:
            before, after = before[valid], after[valid]
        state.flipped += changed_rows(before, after)
        state.flip_tokens += before.shape[0]

    # Backward: the whole router weight gradient, and its dense part.
    @staticmethod
    def _make_weight_hook(state: _LayerState):
        def hook(grad: torch.Tensor) -> None:
            grad = grad.detach().float()
            state.total_grad = grad if state.total_grad is None else state.total_grad + grad

        return hook

    @staticmethod
    def _make_dense_hook(
        state: _LayerState, router: TopKRouter, hidden: torch.Tensor, routing_map: torch.Tensor
    ):
        # The weights are read when the hook fires; the optimizer has not stepped yet then.
        def hook(grad: torch.Tensor) -> None:
            dtype = router_dtype(router.config, hidden.dtype)
            bias = None if router.bias is None else router.bias.detach().to(dtype)
            logits = F.linear(hidden.to(dtype), router.weight.detach().to(dtype), bias)
            dense = dense_router_weight_grad(hidden, logits, routing_map, grad, router.config)
            dense = dense.float()
            state.dense_grad = dense if state.dense_grad is None else state.dense_grad + dense

        return hook

    def step(self) -> List[RouterStats]:
        """Returns each MoE layer's stats since the last call, logs them, and resets."""
        stats = [self._layer_stats(state) for state in self._states]
        if self.log_to_tracker:
            for state, layer_stats in zip(self._states, stats, strict=True):
                _log_to_tracker(layer_stats, state.layer.config, state.layer.router.weight.device)
        for state in self._states:
            state.tokens, state.load = 0, None
            state.flipped, state.flip_tokens = 0, 0
            state.total_grad, state.dense_grad = None, None
            state.new_step = True
        return stats

    @staticmethod
    def _layer_stats(state: _LayerState) -> RouterStats:
        num_experts = state.layer.config.num_moe_experts
        load = state.load if state.load is not None else torch.zeros(num_experts)
        pairs = float(load.sum())
        grad_norm = conventional_norm = dense_norm = share = cosine = None
        if state.total_grad is not None:
            dense = state.dense_grad
            if dense is None:
                grad_norm = conventional_norm = float(state.total_grad.double().norm())
            else:
                grad_norm, conventional_norm, dense_norm, share, cosine = grad_split(
                    state.total_grad, dense
                )
        return RouterStats(
            layer_number=state.layer_number,
            tokens=state.tokens,
            expert_load=[float(v) / pairs if pairs else 0.0 for v in load.tolist()],
            load_entropy=normalized_entropy(load),
            routing_flips=state.flipped / state.flip_tokens if state.flip_tokens else None,
            grad_norm=grad_norm,
            conventional_grad_norm=conventional_norm,
            dense_grad_norm=dense_norm,
            dense_share=share,
            cosine=cosine,
        )


def _select(
    router: TopKRouter, hidden: torch.Tensor, params: Tuple[Optional[torch.Tensor], ...]
) -> torch.Tensor:
    """The top-k routing map of ``hidden`` under router parameters (weight, bias, expert bias).

    Uses Megatron's own top-k (score function, groups, expert bias) without the router's side
    effects (aux losses, token counters).
    """
    weight, bias, expert_bias = params
    config = router.config
    dtype = router_dtype(config, hidden.dtype)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    _, routing_map = moe_utils.topk_routing_with_score_function(
        logits,
        config.moe_router_topk,
        use_pre_softmax=config.moe_router_pre_softmax,
        num_groups=config.moe_router_num_groups,
        group_topk=config.moe_router_group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor,
        score_function=config.moe_router_score_function,
        expert_bias=expert_bias,
    )
    return routing_map.bool()


_TRACKED = ("dense_share", "cosine", "routing_flips", "load_entropy", "grad_norm")


def _log_to_tracker(stats: RouterStats, config: TransformerConfig, device: torch.device) -> None:
    """Adds the scalar stats to Megatron's MoE layer-wise tracker (skipping the None ones).

    The values live on the router's device, like Megatron's own aux-loss entries, so that a
    reduction over the tracker runs on the same backend.
    """
    num_layers = config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)
    for name in _TRACKED:
        value = getattr(stats, name)
        if value is None:
            continue
        compat.record_moe_metric(
            TRACKER_PREFIX + name,
            torch.tensor(float(value), device=device),
            stats.layer_number,
            num_layers,
        )
