"""Every megatron-core version difference the plugin depends on, in one place.

Supported: megatron-core 0.16 to 0.19. The eras that matter here:

- 0.16: ``MoELayer`` split into ``route``/``preprocess``/.../``postprocess`` step methods,
  ``MoESubmodules.router`` and ``routing(..., padding_mask)`` appear;
- 0.17: ``GroupedMLP`` (legacy grouped GEMM) is removed; routers take ``is_mtp_layer``;
- 0.18: MoE specs become ``functools.partial(MoELayer, submodules=...)`` builders instead of
  ``ModuleSpec(module=MoELayer, ...)``;
- after 0.16: MoE layer-wise metrics move from ``moe_utils``'s module-level dict (written by
  ``save_to_aux_losses_tracker``, now deprecated) to ``moe_logging.get_moe_metrics_tracker()``,
  whose ``moe_utils.get_moe_layer_wise_logging_tracker()`` returns a copy, not the live dict;
- up to 0.17: ``TransformerLayer`` passes ``pg_collection`` to its MLP only when the spec's
  module *is* ``MoELayer`` (an identity check), and ``tp_group`` otherwise, so a subclass
  must accept ``tp_group`` and fall back to the default process groups.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional

import torch
from megatron.core import package_info
from megatron.core.transformer.moe import experts as _experts
from megatron.core.transformer.moe import moe_utils as _moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from packaging.version import Version

MIN_MCORE_VERSION = Version("0.16.0")


@functools.lru_cache(maxsize=None)
def get_mcore_version() -> Version:
    """The installed megatron-core version."""
    return Version(package_info.__version__)


if get_mcore_version() < MIN_MCORE_VERSION:
    raise ImportError(
        f"megatron_densemixer requires megatron-core >= {MIN_MCORE_VERSION} (it builds on "
        f"MoELayer.route/postprocess and MoESubmodules.router), found {get_mcore_version()}. "
        "Upgrade with `pip install 'megatron-core>=0.16'`."
    )

try:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
except ImportError:  # 0.16: the layer-wise metrics are a plain dict in moe_utils
    get_moe_metrics_tracker = None

SequentialMLP = _experts.SequentialMLP
TEGroupedMLP = _experts.TEGroupedMLP
# Removed in 0.17; None where absent so isinstance checks can skip it.
GroupedMLP: Optional[type] = getattr(_experts, "GroupedMLP", None)


def supported_score_functions() -> tuple[str, ...]:
    """Router score functions of the installed megatron-core (sqrtsoftplus arrived after 0.16)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    field = TransformerConfig.__dataclass_fields__["moe_router_score_function"]
    functions = ["softmax", "sigmoid"]
    if "sqrtsoftplus" in str(field.type):
        functions.append("sqrtsoftplus")
    return tuple(functions)


def moe_spec_parts(spec: Any) -> Optional[tuple[type, Any]]:
    """Returns ``(module, submodules)`` of an MoE spec, or None if ``spec`` is not one.

    Accepts both spec forms: ``ModuleSpec(module=MoELayer, submodules=...)`` (<= 0.17) and
    ``functools.partial(MoELayer, submodules=...)`` (>= 0.18).
    """
    if isinstance(spec, ModuleSpec):
        module, submodules = spec.module, spec.submodules
    elif isinstance(spec, functools.partial):
        module, submodules = spec.func, spec.keywords.get("submodules")
    else:
        return None
    if isinstance(module, type) and issubclass(module, MoELayer):
        return module, submodules
    return None


def replace_moe_spec(spec: Any, module: type, submodules: MoESubmodules) -> Any:
    """Returns a copy of an MoE spec (either form) with ``module`` and ``submodules``."""
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=module, submodules=submodules)
    keywords = dict(spec.keywords, submodules=submodules)
    return functools.partial(module, *spec.args, **keywords)


def replace_router(submodules: MoESubmodules, router: Callable[..., Any]) -> MoESubmodules:
    """Returns a copy of ``submodules`` whose router builder is ``router``."""
    return dataclasses.replace(submodules, router=router)


def record_moe_metric(name: str, value: torch.Tensor, layer_number: int, num_layers: int) -> None:
    """Adds ``value`` to Megatron's MoE layer-wise metric ``name`` at ``layer_number``.

    Megatron-LM's training loop reduces, logs and clears these with its own MoE aux losses.
    """
    if get_moe_metrics_tracker is not None:
        get_moe_metrics_tracker().record(
            name=name, value=value, layer_number=layer_number, num_layers=num_layers
        )
    else:
        _moe_utils.save_to_aux_losses_tracker(name, value, layer_number, num_layers)


def moe_metrics() -> Dict[str, torch.Tensor]:
    """The live per-layer values of every MoE layer-wise metric, by name."""
    if get_moe_metrics_tracker is not None:
        return {name: entry.values for name, entry in get_moe_metrics_tracker().metrics.items()}
    return {
        name: entry["values"]
        for name, entry in _moe_utils.get_moe_layer_wise_logging_tracker().items()
    }


def remove_moe_metrics(names: Any) -> None:
    """Drops the MoE layer-wise metrics ``names`` (absent ones are ignored)."""
    if get_moe_metrics_tracker is not None:
        metrics = get_moe_metrics_tracker().metrics
    else:
        metrics = _moe_utils.get_moe_layer_wise_logging_tracker()
    for name in list(names):
        metrics.pop(name, None)
