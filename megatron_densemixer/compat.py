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
- after 0.16: the MTP layer's inner layer spec moves from ``transformer_layer`` to
  ``mtp_model_layer`` (``mtp_inner_layer_field``);
- up to 0.17: ``TransformerLayer`` passes ``pg_collection`` to its MLP only when the spec's
  module *is* ``MoELayer`` (an identity check); for a subclass it passes nothing (0.16, with an
  "Unknown MLP type" warning) or ``tp_group``. ``mlp_process_groups`` recovers the layer's
  ``pg_collection`` instead of falling back to the default process groups.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from typing import Any, Callable, Optional

import torch
from megatron.core import package_info
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe import experts as _experts
from megatron.core.transformer.moe import moe_utils as _moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayerSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
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


def mtp_inner_layer_field(submodules: Any) -> Optional[str]:
    """The field of an MTP layer's submodules that holds its inner layer spec, or None.

    ``MultiTokenPredictionLayerSubmodules.transformer_layer`` up to 0.16 became
    ``mtp_model_layer`` later (0.19 has it; the inner layer may then be a Mamba layer). None
    when ``submodules`` are not an MTP layer's.
    """
    if not isinstance(submodules, MultiTokenPredictionLayerSubmodules):
        return None
    names = {f.name for f in dataclasses.fields(submodules)}
    return next(name for name in ("mtp_model_layer", "transformer_layer") if name in names)


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


# TransformerLayer.__init__ up to 0.17 builds its MLP from the spec with pg_collection only when
# the spec's module is MoELayer itself; the layer's resolved pg_collection is then a local of
# that frame, which is the one place it can be read from without copying TransformerLayer.
_TRANSFORMER_LAYER_INIT = TransformerLayer.__init__.__code__


def _building_transformer_layer_locals() -> Optional[dict]:
    """The locals of the TransformerLayer.__init__ call building the current module, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _TRANSFORMER_LAYER_INIT:
            return frame.f_locals
        frame = frame.f_back
    return None


def mlp_process_groups(pg_collection: Optional[ProcessGroupCollection]) -> ProcessGroupCollection:
    """The process groups an MoELayer subclass must use.

    ``pg_collection`` when given; otherwise that of the TransformerLayer building this MLP
    (which up to 0.17 withholds it from MoELayer subclasses); otherwise Megatron's defaults, as
    MoELayer does when built on its own.
    """
    if pg_collection is not None:
        return pg_collection
    layer_locals = _building_transformer_layer_locals()
    if layer_locals is not None and layer_locals.get("pg_collection") is not None:
        return layer_locals["pg_collection"]
    return get_default_pg_collection()


class _SubclassMLPWarningFilter(logging.Filter):
    """Drops TransformerLayer's "Unknown MLP type" warning when the MLP is an MoELayer subclass.

    The warning says "Using default kwargs"; for such a layer ``mlp_process_groups`` recovers
    the layer's process groups, so the warning would be wrong.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Unknown MLP type"):
            return True
        layer_locals = _building_transformer_layer_locals()
        mlp = getattr(layer_locals.get("submodules"), "mlp", None) if layer_locals else None
        module = getattr(mlp, "module", None)
        return not (isinstance(module, type) and issubclass(module, MoELayer))


_MLP_WARNING_FILTER = _SubclassMLPWarningFilter()


def quiet_subclass_mlp_warning() -> None:
    """Installs ``_SubclassMLPWarningFilter`` on TransformerLayer's logger (idempotent)."""
    logger = logging.getLogger(TransformerLayer.__module__)
    if _MLP_WARNING_FILTER not in logger.filters:
        logger.addFilter(_MLP_WARNING_FILTER)
