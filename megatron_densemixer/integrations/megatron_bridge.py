"""DenseMixer for Megatron-Bridge model providers (used by NeMo-RL and verl's default path).

A Megatron-Bridge ``GPTModelProvider`` is itself the TransformerConfig handed to GPTModel, and
its ``transformer_layer_spec`` may be a ModuleSpec or a callable taking the provider.
:func:`densemixer_provider` replaces that field with
``functools.partial(densemixer_provider_layer_spec, base_spec=<the old spec>, **options)``, which at
build time sets the ``moe_dense_router_grad*`` attributes the provider lacks, validates them,
builds the old spec and rewrites it with :func:`megatron_densemixer.densemixer_spec`.

Why a partial of a module-level function: Megatron-Bridge saves providers to YAML
(``run_config.yaml``), writing a partial as ``{_target_: <module>.<function>, _partial_: true,
<keywords>}``, and loads them back only for targets on its allowlist (prefixes ``megatron.``,
``torch.``, ``nvidia.``, ``transformers.``, ``numpy.``, ``nemo.``, no ``_private`` path
segments). :func:`densemixer_provider` therefore registers ``megatron_densemixer.`` with
``register_allowed_target_prefix`` in the calling process; :func:`allow_densemixer_targets`
does it alone for a process that only loads such a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Optional, Union

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_densemixer.check import check_dense_router_grad_applied
from megatron_densemixer.integrations import require_version
from megatron_densemixer.options import (
    OPTION_NAMES,
    DenseMixerOptions,
    check_option_names,
    dense_router_grad_enabled,
    validate_dense_router_grad,
)
from megatron_densemixer.spec import call_spec_function, densemixer_spec

TARGET_PREFIX = "megatron_densemixer."

# Megatron-Bridge releases this module supports (apply_overrides_and_finalize arrived in 0.5).
SUPPORTED_BRIDGE = ">=0.5,<0.7"
TESTED_BRIDGE = "0.5.1, 0.6.2"

SpecOrFunction = Union[ModuleSpec, Callable[..., Any]]


def provider_options(**options: Any) -> dict[str, Any]:
    """The defaults of every DenseMixer option, updated with ``options`` (names checked)."""
    check_option_names(options, "densemixer_provider")
    return {**dataclasses.asdict(DenseMixerOptions()), **options}


def densemixer_provider_layer_spec(
    config: Any,
    vp_stage: Optional[int] = None,
    *,
    base_spec: Optional[SpecOrFunction] = None,
    **options: Any,
) -> Any:
    """The ``transformer_layer_spec`` callable that :func:`densemixer_provider` installs.

    Args:
        config: The provider (the TransformerConfig GPTModel gets).
        vp_stage: Virtual pipeline stage, forwarded to ``base_spec`` when it takes one.
        base_spec: The provider's previous spec (ModuleSpec or callable); None means
            Megatron-Bridge's ``default_layer_spec``.
        **options: ``moe_dense_router_grad*`` values, set on ``config`` where it lacks them
            (``dataclasses.replace`` drops attributes that are not fields, and NeMo-RL rebuilds
            providers with it); attributes already there, e.g. from verl's overrides, win.

    Returns:
        ``base_spec``'s spec, with DenseMixer MoE layers when ``moe_dense_router_grad`` is on.
    """
    for name, value in provider_options(**options).items():
        if not hasattr(config, name):
            setattr(config, name, value)
    validate_dense_router_grad(config)
    _record_options_in_spec(config)
    if base_spec is None:
        base_spec = importlib.import_module(
            "megatron.bridge.models.gpt_provider"
        ).default_layer_spec
    spec = base_spec
    if callable(base_spec) and not isinstance(base_spec, ModuleSpec):
        spec = call_spec_function(base_spec, config, vp_stage)
    if not dense_router_grad_enabled(config):
        return spec
    return densemixer_spec(spec)


def _record_options_in_spec(provider: Any) -> None:
    """Copies the provider's ``moe_dense_router_grad*`` attributes into its spec partial.

    Options set as attributes after :func:`densemixer_provider` (verl's and Bridge's
    ``apply_overrides_and_finalize``) are not dataclass fields, so Bridge's ``run_config.yaml``
    would drop them; the partial's keywords are saved. Done when the model is built, which
    precedes every checkpoint save.
    """
    spec = getattr(provider, "transformer_layer_spec", None)
    if isinstance(spec, functools.partial) and spec.func is densemixer_provider_layer_spec:
        values = {name: getattr(provider, name) for name in OPTION_NAMES}
        provider.transformer_layer_spec = functools.partial(
            spec.func, *spec.args, **dict(spec.keywords, **values)
        )


def check_built_model(model: list[Any]) -> list[Any]:
    """Bridge pre-wrap hook: :func:`check_dense_router_grad_applied`, returning ``model``."""
    check_dense_router_grad_applied(model)
    return model


def densemixer_provider(provider: Any, **options: Any) -> Any:
    """Returns ``provider`` with a DenseMixer-aware ``transformer_layer_spec`` and options.

    Works on a Megatron-Bridge GPTModelProvider or any object with a ``transformer_layer_spec``
    attribute (ModuleSpec or callable). The provider is changed in place and returned, as
    Megatron-Bridge's own ``apply_overrides_and_finalize`` does; the ``moe_dense_router_grad*``
    attributes are set too, so attribute-checked overrides (``provider.moe_dense_router_grad
    = True``) are accepted afterwards. Calling it twice does not wrap twice.

    Where the provider has Megatron-Bridge's ``register_pre_wrap_hook``, :func:`check_built_model`
    is registered, so ``provide_distributed_model`` (and Bridge's ``get_model``) raise if the
    flag is on but a built MoE layer is not DenseMixer's (e.g. a spec swapped after this call).
    A bare ``provide()`` runs no hooks.

    Args:
        provider: The model provider.
        **options: ``moe_dense_router_grad*`` values, e.g. ``moe_dense_router_grad=True``.

    Returns:
        ``provider``.
    """
    if not hasattr(provider, "transformer_layer_spec"):
        raise TypeError(
            f"densemixer_provider: {type(provider).__name__} has no transformer_layer_spec; "
            "pass a Megatron-Bridge GPTModelProvider (or a provider with that field)."
        )
    values = provider_options(**options)
    spec = provider.transformer_layer_spec
    if isinstance(spec, functools.partial) and spec.func is densemixer_provider_layer_spec:
        spec = functools.partial(spec.func, *spec.args, **dict(spec.keywords, **options))
    else:
        spec = functools.partial(densemixer_provider_layer_spec, base_spec=spec, **options)
    provider.transformer_layer_spec = spec
    for name, value in values.items():
        if name in options or not hasattr(provider, name):
            setattr(provider, name, value)
    register = getattr(provider, "register_pre_wrap_hook", None)
    if register is not None and check_built_model not in getattr(provider, "_pre_wrap_hooks", ()):
        register(check_built_model)
    allow_densemixer_targets(required=False)
    return provider


def allow_densemixer_targets(required: bool = True) -> bool:
    """Adds ``megatron_densemixer.`` to Megatron-Bridge's config-loading allowlist.

    Needed in every process that loads a saved provider whose spec is DenseMixer's.

    Args:
        required: Raise when Megatron-Bridge is not installed (otherwise return False).

    Returns:
        Whether the prefix was registered.

    Raises:
        ImportError: Megatron-Bridge is absent and ``required``, or is an unsupported release
            (see ``SUPPORTED_BRIDGE``).
    """
    try:
        instantiate_utils = importlib.import_module("megatron.bridge.utils.instantiate_utils")
    except ImportError as error:
        if required:
            raise ImportError(
                f"allow_densemixer_targets needs Megatron-Bridge ({error}); "
                "pip install megatron-bridge."
            ) from error
        return False
    require_version("megatron-bridge", SUPPORTED_BRIDGE, TESTED_BRIDGE)
    register = getattr(instantiate_utils, "register_allowed_target_prefix", None)
    if register is None:
        # Megatron-Bridge releases before the allowlist load any target.
        return False
    register(TARGET_PREFIX)
    return True


__all__ = [
    "SUPPORTED_BRIDGE",
    "TARGET_PREFIX",
    "allow_densemixer_targets",
    "check_built_model",
    "densemixer_provider",
    "densemixer_provider_layer_spec",
    "provider_options",
]
