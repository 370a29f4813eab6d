"""TransformerConfig classes that carry the DenseMixer options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_densemixer.options import (
    DenseMixerOptions,
    check_option_names,
    validate_dense_router_grad,
)


@dataclass
class DenseMixerTransformerConfig(DenseMixerOptions, TransformerConfig):
    """TransformerConfig with DenseMixer router gradients for MoE layers.

    Adds the ``moe_dense_router_grad*`` fields of ``DenseMixerOptions``; ``__post_init__``
    runs Megatron's validation first, then ``validate_dense_router_grad``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_dense_router_grad(self)


@dataclass
class DenseMixerMLATransformerConfig(DenseMixerTransformerConfig, MLATransformerConfig):
    """MLATransformerConfig with DenseMixer router gradients (DeepSeek-V3-style models).

    Megatron-LM picks MLATransformerConfig itself for ``--multi-latent-attention``; this is its
    DenseMixer counterpart, defined at module level so that configs stay picklable.
    """


# Config classes Megatron builds -> their DenseMixer counterparts.
_COUNTERPARTS: dict[type, type] = {
    TransformerConfig: DenseMixerTransformerConfig,
    MLATransformerConfig: DenseMixerMLATransformerConfig,
}


def densemixer_config(config: TransformerConfig, **options: Any) -> TransformerConfig:
    """Returns ``config`` as its DenseMixer config class, with ``options`` set and validated.

    TransformerConfig becomes DenseMixerTransformerConfig and MLATransformerConfig becomes
    DenseMixerMLATransformerConfig; a config that is already a DenseMixerTransformerConfig is
    updated with ``dataclasses.replace``. Construction re-runs ``__post_init__`` (as
    ``dataclasses.replace`` does), so the DenseMixer validation runs too.

    Args:
        config: A config built by Megatron-LM (or by hand).
        **options: ``moe_dense_router_grad*`` fields.

    Returns:
        A new config of the DenseMixer class; ``config`` is not modified.

    Raises:
        ValueError: ``config``'s class has no DenseMixer counterpart, or an option is unknown
            or invalid.
    """
    check_option_names(options, "densemixer_config")
    if isinstance(config, DenseMixerTransformerConfig):
        return dataclasses.replace(config, **options)
    config_class = _COUNTERPARTS.get(type(config))
    if config_class is None:
        raise ValueError(
            f"densemixer_config: no DenseMixer config class for {type(config).__name__}; "
            "subclass it together with DenseMixerTransformerConfig "
            "(see DenseMixerMLATransformerConfig) or use TransformerConfig."
        )
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    values.update(options)
    return config_class(**values)
