"""Flag on, nothing happens: the checks that make that impossible without a word.

A config can ask for DenseMixer (``moe_dense_router_grad=True``) while a model still trains
conventionally: its layer spec was not passed through ``densemixer_spec`` (plain MoELayers),
its routers are frozen (NeMo-RL's ``freeze_moe_router``, PEFT freezing every base weight), or
a CUDA graph replays its routers. ``check_dense_router_grad_applied`` raises for the first
case when called on a built model; the watch below runs the same check by itself:

- validating a config (``validate_dense_router_grad``, which DenseMixer's config classes, the
  layer and every integration run) installs one module-registration hook (PyTorch's
  ``register_module_module_registration_hook``): it runs only while modules are assigned to
  their parents, i.e. at model build, and costs nothing per step;
- every Megatron MoE layer whose config has the flag on, or is a DenseMixer config class (its
  flag may be switched on after build), gets a forward pre-hook on its router (the one module
  every path runs, the EP overlap schedule's included, which calls the layer's step methods
  rather than its forward);
- at the first training forward (module in training mode, grad enabled) of any of them, the
  watched layers of that config in training mode (a model's layers share its config) are
  looked at together: a layer that would train conventionally raises, and so does a training
  forward under a local CUDA graph that replays the routers (the hooks stay, so every
  training forward raises again); otherwise frozen routers are named in one warning and the
  hooks are removed (also when the flag is off by then). Forwards without grad (inference
  copies, RL log-prob passes) leave the hooks in place and are never refused.

The flag and the options are read when a layer is built and the check looks at the first
training forward: a flag switched on after that, or an option changed after build, is not
seen (a DenseMixerMoELayer keeps the options it was built with).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Dict, List

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_densemixer.options import (
    DenseMixerOptions,
    cuda_graph_scope_names,
    dense_router_grad_enabled,
    replays_router,
)

logger = logging.getLogger("megatron_densemixer")

# id(config) -> the watched MoE layers built with it; the group is looked at once.
_WATCHED: Dict[int, List["weakref.ReferenceType[MoELayer]"]] = {}
_HOOK_ATTR = "_dense_router_grad_watch"
_registration_handle: Any = None


def applies_dense_router_grad(layer: Any) -> bool:
    """Whether an MoE layer applies DenseMixer: a DenseMixerMoELayer whose router is (or
    wraps, as PEFT does) a DenseMixerTopKRouter."""
    find_router = getattr(layer, "densemixer_router", None)
    if find_router is None:
        return False
    try:
        find_router()
    except ValueError:
        return False
    return True


def _not_applied_message(names: List[str], layers: List[Any]) -> str:
    kinds = "; ".join(
        sorted({f"{type(m).__name__} with router {type(m.router).__name__}" for m in layers})
    )
    which = f"MoE layer {names[0]} is a" if len(names) == 1 else f"MoE layers {names} are"
    return (
        f"moe_dense_router_grad=True, but {which} {kinds}: it would train conventionally. "
        "Build the layer spec with megatron_densemixer.densemixer_spec(spec)."
    )


def check_dense_router_grad_applied(model: Any) -> None:
    """Raises if a model's config asks for DenseMixer but an MoE layer would not apply it.

    Optional: the same check runs by itself at the first training forward of every Megatron
    MoE layer whose config has the flag on. Calling it right after build fails earlier.

    Args:
        model: A module, or a list of model chunks.

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
            if not applies_dense_router_grad(module):
                raise RuntimeError(_not_applied_message([name or type(chunk).__name__], [module]))


def watch_moe_layers() -> None:
    """Installs the module-registration hook that watches MoE layers (idempotent)."""
    global _registration_handle
    if _registration_handle is None:
        _registration_handle = torch.nn.modules.module.register_module_module_registration_hook(
            _on_module_registered
        )


def _on_module_registered(parent: torch.nn.Module, name: str, module: Any) -> None:
    if isinstance(module, MoELayer):
        watch_moe_layer(module)
    elif name == "router" and isinstance(parent, MoELayer) and hasattr(parent, _HOOK_ATTR):
        # A router replaced after build (a PEFT wrapper): the hook follows the new router.
        _hook_router(parent, module)


def watch_moe_layer(layer: MoELayer) -> None:
    """Watches one MoE layer whose config has the flag on or is a DenseMixer config class
    (no-op otherwise, or if already watched)."""
    config = layer.config
    if hasattr(layer, _HOOK_ATTR) or not (
        dense_router_grad_enabled(config) or isinstance(config, DenseMixerOptions)
    ):
        return
    _WATCHED.setdefault(id(layer.config), []).append(weakref.ref(layer))
    _hook_router(layer, layer.router)


def _hook_router(layer: MoELayer, router: torch.nn.Module) -> None:
    previous = getattr(layer, _HOOK_ATTR, None)
    if previous is not None:
        previous.remove()
    layer_ref = weakref.ref(layer)
    handle = router.register_forward_pre_hook(_first_training_forward_hook(layer_ref))
    object.__setattr__(layer, _HOOK_ATTR, handle)


def _first_training_forward_hook(layer_ref: "weakref.ReferenceType[MoELayer]") -> Callable:
    def hook(router: torch.nn.Module, args: Any) -> None:
        layer = layer_ref()
        if layer is None or not (router.training and torch.is_grad_enabled()):
            return
        _look_at_group(layer)

    return hook


def _look_at_group(layer: MoELayer) -> None:
    """Looks once at the watched layers sharing ``layer``'s config that are in training mode
    (a model's layers share its config; an inference copy in eval mode is left out).

    Raises (keeping the hooks, so every training forward raises again) for layers that would
    train conventionally; otherwise warns once about frozen routers and removes the hooks.
    """
    refs = _WATCHED.get(id(layer.config), [])
    alive = [m for m in (r() for r in refs) if m is not None]
    group = [m for m in alive if m.training] or [layer]
    config = layer.config
    if not dense_router_grad_enabled(config):
        # A DenseMixer config whose flag is still off when training starts: nothing to check.
        _stop_watching(config, alive, group)
        return
    not_applied = [m for m in group if not applies_dense_router_grad(m)]
    if not_applied:
        raise RuntimeError(_not_applied_message(_layer_names(not_applied), not_applied))
    if replays_router(config):
        raise RuntimeError(
            f"moe_dense_router_grad=True: this model trains with cuda_graph_impl="
            f"{config.cuda_graph_impl!r} and a cuda_graph_scope that replays the router "
            f"({_scope_names(config)}), so no dense weights would be made and the routers "
            "would train conventionally. Capture attention only (cuda_graph_scope=['attn']) "
            "or set cuda_graph_impl='none' for training; an inference copy of the model (no "
            "gradients) may keep its CUDA graphs."
        )
    _stop_watching(config, alive, group)
    frozen = [m for m in group if not any(p.requires_grad for p in m.router.parameters())]
    if frozen:
        logger.warning(
            "moe_dense_router_grad=True, but the routers of MoE layer(s) %s have no trainable "
            "parameter: those layers train conventionally, without DenseMixer's gradient. "
            "Unfreeze them (freeze_moe_router: false in NeMo-RL and verl), or under PEFT make "
            "the router trainable or give it an adapter (e.g. a LoRA target on the router).",
            _layer_names(frozen),
        )


def _stop_watching(config: Any, alive: List[MoELayer], group: List[MoELayer]) -> None:
    """Removes ``group``'s hooks; the rest of ``alive`` stays watched under ``config``."""
    _WATCHED[id(config)] = [weakref.ref(m) for m in alive if m not in group]
    for member in group:
        handle = getattr(member, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            object.__setattr__(member, _HOOK_ATTR, None)


def _layer_names(layers: List[Any]) -> List[str]:
    return [f"layer_number={getattr(m, 'layer_number', '?')}" for m in layers]


def _scope_names(config: Any) -> str:
    names = cuda_graph_scope_names(config)
    return ", ".join(names) if names else "the whole layer"
