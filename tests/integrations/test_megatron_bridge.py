"""Megatron-Bridge providers (NeMo-RL, verl's default path) made DenseMixer ones.

A stand-in provider (a TransformerConfig dataclass with a ``transformer_layer_spec`` field, as
GPTModelProvider is) covers the logic with megatron-core alone; the allowlist test needs
Megatron-Bridge itself and is skipped where it is not installed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import pytest
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer import DenseMixerMoELayer
from megatron_densemixer.integrations import megatron_bridge
from tests.support.builders import MOE_FIELDS, mlp_modules

pytestmark = pytest.mark.usefixtures("model_parallel")


def local_block_spec(config: Any, vp_stage: int | None = None) -> Any:
    return get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage)


@dataclasses.dataclass
class ToyProvider(TransformerConfig):
    """Shaped like Megatron-Bridge's GPTModelProvider: the config, plus a spec field."""

    transformer_layer_spec: Any = local_block_spec


def toy_provider() -> ToyProvider:
    return ToyProvider(**MOE_FIELDS)


def provide_spec(provider: Any, vp_stage: int | None = None) -> Any:
    """What GPTModelProvider.provide does with transformer_layer_spec."""
    spec = provider.transformer_layer_spec
    if "vp_stage" in inspect.signature(spec).parameters:
        return spec(provider, vp_stage=vp_stage)
    return spec(provider)


def test_provider_builds_densemixer_layers():
    """The wrapped spec callable rewrites the provider's own spec when the flag is on."""
    provider = megatron_bridge.densemixer_provider(toy_provider(), moe_dense_router_grad=True)
    spec = provider.transformer_layer_spec
    assert isinstance(spec, functools.partial)
    assert spec.func is megatron_bridge.densemixer_provider_layer_spec
    assert spec.keywords["base_spec"] is local_block_spec
    assert mlp_modules(provide_spec(provider, vp_stage=None)) == [DenseMixerMoELayer] * 2


def test_flag_off_stays_conventional_and_verl_override_turns_it_on():
    """verl sets overrides with hasattr checks after the provider is made: both must work."""
    provider = megatron_bridge.densemixer_provider(toy_provider())
    assert provider.moe_dense_router_grad is False
    assert mlp_modules(provide_spec(provider)) == [MoELayer] * 2
    provider.moe_dense_router_grad = True  # Megatron-Bridge's apply_overrides_and_finalize
    assert mlp_modules(provide_spec(provider)) == [DenseMixerMoELayer] * 2


def test_options_survive_dataclasses_replace():
    """NeMo-RL rebuilds providers with dataclasses.replace, which drops non-field attributes."""
    provider = megatron_bridge.densemixer_provider(toy_provider(), moe_dense_router_grad=True)
    rebuilt = dataclasses.replace(provider, hidden_size=16)
    assert not hasattr(rebuilt, "moe_dense_router_grad")
    assert mlp_modules(provide_spec(rebuilt)) == [DenseMixerMoELayer] * 2
    assert rebuilt.moe_dense_router_grad is True


def test_wrapping_twice_does_not_nest():
    """Calling densemixer_provider again updates the options instead of nesting partials."""
    provider = megatron_bridge.densemixer_provider(toy_provider(), moe_dense_router_grad=True)
    provider = megatron_bridge.densemixer_provider(provider, moe_dense_router_grad_topm=3)
    assert provider.transformer_layer_spec.keywords["base_spec"] is local_block_spec
    assert provider.transformer_layer_spec.keywords["moe_dense_router_grad_topm"] == 3


def test_invalid_options_raise():
    """Unknown names fail at once; invalid values fail when the spec is built."""
    with pytest.raises(ValueError, match="unknown DenseMixer option"):
        megatron_bridge.densemixer_provider(toy_provider(), moe_densemixer=True)
    provider = megatron_bridge.densemixer_provider(
        toy_provider(), moe_dense_router_grad=True, moe_dense_router_grad_topm=9
    )
    with pytest.raises(ValueError, match="moe_dense_router_grad_topm=9 must satisfy"):
        provide_spec(provider)
    with pytest.raises(TypeError, match="has no transformer_layer_spec"):
        megatron_bridge.densemixer_provider(object())


def test_spec_target_is_a_public_module_level_function():
    """Megatron-Bridge serialises the partial as its function's dotted path and rejects
    '_private' segments; the path must import back to the same function."""
    import importlib

    function = megatron_bridge.densemixer_provider_layer_spec
    path = f"{function.__module__}.{function.__qualname__}"
    assert not any(part.startswith("_") for part in path.split("."))
    module, name = path.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is function
    assert path.startswith(megatron_bridge.TARGET_PREFIX)


def test_megatron_bridge_allowlist_accepts_the_target():
    """Against Megatron-Bridge's own allowlist (its instantiate_utils)."""
    instantiate_utils = pytest.importorskip(
        "megatron.bridge.utils.instantiate_utils",
        reason="Megatron-Bridge is not installed (needs Python >= 3.12 for current releases)",
    )
    function = megatron_bridge.densemixer_provider_layer_spec
    target = f"{function.__module__}.{function.__qualname__}"
    assert megatron_bridge.allow_densemixer_targets() is True
    instantiate_utils._validate_target_prefix(target=target, full_key="transformer_layer_spec")
