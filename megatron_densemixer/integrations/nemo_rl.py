"""DenseMixer for Megatron-Bridge model providers (NeMo-RL, verl's Megatron-Bridge path).

A Megatron-Bridge ``GPTModelProvider`` is itself the TransformerConfig handed to GPTModel, and
its ``transformer_layer_spec`` may be a ModuleSpec or a callable taking the provider.
:func:`densemixer_provider` replaces that field with
``functools.partial(densemixer_layer_spec, base_spec=<the old spec>, **options)``, which at
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
import inspect
from typing import Any, Callable, Optional, Union

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_densemixer.config import (
    DenseMixerTransformerConfig,
    dense_router_grad_enabled,
    validate_dense_router_grad,
)
from megatron_densemixer.integrations.megatron_lm import DENSEMIXER_ARGS, densemixer_layer_spec

TARGET_PREFIX = "megatron_densemixer."

SpecOrFunction = Union[ModuleSpec, Callable[..., Any]]


def default_options(**options: Any) -> dict[str, Any]:
    """DenseMixerTransformerConfig's defaults for every ``moe_dense_router_grad*`` field,
    updated with ``options``; raises ValueError for an unknown name."""
    unknown = sorted(set(options) - set(DENSEMIXER_ARGS))
    if unknown:
        raise ValueError(
            f"unknown DenseMixer option(s) {unknown}; expected some of {sorted(DENSEMIXER_ARGS)}."
        )
    fields = dataclasses.fields(DenseMixerTransformerConfig)
    values = {f.name: f.default for f in fields if f.name in DENSEMIXER_ARGS}
    values.update(options)
    return values


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
    for name, value in default_options(**options).items():
        if not hasattr(config, name):
            setattr(config, name, value)
    validate_dense_router_grad(config)
    if base_spec is None:
        base_spec = importlib.import_module(
            "megatron.bridge.models.gpt_provider"
        ).default_layer_spec
    spec = base_spec
    if callable(base_spec) and not isinstance(base_spec, ModuleSpec):
        if "vp_stage" in inspect.signature(base_spec).parameters:
            spec = base_spec(config, vp_stage=vp_stage)
        else:
            spec = base_spec(config)
    if not dense_router_grad_enabled(config):
        return spec
    return densemixer_layer_spec(spec)


def densemixer_provider(provider: Any, **options: Any) -> Any:
    """Returns ``provider`` with a DenseMixer-aware ``transformer_layer_spec`` and options.

    Works on a Megatron-Bridge GPTModelProvider or any object with a ``transformer_layer_spec``
    attribute (ModuleSpec or callable). The provider is changed in place and returned, as
    Megatron-Bridge's own ``apply_overrides_and_finalize`` does; the ``moe_dense_router_grad*``
    attributes are set too, so attribute-checked overrides (``provider.moe_dense_router_grad
    = True``) are accepted afterwards. Calling it twice does not wrap twice.

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
    values = default_options(**options)
    spec = provider.transformer_layer_spec
    if isinstance(spec, functools.partial) and spec.func is densemixer_provider_layer_spec:
        spec = functools.partial(spec.func, *spec.args, **dict(spec.keywords, **options))
    else:
        spec = functools.partial(densemixer_provider_layer_spec, base_spec=spec, **options)
    provider.transformer_layer_spec = spec
    for name, value in values.items():
        if name in options or not hasattr(provider, name):
            setattr(provider, name, value)
    allow_densemixer_targets(required=False)
    return provider


def allow_densemixer_targets(required: bool = True) -> bool:
    """Adds ``megatron_densemixer.`` to Megatron-Bridge's config-loading allowlist.

    Needed in every process that loads a saved provider whose spec is DenseMixer's.

    Args:
        required: Raise when Megatron-Bridge is not installed (otherwise return False).

    Returns:
        Whether the prefix was registered.
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
    register = getattr(instantiate_utils, "register_allowed_target_prefix", None)
    if register is None:
        # Megatron-Bridge releases before the allowlist load any target.
        return False
    register(TARGET_PREFIX)
    return True


def patch_nemo_rl_model_overrides() -> None:
    """Lets ``policy.megatron_cfg.model_overrides.moe_dense_router_grad*`` reach the provider.

    NeMo-RL's ``_merge_model_overrides`` accepts only the provider's dataclass fields, which
    the DenseMixer options are not. This wraps it (explicitly, in the calling process: the
    process that builds the Megatron model) to take those keys out of the top-level overrides,
    merge the rest as before, and apply them with :func:`densemixer_provider`.

    Raises:
        ImportError: NeMo-RL is not installed, or it no longer has ``_merge_model_overrides``.
    """
    try:
        setup = importlib.import_module("nemo_rl.models.megatron.setup")
    except ImportError as error:
        raise ImportError(f"patch_nemo_rl_model_overrides needs NeMo-RL ({error}).") from error
    merge = getattr(setup, "_merge_model_overrides", None)
    if merge is None:
        raise ImportError(
            "nemo_rl.models.megatron.setup._merge_model_overrides is gone in this NeMo-RL; "
            "call megatron_densemixer.integrations.nemo_rl.densemixer_provider on the provider "
            "instead."
        )
    if getattr(merge, "__densemixer__", False):
        return

    @functools.wraps(merge)
    def merge_with_densemixer(target: Any, overrides: dict, *args: Any, **kwargs: Any) -> Any:
        options = {k: v for k, v in overrides.items() if k in DENSEMIXER_ARGS}
        rest = {k: v for k, v in overrides.items() if k not in DENSEMIXER_ARGS}
        merged = merge(target, rest, *args, **kwargs)
        if options and "path" not in kwargs and not args:
            merged = densemixer_provider(merged, **options)
        return merged

    merge_with_densemixer.__densemixer__ = True  # type: ignore[attr-defined]
    setup._merge_model_overrides = merge_with_densemixer


__all__ = [
    "allow_densemixer_targets",
    "default_options",
    "densemixer_provider",
    "densemixer_provider_layer_spec",
    "patch_nemo_rl_model_overrides",
]
