"""DenseMixer for NeMo-RL's Megatron policy: ``policy.megatron_cfg.model_overrides``.

NeMo-RL builds its model from a Megatron-Bridge provider (see
:mod:`megatron_densemixer.integrations.megatron_bridge`) and merges
``policy.megatron_cfg.model_overrides`` into it, accepting only the provider's dataclass fields.
:func:`patch_nemo_rl_model_overrides`, called in the process that builds the model, lets the
``moe_dense_router_grad*`` keys through.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from megatron_densemixer.integrations import is_patched, mark_patched
from megatron_densemixer.integrations.megatron_bridge import (
    allow_densemixer_targets,
    densemixer_provider,
)
from megatron_densemixer.options import split_options


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
            "nemo_rl.models.megatron.setup._merge_model_overrides is missing: supported is "
            "NeMo-RL main with policy.megatron_cfg.model_overrides (v0.7.0 and earlier have no "
            "such key). On those, call megatron_densemixer.integrations.megatron_bridge."
            "densemixer_provider on the provider in your own setup code instead."
        )
    # The provider's spec is saved with NeMo-RL's checkpoints; loading one needs the allowlist.
    allow_densemixer_targets(required=False)
    if is_patched(merge):
        return

    @functools.wraps(merge)
    def merge_with_densemixer(target: Any, overrides: dict, *args: Any, **kwargs: Any) -> Any:
        options, rest = split_options(overrides)
        merged = merge(target, rest, *args, **kwargs)
        if options and "path" not in kwargs and not args:
            merged = densemixer_provider(merged, **options)
        return merged

    mark_patched(setup, "_merge_model_overrides", merge_with_densemixer)


__all__ = ["patch_nemo_rl_model_overrides"]
