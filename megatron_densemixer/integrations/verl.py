"""DenseMixer for verl's Megatron workers, loaded as verl's ``external_lib``.

    actor_rollout_ref.model.external_lib=megatron_densemixer.integrations.verl
    +actor_rollout_ref.actor.megatron.override_transformer_config.moe_dense_router_grad=True

verl imports ``external_lib`` in every worker when it builds the model config
(``import_external_libs``), and nowhere else can a plugin reach those processes; importing this
module is therefore the explicit call that patches, and it patches every verl model path that is
installed:

- Megatron-Bridge (verl's default): ``AutoBridge.to_megatron_provider`` returns the provider
  through :func:`~megatron_densemixer.integrations.megatron_bridge.densemixer_provider`, which
  gives it the ``moe_dense_router_grad*`` attributes (so verl's attribute-checked overrides
  accept them) and a layer spec that turns DenseMixer on when the flag is set;
- vanilla mbridge (``vanilla_mbridge=True``): ``Bridge.set_extra_args`` keeps the DenseMixer
  keys out of ``TransformerConfig(**kwargs)``, which rejects unknown keys, and sets them on the
  built config; ``LLMBridge._get_transformer_layer_spec`` rewrites mbridge's block spec;
- no bridge (verl's own ``hf_to_mcore_config`` / ``init_mcore_model``): the same for
  ``check_and_construct_configs`` and the block spec of ``model_initializer``.

Every patch leaves a model conventional unless ``moe_dense_router_grad`` is on. A path whose
package is absent is skipped; a path whose package is present but lacks the function patched
raises ImportError naming it, rather than leaving the flag silently ignored.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

from megatron_densemixer.check import check_dense_router_grad_applied
from megatron_densemixer.integrations import is_patched, mark_patched, require_version
from megatron_densemixer.integrations.megatron_bridge import (
    SUPPORTED_BRIDGE,
    TESTED_BRIDGE,
    densemixer_provider,
)
from megatron_densemixer.options import (
    dense_router_grad_enabled,
    split_options,
    validate_dense_router_grad,
)
from megatron_densemixer.spec import densemixer_spec


def apply_options(config: Any, options: dict[str, Any]) -> Any:
    """Sets DenseMixer options on a built TransformerConfig and validates them."""
    for name, value in options.items():
        setattr(config, name, value)
    validate_dense_router_grad(config)
    return config


def spec_for(config: Any, spec: Any) -> Any:
    """``spec`` rewritten for DenseMixer when ``config`` has the flag on, else unchanged."""
    return densemixer_spec(spec) if dense_router_grad_enabled(config) else spec


# Releases each path supports: verl 0.9 (its Megatron-Bridge default path and
# apply_overrides_and_finalize), mbridge as verl 0.9 installs it.
SUPPORTED_VERL = ">=0.9,<0.10"
SUPPORTED_MBRIDGE = ">=0.15,<0.16"


def _import(module: str) -> Any:
    """The module, or None when its package is not installed (that path is not in use).

    A package that is installed but fails to import (a missing dependency of its own) raises:
    skipping it would leave ``moe_dense_router_grad`` silently unapplied on that path.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and module.startswith(error.name):
            return None
        raise


def _target(module: Any, owner: Any, name: str) -> Callable[..., Any]:
    """``owner.name``, or an ImportError saying that this version lacks it."""
    function = getattr(owner, name, None)
    if function is None:
        raise ImportError(
            f"megatron_densemixer.integrations.verl: {module.__name__} has no "
            f"{getattr(owner, '__name__', owner)}.{name} to patch; this version is not "
            "supported. Pin a supported release or call megatron_densemixer's functions directly."
        )
    return function


def patch_megatron_bridge() -> bool:
    """Megatron-Bridge path: providers from ``AutoBridge.to_megatron_provider``."""
    module = _import("megatron.bridge.models.conversion.auto_bridge")
    if module is None:
        return False
    require_version("megatron-bridge", SUPPORTED_BRIDGE, TESTED_BRIDGE)
    original = _target(module, module.AutoBridge, "to_megatron_provider")
    if is_patched(original):
        return True

    @functools.wraps(original)
    def to_megatron_provider(self: Any, *args: Any, **kwargs: Any) -> Any:
        return densemixer_provider(original(self, *args, **kwargs))

    mark_patched(module.AutoBridge, "to_megatron_provider", to_megatron_provider)
    return True


def patch_mbridge() -> bool:
    """Vanilla mbridge path: ``set_extra_args`` -> ``TransformerConfig(**cfg)``, own spec."""
    bridge_module = _import("mbridge.core.bridge")
    llm_module = _import("mbridge.core.llm_bridge")
    if bridge_module is None or llm_module is None:
        return False
    require_version("mbridge", SUPPORTED_MBRIDGE, "0.15.1")
    bridge_cls, llm_cls = bridge_module.Bridge, llm_module.LLMBridge
    set_extra_args = _target(bridge_module, bridge_cls, "set_extra_args")
    layer_spec = _target(llm_module, llm_cls, "_get_transformer_layer_spec")
    get_model = _target(bridge_module, bridge_cls, "get_model")
    if is_patched(set_extra_args):
        return True

    @functools.wraps(set_extra_args)
    def set_extra_args_wrapper(self: Any, **kwargs: Any) -> Any:
        options, rest = split_options(kwargs)
        # Kept on the bridge: a later set_extra_args rebuilds the config from scratch.
        self._densemixer_options = {**getattr(self, "_densemixer_options", {}), **options}
        result = set_extra_args(self, **rest)
        apply_options(self.config, self._densemixer_options)
        return result

    @functools.wraps(layer_spec)
    def layer_spec_wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return spec_for(self.config, layer_spec(self, *args, **kwargs))

    @functools.wraps(get_model)
    def get_model_wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        model = get_model(self, *args, **kwargs)
        check_dense_router_grad_applied(model)
        return model

    mark_patched(bridge_cls, "set_extra_args", set_extra_args_wrapper)
    mark_patched(llm_cls, "_get_transformer_layer_spec", layer_spec_wrapper)
    mark_patched(bridge_cls, "get_model", get_model_wrapper)
    return True


def patch_verl_no_bridge() -> bool:
    """No-bridge path: verl's ``hf_to_mcore_config`` and ``init_mcore_model``."""
    converter = _import("verl.models.mcore.config_converter")
    initializer = _import("verl.models.mcore.model_initializer")
    if converter is None or initializer is None:
        return False
    require_version("verl", SUPPORTED_VERL, "0.9.1")
    construct = _target(converter, converter, "check_and_construct_configs")
    block_spec = _target(initializer, initializer, "get_gpt_decoder_block_spec")
    if is_patched(construct):
        return True

    @functools.wraps(construct)
    def construct_wrapper(original_config: dict, cls: type) -> Any:
        options, rest = split_options(original_config)
        return apply_options(construct(rest, cls), options)

    @functools.wraps(block_spec)
    def block_spec_wrapper(config: Any, *args: Any, **kwargs: Any) -> Any:
        return spec_for(config, block_spec(config, *args, **kwargs))

    mark_patched(converter, "check_and_construct_configs", construct_wrapper)
    mark_patched(initializer, "get_gpt_decoder_block_spec", block_spec_wrapper)
    return True


def enable() -> list[str]:
    """Patches every installed verl model path; returns the names of those patched.

    Raises:
        ImportError: None of the paths is installed, an installed one has changed, or one is
            an unsupported release (``SUPPORTED_VERL``, ``SUPPORTED_MBRIDGE``,
            ``SUPPORTED_BRIDGE``).
    """
    patched = [
        name
        for name, patch in (
            ("megatron-bridge", patch_megatron_bridge),
            ("mbridge", patch_mbridge),
            ("verl-no-bridge", patch_verl_no_bridge),
        )
        if patch()
    ]
    if not patched:
        raise ImportError(
            "megatron_densemixer.integrations.verl found none of Megatron-Bridge "
            "(megatron.bridge), mbridge or verl.models.mcore to patch; install verl's Megatron "
            "dependencies."
        )
    return patched


# verl's external_lib contract: importing the module is the call (see the module docstring).
PATCHED_PATHS = enable()
