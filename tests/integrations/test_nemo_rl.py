"""NeMo-RL's ``policy.megatron_cfg.model_overrides`` with the DenseMixer options.

NeMo-RL is not installable here (PyPI carries only a 0.0.0 placeholder; its releases install
from git with their own uv environments), so these tests drive
``patch_nemo_rl_model_overrides`` against a stand-in ``nemo_rl.models.megatron.setup`` whose
``_merge_model_overrides`` follows the contract of NeMo-RL main's (read from its source,
``nemo_rl/models/megatron/setup.py``): the top-level call takes ``(provider, overrides)``,
accepts only the provider's ``init`` dataclass fields (AttributeError naming
``policy.megatron_cfg.model_overrides.<name>`` otherwise), recurses into nested mappings with
the path as third argument, and returns ``dataclasses.replace(provider, **updates)``. v0.7.0
has no ``model_overrides`` and no such function. Limitation: NeMo-RL's own code is not run.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import Any

import pytest
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_densemixer import DenseMixerMoELayer
from megatron_densemixer.integrations import is_patched, nemo_rl
from tests.support.builders import MOE_FIELDS, mlp_modules

pytestmark = pytest.mark.usefixtures("model_parallel")

SETUP = "nemo_rl.models.megatron.setup"


def local_block_spec(config: Any, vp_stage: int | None = None) -> Any:
    return get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage)


@dataclasses.dataclass
class Provider(TransformerConfig):
    """Shaped like Megatron-Bridge's GPTModelProvider: the config, plus a spec field."""

    transformer_layer_spec: Any = local_block_spec


def merge_model_overrides(
    target: Any, overrides: dict, path: str = "policy.megatron_cfg.model_overrides"
) -> Any:
    """The stand-in for NeMo-RL main's ``_merge_model_overrides`` (see the module docstring)."""
    if isinstance(target, dict):
        return {**target, **overrides}
    init_fields = {f.name for f in dataclasses.fields(target) if f.init}
    updates = {}
    for name, value in overrides.items():
        if name not in init_fields:
            raise AttributeError(
                f"{path}.{name} does not match a configurable field on "
                f"Megatron Bridge config {type(target).__name__}."
            )
        current = getattr(target, name)
        nested = isinstance(value, dict) and isinstance(current, dict)
        updates[name] = merge_model_overrides(current, value, f"{path}.{name}") if nested else value
    return dataclasses.replace(target, **updates)


@pytest.fixture
def setup_module(monkeypatch):
    """The stand-in module, registered under NeMo-RL's name for this test only."""
    module = types.ModuleType(SETUP)
    module._merge_model_overrides = merge_model_overrides
    monkeypatch.setitem(sys.modules, SETUP, module)
    return module


def build_spec(provider: Any) -> Any:
    return provider.transformer_layer_spec(provider, vp_stage=None)


def test_without_the_patch_the_option_is_refused(setup_module):
    """What a NeMo-RL main user meets without the patch: DenseMixer options are not
    provider fields, so model_overrides rejects them."""
    with pytest.raises(AttributeError, match="model_overrides.moe_dense_router_grad does not"):
        setup_module._merge_model_overrides(Provider(**MOE_FIELDS), {"moe_dense_router_grad": True})


def test_patched_merge_applies_the_options(setup_module):
    """With the patch the DenseMixer keys are taken out, the rest merged as NeMo-RL does,
    and the rebuilt provider builds DenseMixer layers; the input provider is untouched."""
    nemo_rl.patch_nemo_rl_model_overrides()
    nemo_rl.patch_nemo_rl_model_overrides()  # twice: no double wrapping
    merge = setup_module._merge_model_overrides
    assert is_patched(merge) and merge.__wrapped__ is merge_model_overrides
    provider = Provider(**MOE_FIELDS)
    merged = merge(
        provider,
        {"moe_dense_router_grad": True, "moe_dense_router_grad_topm": 3, "hidden_size": 32},
    )
    assert merged is not provider and merged.hidden_size == 32
    assert merged.transformer_layer_spec.keywords["moe_dense_router_grad"] is True
    assert mlp_modules(build_spec(merged)) == [DenseMixerMoELayer] * 2
    assert merged.moe_dense_router_grad_topm == 3
    assert mlp_modules(build_spec(provider)) == [MoELayer] * 2
    with pytest.raises(AttributeError, match="model_overrides.typo does not"):
        merge(provider, {"typo": 1, "moe_dense_router_grad": True})


def test_nested_merges_pass_through(setup_module):
    """NeMo-RL's recursion calls the (patched) function with the path: left alone."""
    nemo_rl.patch_nemo_rl_model_overrides()
    merged = setup_module._merge_model_overrides({"a": 1}, {"b": 2}, "path.x")
    assert merged == {"a": 1, "b": 2}


def test_unsupported_nemo_rl_is_refused(monkeypatch):
    """v0.7.0 (no model_overrides, no _merge_model_overrides) and a missing NeMo-RL each stop
    with a message naming what is supported and what to do instead."""
    monkeypatch.setitem(sys.modules, SETUP, types.ModuleType(SETUP))
    with pytest.raises(ImportError, match="v0.7.0 and earlier have no such key"):
        nemo_rl.patch_nemo_rl_model_overrides()
    monkeypatch.setitem(sys.modules, SETUP, None)
    with pytest.raises(ImportError, match="needs NeMo-RL"):
        nemo_rl.patch_nemo_rl_model_overrides()
