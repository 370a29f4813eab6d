"""DenseMixer for Megatron-LM's ``pretrain_gpt.py``: the ``--moe-densemixer`` flags.

``pretrain_gpt.py`` has no hook for third-party arguments or layer specs, so the plugin comes in
through a thin launcher (``examples/pretrain_gpt_densemixer.py``) that calls
:func:`run_pretrain_gpt`. That runs Megatron-LM's own dataset provider and forward step with
three changes: the parser gets :func:`extra_args_provider`, the TransformerConfig becomes a
DenseMixer one (:func:`config_from_args`), and the layer spec (Megatron-LM's default one or the
one named by ``--spec``) goes through :func:`densemixer_layer_spec`.

The parsing, config and spec pieces need only megatron-core; :func:`run_pretrain_gpt` and
:func:`densemixer_gpt_builder` need a Megatron-LM checkout on ``sys.path`` (or
``MEGATRON_LM_PATH``), because ``megatron.training`` is not in the megatron-core wheel.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import sys
import time
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_densemixer.config import DENSE_ROUTER_GRAD_VARIANTS, DenseMixerTransformerConfig
from megatron_densemixer.spec import densemixer_spec

MEGATRON_LM_PATH_ENV = "MEGATRON_LM_PATH"

# argparse dest -> flag. The dests are the config field names, so Megatron-LM's
# ``core_transformer_config_from_args(args, config_class)`` would copy them as they are.
DENSEMIXER_ARGS = {
    "moe_dense_router_grad": "--moe-densemixer",
    "moe_dense_router_grad_variant": "--moe-densemixer-variant",
    "moe_dense_router_grad_chunk_size": "--moe-densemixer-chunk-size",
    "moe_dense_router_grad_chunk_budget_mb": "--moe-densemixer-chunk-budget-mb",
    "moe_dense_router_grad_topm": "--moe-densemixer-topm",
    "moe_dense_router_grad_token_fraction": "--moe-densemixer-token-fraction",
}


@dataclasses.dataclass
class DenseMixerMLATransformerConfig(DenseMixerTransformerConfig, MLATransformerConfig):
    """MLATransformerConfig with DenseMixer router gradients (DeepSeek-V3-style models).

    Megatron-LM picks MLATransformerConfig itself for ``--multi-latent-attention``; this is its
    DenseMixer counterpart, defined at module level so that configs stay picklable.
    """


# Config classes Megatron-LM builds -> their DenseMixer counterparts.
_COUNTERPARTS: dict[type, type] = {
    TransformerConfig: DenseMixerTransformerConfig,
    MLATransformerConfig: DenseMixerMLATransformerConfig,
}


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the DenseMixer flags to a Megatron-LM (or any argparse) parser.

    Pass it as ``extra_args_provider`` to Megatron-LM's ``pretrain``/``parse_args``; defaults
    come from DenseMixerTransformerConfig, so an absent flag means the config default.

    Args:
        parser: The parser to extend.

    Returns:
        The same parser, as Megatron-LM's extra_args_provider contract expects.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(DenseMixerTransformerConfig)}
    group = parser.add_argument_group(title="DenseMixer (megatron-densemixer)")
    group.add_argument(
        DENSEMIXER_ARGS["moe_dense_router_grad"],
        dest="moe_dense_router_grad",
        action="store_true",
        help="Give the MoE router a straight-through gradient from every expert's output "
        "(DenseMixer). Forward values and expert gradients stay conventional.",
    )
    group.add_argument(
        DENSEMIXER_ARGS["moe_dense_router_grad_variant"],
        dest="moe_dense_router_grad_variant",
        choices=DENSE_ROUTER_GRAD_VARIANTS,
        default=defaults["moe_dense_router_grad_variant"],
        help="Dense weights of the non-selected experts: 'partscale' (the DenseMixer "
        "reference) or 'gated' (also subtracts the selected experts' baseline).",
    )
    group.add_argument(
        DENSEMIXER_ARGS["moe_dense_router_grad_chunk_size"],
        dest="moe_dense_router_grad_chunk_size",
        type=int,
        default=defaults["moe_dense_router_grad_chunk_size"],
        help="Tokens per chunk of the backward's dense reduction; derived from "
        "--moe-densemixer-chunk-budget-mb when unset.",
    )
    group.add_argument(
        DENSEMIXER_ARGS["moe_dense_router_grad_chunk_budget_mb"],
        dest="moe_dense_router_grad_chunk_budget_mb",
        type=float,
        default=defaults["moe_dense_router_grad_chunk_budget_mb"],
        help="Activation memory budget (MiB) of one chunk of the dense reduction.",
    )
    group.add_argument(
        DENSEMIXER_ARGS["moe_dense_router_grad_topm"],
        dest="moe_dense_router_grad_topm",
        type=int,
        default=defaults["moe_dense_router_grad_topm"],
        help="Approximation: dense gradient for the top-M experts by score only "
        "(moe_router_topk < M <= num_experts). Unset: exact.",
    )
    group.add_argument(
        DENSEMIXER_ARGS["moe_dense_router_grad_token_fraction"],
        dest="moe_dense_router_grad_token_fraction",
        type=float,
        default=defaults["moe_dense_router_grad_token_fraction"],
        help="Approximation: dense gradient on this random fraction of tokens, rescaled "
        "(unbiased). 1.0: exact.",
    )
    return parser


def chain_extra_args_providers(
    *providers: Optional[Callable[[argparse.ArgumentParser], argparse.ArgumentParser]],
) -> Callable[[argparse.ArgumentParser], argparse.ArgumentParser]:
    """One extra_args_provider that applies ``providers`` in order, skipping None.

    Megatron-LM takes a single provider; pretrain_gpt.py already passes ModelOpt's when
    ModelOpt is installed, and the launcher must keep it.
    """

    def chained(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for provider in providers:
            if provider is not None:
                parser = provider(parser)
        return parser

    return chained


def densemixer_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``moe_dense_router_grad*`` values of parsed arguments (absent ones left out)."""
    return {name: getattr(args, name) for name in DENSEMIXER_ARGS if hasattr(args, name)}


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
        ValueError: ``config``'s class has no DenseMixer counterpart, or an option is invalid.
    """
    unknown = sorted(set(options) - set(DENSEMIXER_ARGS))
    if unknown:
        raise ValueError(
            f"densemixer_config: unknown option(s) {unknown}; expected some of "
            f"{sorted(DENSEMIXER_ARGS)}."
        )
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


def densemixer_layer_spec(spec: Any) -> Any:
    """Rewrites a GPT layer or block spec, in any form Megatron-LM hands to GPTModel.

    Besides what :func:`megatron_densemixer.densemixer_spec` takes (a TransformerLayer
    ModuleSpec, TransformerBlockSubmodules or an MoE spec), this accepts a
    ``ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules)`` (a valid
    ``--spec`` target) and a spec *function* taking the model config, as Megatron-LM >= 0.19
    allows for ``GPTModelConfig.transformer_layer_spec``.
    """
    if isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        return dataclasses.replace(spec, submodules=densemixer_spec(spec.submodules))
    if callable(spec) and not isinstance(spec, (ModuleSpec, functools.partial, type)):
        return DenseMixerSpecFunction(spec)
    return densemixer_spec(spec)


class DenseMixerSpecFunction:
    """A ``transformer_layer_spec`` callable for Megatron-LM >= 0.19's GPTModelConfig.

    ``GPTModelBuilder`` calls it with the model config (and ``vp_stage``) at build time; it
    calls ``base`` (the ``--spec`` function, or Megatron-LM's ``default_layer_spec`` when
    ``base`` is None) and rewrites the result. A callable rather than a spec, because the
    default spec depends on ``vp_stage``, which is only known per model chunk.
    """

    def __init__(self, base: Optional[Callable[..., Any]] = None) -> None:
        self.base = base

    def __call__(self, config: Any, vp_stage: Optional[int] = None) -> Any:
        base = self.base
        if base is None:
            base = _import_megatron_lm("megatron.training.models.gpt").default_layer_spec
        if "vp_stage" in inspect.signature(base).parameters:
            spec = base(config, vp_stage=vp_stage)
        else:
            spec = base(config)
        return densemixer_layer_spec(spec)


def config_from_args(
    args: argparse.Namespace, config: Optional[TransformerConfig] = None
) -> TransformerConfig:
    """The DenseMixer TransformerConfig for parsed Megatron-LM arguments.

    Args:
        args: Parsed arguments carrying the DenseMixer flags (see :func:`extra_args_provider`).
        config: A config Megatron-LM already built; None builds it the way ``gpt_builder``
            does (``--yaml-cfg`` or ``core_transformer_config_from_args``), which needs
            Megatron-LM's ``megatron.training``.

    Returns:
        A DenseMixerTransformerConfig (or DenseMixerMLATransformerConfig).
    """
    if config is None:
        if getattr(args, "yaml_cfg", None) is not None:
            yaml_arguments = _import_megatron_lm("megatron.training.yaml_arguments")
            config = yaml_arguments.core_transformer_config_from_yaml(args, "language_model")
        else:
            arguments = _import_megatron_lm("megatron.training.arguments")
            config = arguments.core_transformer_config_from_args(args)
    return densemixer_config(config, **densemixer_options_from_args(args))


# --------------------------------------------------------------------------------------
# Megatron-LM's pretrain_gpt.py, with the config class and layer spec swapped
# --------------------------------------------------------------------------------------
def add_megatron_lm_to_path(path: Optional[str] = None) -> None:
    """Makes Megatron-LM's ``megatron.training`` and ``pretrain_gpt`` importable.

    Appends ``path`` (default: ``$MEGATRON_LM_PATH``) to ``sys.path``. Appending, not
    prepending, keeps the installed megatron-core in front of the checkout's copy;
    ``megatron`` is a namespace package, so ``megatron.training`` still comes from the
    checkout.
    """
    path = path or os.environ.get(MEGATRON_LM_PATH_ENV)
    if path and path not in sys.path:
        if not os.path.isfile(os.path.join(path, "pretrain_gpt.py")):
            raise FileNotFoundError(
                f"{MEGATRON_LM_PATH_ENV}={path} has no pretrain_gpt.py; point it at the root "
                "of a Megatron-LM checkout."
            )
        sys.path.append(path)


def _import_megatron_lm(name: str) -> ModuleType:
    """Imports a Megatron-LM module, with an error that says how to provide it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"{name} is part of Megatron-LM, not of the megatron-core wheel; put a Megatron-LM "
            f"checkout on PYTHONPATH or set {MEGATRON_LM_PATH_ENV}=/path/to/Megatron-LM "
            f"({error})."
        ) from error


@contextlib.contextmanager
def _rewriting_gpt_model(gpt_builders: ModuleType) -> Iterator[None]:
    """Within the block, ``gpt_builders.GPTModel(...)`` gets a DenseMixer layer spec.

    ``gpt_builder`` (Megatron-LM 0.15 to 0.18) picks the layer spec itself, from ``--spec`` or
    its defaults, and hands it straight to GPTModel; wrapping that one call rewrites whatever
    spec it picked without copying its selection logic. The MTP block spec is left as it is.
    """
    gpt_model = gpt_builders.GPTModel

    def build(*args: Any, **kwargs: Any) -> Any:
        kwargs["transformer_layer_spec"] = densemixer_layer_spec(kwargs["transformer_layer_spec"])
        return gpt_model(*args, **kwargs)

    gpt_builders.GPTModel = build
    try:
        yield
    finally:
        gpt_builders.GPTModel = gpt_model


def densemixer_gpt_builder(
    args: argparse.Namespace,
    pre_process: bool,
    post_process: bool,
    vp_stage: Optional[int] = None,
    config: Optional[TransformerConfig] = None,
    pg_collection: Any = None,
) -> Any:
    """Megatron-LM's ``gpt_builder`` with a DenseMixer config and layer spec.

    Same signature as ``gpt_builders.gpt_builder``, so it slots into
    ``partial(model_provider, densemixer_gpt_builder)``.
    """
    if getattr(args, "use_legacy_models", False):
        raise ValueError("--moe-densemixer needs Megatron Core models; drop --use-legacy-models.")
    gpt_builders = _import_megatron_lm("gpt_builders")
    config = config_from_args(args, config)
    kwargs: dict[str, Any] = {}
    # Megatron-LM 0.15's gpt_builder has no pg_collection parameter.
    if "pg_collection" in inspect.signature(gpt_builders.gpt_builder).parameters:
        kwargs["pg_collection"] = pg_collection
    with _rewriting_gpt_model(gpt_builders):
        return gpt_builders.gpt_builder(
            args, pre_process, post_process, vp_stage, config=config, **kwargs
        )


def densemixer_gpt_model_config(args: argparse.Namespace, model_config_cls: Any = None) -> Any:
    """Megatron-LM >= 0.19: the GPTModelConfig for ``args``, with DenseMixer config and spec."""
    argument_utils = _import_megatron_lm("megatron.training.argument_utils")
    kwargs = {} if model_config_cls is None else {"model_config_cls": model_config_cls}
    model_config = argument_utils.gpt_config_from_args(
        args, config=config_from_args(args), **kwargs
    )
    # None means "default_layer_spec at build time"; a --spec target may be a spec or a function.
    spec = model_config.transformer_layer_spec
    model_config.transformer_layer_spec = (
        DenseMixerSpecFunction(None) if spec is None else densemixer_layer_spec(spec)
    )
    return model_config


def run_pretrain_gpt(megatron_lm_path: Optional[str] = None) -> None:
    """Runs Megatron-LM's pretrain_gpt.py entry point with the DenseMixer flags.

    Mirrors pretrain_gpt.py's ``__main__`` block for each ``pretrain()`` signature:
    Megatron-LM 0.15-0.17 (``pretrain(dataset_provider, model_provider, ...,
    extra_args_provider=...)``), 0.18 (``pretrain(cfg_container, dataset_provider,
    model_provider, ...)``) and 0.19/main (``pretrain(cfg_container, dataset_provider,
    model_type, forward_step)``, model built from a GPTModelConfig).
    """
    add_megatron_lm_to_path(megatron_lm_path)
    pretrain_gpt = _import_megatron_lm("pretrain_gpt")
    from megatron.core.enums import ModelType

    training = _import_megatron_lm("megatron.training.training")
    inprocess_restart = _import_megatron_lm("megatron.training.inprocess_restart")

    # pretrain_gpt.py's own __main__ preamble.
    if hasattr(pretrain_gpt, "set_startup_timestamps") and hasattr(
        pretrain_gpt, "_PROGRAM_START_TIME"
    ):
        pretrain_gpt.set_startup_timestamps(
            program_start=pretrain_gpt._PROGRAM_START_TIME, main_entry=time.time()
        )
    # Megatron-LM's dataset builder reads this to build the datasets on every rank.
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True

    has_modelopt = getattr(pretrain_gpt, "has_nvidia_modelopt", False)
    extra_args = chain_extra_args_providers(
        getattr(pretrain_gpt, "add_modelopt_args", None) if has_modelopt else None,
        extra_args_provider,
    )
    args_defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(training.pretrain)
    common = dict(
        train_valid_test_dataset_provider=pretrain_gpt.train_valid_test_datasets_provider,
        model_type=ModelType.encoder_or_decoder,
        forward_step_func=pretrain_gpt.forward_step,
        store=store,
    )
    if hasattr(pretrain_gpt, "get_embedding_ranks"):
        common["get_embedding_ranks"] = pretrain_gpt.get_embedding_ranks
    model_provider = functools.partial(pretrain_gpt.model_provider, densemixer_gpt_builder)

    if "cfg_container" not in inspect.signature(training.pretrain).parameters:
        # Megatron-LM 0.15-0.17: pretrain parses the arguments itself.
        pretrain(
            model_provider=model_provider,
            extra_args_provider=extra_args,
            args_defaults=args_defaults,
            **common,
        )
        return

    arguments = _import_megatron_lm("megatron.training.arguments")
    argument_utils = _import_megatron_lm("megatron.training.argument_utils")
    args = arguments.parse_and_validate_args(
        extra_args_provider=extra_args, args_defaults=args_defaults
    )
    if not hasattr(argument_utils, "gpt_config_from_args"):
        # Megatron-LM 0.18: config container plus a model provider.
        cfg_container = argument_utils.pretrain_cfg_container_from_args(args)
        pretrain(cfg_container, model_provider=model_provider, **common)
        return

    # Megatron-LM 0.19 and main: the model is built from a GPTModelConfig.
    model_config_cls = None
    if has_modelopt:
        pretrain_gpt.maybe_enable_modelopt(args)
        if getattr(args, "modelopt_enabled", False):
            model_config_cls = pretrain_gpt.ModelOptModelConfig
    model_config = densemixer_gpt_model_config(args, model_config_cls)
    cfg_container = argument_utils.pretrain_cfg_container_from_args(args, model_config)
    pretrain(cfg_container, **common)


__all__ = [
    "DENSEMIXER_ARGS",
    "DenseMixerMLATransformerConfig",
    "DenseMixerSpecFunction",
    "add_megatron_lm_to_path",
    "chain_extra_args_providers",
    "config_from_args",
    "densemixer_config",
    "densemixer_gpt_builder",
    "densemixer_gpt_model_config",
    "densemixer_layer_spec",
    "densemixer_options_from_args",
    "extra_args_provider",
    "run_pretrain_gpt",
]
