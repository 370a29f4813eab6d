"""The DenseMixer config classes: re-validation on replace, and densemixer_config."""

from __future__ import annotations

import dataclasses

import pytest
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_cpu.models import make_config
from megatron_densemixer.config import DenseMixerTransformerConfig, densemixer_config
from tests.support.builders import MOE_FIELDS


def test_replace_revalidates():
    """dataclasses.replace re-runs validation, so a valid config cannot be made invalid."""
    good = make_config()
    with pytest.raises(ValueError, match="token_fraction"):
        dataclasses.replace(good, moe_dense_router_grad_token_fraction=2.0)


def test_unknown_option_raises():
    """densemixer_config refuses a name that is not a DenseMixer option."""
    with pytest.raises(ValueError, match="unknown DenseMixer option\\(s\\) \\['moe_densemixer'\\]"):
        densemixer_config(TransformerConfig(**MOE_FIELDS), moe_densemixer=True)


def test_mla_config_keeps_its_class():
    """--multi-latent-attention makes Megatron-LM build MLATransformerConfig; keep MLA."""
    base = MLATransformerConfig(**MOE_FIELDS)
    config = densemixer_config(base, moe_dense_router_grad=True)
    assert isinstance(config, MLATransformerConfig)
    assert isinstance(config, DenseMixerTransformerConfig) and config.moe_dense_router_grad


def test_unknown_config_class_raises():
    """A config class without a DenseMixer counterpart is refused, not silently downcast."""

    class OtherConfig(TransformerConfig):
        pass

    with pytest.raises(ValueError, match="no DenseMixer config class for OtherConfig"):
        densemixer_config(OtherConfig(**MOE_FIELDS), moe_dense_router_grad=True)
