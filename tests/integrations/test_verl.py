"""verl's external_lib: moe_dense_router_grad through override_transformer_config.

Drives the real verl and mbridge packages (verl's vanilla-mbridge and no-bridge paths); skipped
where they are not installed. The Megatron-Bridge path is covered by test_megatron_bridge.py's
provider tests, since it goes through the same densemixer_provider.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "verl.models.mcore.config_converter",
    reason="verl (with its Megatron model code) is not installed in this venv",
)
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from megatron.core.models.gpt import gpt_layer_specs  # noqa: E402

from megatron_densemixer import DenseMixerMoELayer  # noqa: E402
from megatron_densemixer.integrations import verl as dm_verl  # noqa: E402
from tests.support.builders import mlp_modules  # noqa: E402
from tests.support.megatron_cpu import build_moe_layer  # noqa: E402

pytestmark = pytest.mark.usefixtures("model_parallel")


def tiny_qwen3_moe():
    return transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        architectures=["Qwen3MoeForCausalLM"],
    )


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

    with pytest.raises(ValueError, match="moe_dense_router_grad_topm=1 must satisfy"):
        config_converter.hf_to_mcore_config_qwen3moe(
            tiny_qwen3_moe(),
            torch.float32,
            moe_dense_router_grad=True,
            moe_dense_router_grad_topm=1,
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


def test_check_built_refuses_silent_no_op():
    """A bridge whose spec bypasses the patch must fail, not train conventionally."""
    config = dm_verl.apply_options(_moe_config(), {"moe_dense_router_grad": True})
    conventional = build_moe_layer(config)
    with pytest.raises(RuntimeError, match="without DenseMixerMoELayer"):
        dm_verl._check_built(config, [torch.nn.ModuleList([conventional])], "test bridge")


def _moe_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        ffn_hidden_size=24,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_token_dispatcher_type="allgather",
        use_cpu_initialization=True,
    )
