"""verl's external_lib: moe_dense_router_grad through override_transformer_config.

Drives the installed verl 0.9, mbridge and Megatron-Bridge (the 3.12 lane of
``make test-matrix`` with megatron-core 0.18: verl 0.9's own pins): verl's default
Megatron-Bridge path (through verl's own ``verl.models.mcore.bridge`` import), the vanilla
mbridge path and the no-bridge path. Skipped, with the reason, where verl is not installed.
"""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from tests.support import transformer_engine_stub

if importlib.util.find_spec("verl") is None:
    pytest.skip(
        "verl is not installed in this venv (make test-matrix installs verl 0.9.1 in the "
        "megatron-core 0.18 lane)",
        allow_module_level=True,
    )
if transformer_engine_stub.megatron_bridge_installed():
    # Megatron-Bridge must import (it needs Transformer Engine at import) before the external
    # lib patches it, as in a verl worker.
    transformer_engine_stub.import_megatron_bridge()
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from megatron.core.models.gpt import gpt_layer_specs  # noqa: E402
from megatron.core.transformer.enums import AttnBackend  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402

from megatron_densemixer import DenseMixerMoELayer  # noqa: E402
from megatron_densemixer.integrations import require_version  # noqa: E402
from megatron_densemixer.integrations import verl as dm_verl  # noqa: E402
from tests.support.builders import TINY_QWEN3_MOE, mlp_modules  # noqa: E402

pytestmark = pytest.mark.usefixtures("model_parallel")


def tiny_qwen3_moe():
    return transformers.Qwen3MoeConfig(**TINY_QWEN3_MOE)


def local_block_spec(config, use_transformer_engine=True, **kwargs):
    # No Transformer Engine on CPU: verl and mbridge ask for the TE spec; build the local one.
    return gpt_layer_specs.get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, **kwargs
    )


def test_no_bridge_config_and_spec():
    """verl's hf_to_mcore_config accepts the flag (TransformerConfig(**kw) alone would not)."""
    from verl.models.mcore import config_converter, model_initializer

    assert "verl-no-bridge" in dm_verl.PATCHED_PATHS
    config = config_converter.hf_to_mcore_config_qwen3moe(
        tiny_qwen3_moe(), torch.float32, moe_dense_router_grad=True, use_cpu_initialization=True
    )
    assert config.moe_dense_router_grad is True
    # The name verl's model initializers call, patched; local spec since CPU has no TE.
    block = model_initializer.get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    assert mlp_modules(block) == [DenseMixerMoELayer] * 2


def test_no_bridge_flag_off_keeps_conventional():
    """Without the flag the patched converter yields a plain, conventional config."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from verl.models.mcore import config_converter

    config = config_converter.hf_to_mcore_config_qwen3moe(tiny_qwen3_moe(), torch.float32)
    assert not hasattr(config, "moe_dense_router_grad")
    assert mlp_modules(dm_verl.spec_for(config, local_block_spec(config))) == [MoELayer] * 2


def test_no_bridge_invalid_options_raise():
    """The DenseMixer validation runs on verl-built configs too."""
    from verl.models.mcore import config_converter

    with pytest.raises(ValueError, match="moe_dense_router_grad_topm=2 must satisfy"):
        config_converter.hf_to_mcore_config_qwen3moe(
            tiny_qwen3_moe(),
            torch.float32,
            moe_dense_router_grad=True,
            moe_dense_router_grad_topm=2,
        )


def test_vanilla_mbridge_config_and_spec(monkeypatch):
    """mbridge: set_extra_args takes the flag; its own block spec comes back rewritten."""
    mbridge = pytest.importorskip("mbridge", reason="mbridge is not installed")
    from mbridge.core import llm_bridge

    assert "mbridge" in dm_verl.PATCHED_PATHS
    monkeypatch.setattr(llm_bridge, "get_gpt_decoder_block_spec", local_block_spec)
    bridge = mbridge.AutoBridge.from_config(tiny_qwen3_moe(), dtype=torch.float32)
    bridge.set_extra_args(moe_dense_router_grad=True, use_cpu_initialization=True)
    assert bridge.config.moe_dense_router_grad is True
    assert mlp_modules(bridge._get_transformer_layer_spec()) == [DenseMixerMoELayer] * 2
    # A later set_extra_args rebuilds the config; the option must survive it.
    bridge.set_extra_args(moe_router_load_balancing_type="none")
    assert bridge.config.moe_dense_router_grad is True


def test_vanilla_mbridge_get_model_builds_densemixer_layers(monkeypatch):
    """mbridge's own get_model (verl's vanilla path) builds DenseMixer layers under the flag,
    and its patched get_model refuses a model whose spec bypassed the patch."""
    mbridge = pytest.importorskip("mbridge", reason="mbridge is not installed")
    from mbridge.core import llm_bridge, util

    monkeypatch.setattr(llm_bridge, "get_gpt_decoder_block_spec", local_block_spec)
    if not hasattr(util.ModelType, "encoder_and_decoder"):
        # mbridge 0.15.1's get_model compares with ModelType.encoder_and_decoder, which
        # megatron-core 0.18 removed (upstream, DenseMixer or not): give it a distinct value.
        members = dict(encoder_or_decoder=util.ModelType.encoder_or_decoder)
        monkeypatch.setattr(
            util, "ModelType", types.SimpleNamespace(encoder_and_decoder=object(), **members)
        )
    from verl.models.mcore.config_converter import get_hf_rope_theta

    hf_config = tiny_qwen3_moe()
    # What verl's make_megatron_module does first: transformers 5 keeps rope_theta inside
    # rope_parameters, and mbridge reads hf_config.rope_theta.
    hf_config.rope_theta = get_hf_rope_theta(hf_config)
    bridge = mbridge.AutoBridge.from_config(hf_config, dtype=torch.float32)
    bridge.set_extra_args(moe_dense_router_grad=True, **CPU_ARGS)
    # mbridge moves the model to CUDA unless it is built on the meta device.
    kwargs = dict(wrap_with_ddp=False, bf16=False, init_model_with_meta_device=True)
    (model,) = bridge.get_model(**kwargs)
    assert mlp_types(model) == [DenseMixerMoELayer] * 2

    # A spec that bypasses the patch (the unpatched local spec) must not train silently.
    monkeypatch.setattr(
        type(bridge),
        "_get_transformer_layer_spec",
        lambda self, *a, **k: local_block_spec(self.config),
    )
    with pytest.raises(RuntimeError, match="would train conventionally"):
        bridge.get_model(**kwargs)


def test_megatron_bridge_path_through_verls_import():
    """verl's default path: verl.models.mcore.bridge.AutoBridge (Megatron-Bridge's, patched)
    returns a provider that takes moe_dense_router_grad in apply_overrides_and_finalize and
    builds DenseMixer layers; without the flag it stays conventional."""
    if "megatron-bridge" not in dm_verl.PATCHED_PATHS:
        pytest.skip("Megatron-Bridge is not installed in this venv")
    from megatron.bridge.models import gpt_provider
    from verl.models.mcore.bridge import AutoBridge

    cpu = dict(CPU_ARGS, moe_token_dispatcher_type="alltoall")
    with pytest.MonkeyPatch.context() as patch:
        # No Transformer Engine: Bridge's TE layer spec answers with its own local one.
        patch.setattr(gpt_provider, "transformer_engine_layer_spec", gpt_provider.local_layer_spec)
        for flag, expected in ((True, DenseMixerMoELayer), (False, MoELayer)):
            provider = AutoBridge.from_hf_config(tiny_qwen3_moe()).to_megatron_provider(
                load_weights=False
            )
            provider.apply_overrides_and_finalize(
                dtype=torch.float32, overrides=dict(cpu, moe_dense_router_grad=flag)
            )
            (model,) = provider.provide_distributed_model(
                wrap_with_ddp=False, use_cpu_initialization=True
            )
            assert mlp_types(model) == [expected] * 2


def test_unsupported_versions_are_refused(monkeypatch):
    """A verl, mbridge or Megatron-Bridge release outside the supported ones stops the
    external lib with a message naming the supported releases and the one found."""
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.0")
    with pytest.raises(ImportError, match=r"supports verl >=0.9,<0.10 .*found verl 0.10.0"):
        require_version("verl", dm_verl.SUPPORTED_VERL, "0.9.1")
    monkeypatch.undo()
    require_version("verl", dm_verl.SUPPORTED_VERL, "0.9.1")

    # A supported release that lacks a function the patches need (verl changed) also stops.
    from verl.models.mcore import config_converter

    with pytest.raises(ImportError, match="has no .*check_and_construct_configs_v2 to patch"):
        dm_verl._target(config_converter, config_converter, "check_and_construct_configs_v2")


# CPU: no Transformer Engine, apex or CUDA fusions; local attention (GPTModel records the
# backend in process-wide NVTE_* variables, so every model here uses the same one).
CPU_ARGS = dict(
    attention_backend=AttnBackend.local,
    use_cpu_initialization=True,
    moe_grouped_gemm=False,
    moe_permute_fusion=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
)


def mlp_types(model):
    return [type(layer.mlp) for layer in model.decoder.layers]
