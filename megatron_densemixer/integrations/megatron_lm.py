"""DenseMixer for Megatron-LM's ``pretrain_gpt.py``: the ``--moe-dense-router-grad`` flags.

``pretrain_gpt.py`` has no hook for third-party arguments or layer specs, so the plugin comes in
through a thin launcher (``examples/pretrain_gpt_densemixer.py``) that calls
:func:`run_pretrain_gpt`. That runs Megatron-LM's own dataset provider and forward step with
three changes: the parser gets :func:`extra_args_provider`, the TransformerConfig becomes a
DenseMixer one (:func:`config_from_args`), and the layer spec (Megatron-LM's default one or the
one named by ``--spec``) goes through :func:`megatron_densemixer.densemixer_spec`.

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
import importlib.util
import inspect
import os
import runpy
import sys
import time
import typing
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

from megatron.core import package_info
from megatron.core.transformer.transformer_config import TransformerConfig
from packaging.version import Version

from megatron_densemixer.check import check_dense_router_grad_applied
from megatron_densemixer.config import densemixer_config
from megatron_densemixer.options import OPTION_NAMES, DenseMixerOptions
from megatron_densemixer.spec import DenseMixerSpecFunction, densemixer_spec

MEGATRON_LM_PATH_ENV = "MEGATRON_LM_PATH"

# Before the flags were named after the fields; still accepted.
_ALIAS_PREFIX = ("--moe-dense-router-grad", "--moe-densemixer")


def option_flag(name: str) -> str:
    """The command-line flag of a DenseMixer option: the field name, dashed."""
    return "--" + name.replace("_", "-")


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the DenseMixer flags to a Megatron-LM (or any argparse) parser.

    One flag per ``DenseMixerOptions`` field, named after it (``--moe-dense-router-grad``,
    ``--moe-dense-router-grad-variant``, ...), with its type, default and help; the dests are
    the field names, so Megatron-LM's ``core_transformer_config_from_args(args, config_class)``
    would copy them as they are. The ``--moe-densemixer*`` spellings are aliases. Pass it as
    ``extra_args_provider`` to Megatron-LM's ``pretrain``/``parse_args``.

    Args:
        parser: The parser to extend.

    Returns:
        The same parser, as Megatron-LM's extra_args_provider contract expects.
    """
    hints = typing.get_type_hints(DenseMixerOptions)
    group = parser.add_argument_group(title="DenseMixer (megatron-densemixer)")
    for field in dataclasses.fields(DenseMixerOptions):
        flag = option_flag(field.name)
        flags = [flag, flag.replace(*_ALIAS_PREFIX)]
        kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata["help"]}
        metavar = field.name.rsplit("_", 1)[-1].upper()
        hint = hints[field.name]
        if hint is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(hint) is typing.Literal:
            kwargs.update(choices=typing.get_args(hint), default=field.default)
        else:
            # Optional[int] -> int; float stays float.
            kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
            kwargs.update(type=kinds[0], default=field.default, metavar=metavar)
        group.add_argument(*flags, **kwargs)
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
    return {name: getattr(args, name) for name in OPTION_NAMES if hasattr(args, name)}


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


def check_megatron_lm_checkout(root: str) -> None:
    """Raises if the checkout at ``root`` carries a megatron-core other than the imported one.

    ``megatron.training`` comes from the checkout, ``megatron.core`` from wherever Python found
    it first: pip's wheel when the checkout is appended (``MEGATRON_LM_PATH``), the checkout's
    own copy when it is prepended (``PYTHONPATH``). Megatron-LM's training code is written
    against its own megatron-core, so a mismatch fails later in obscure ways.

    Raises:
        ImportError: naming both versions and where each comes from.
    """
    info = os.path.join(root, "megatron", "core", "package_info.py")
    if not os.path.isfile(info):
        return
    checkout_version = runpy.run_path(info)["__version__"]
    # The release, not the local "+<git hash>" label: a checkout of the tag a wheel was built
    # from carries another hash than the wheel.
    checkout_release = Version(checkout_version).public
    if checkout_release != Version(package_info.__version__).public:
        raise ImportError(
            f"Megatron-LM checkout {root} carries megatron-core {checkout_version}, but the "
            f"imported megatron.core is {package_info.__version__} "
            f"({os.path.dirname(package_info.__file__)}). Install the matching wheel "
            f"(pip install megatron-core=={checkout_release}), or put the checkout first with "
            f"PYTHONPATH={root} instead of {MEGATRON_LM_PATH_ENV}."
        )


def _escape_stray_percent(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Escapes ``%`` in help strings that argparse cannot format, so that --help prints.

    Megatron-LM core_v0.18.2's ``--moe-paged-stash-buffer-size-factor-cuda`` help says
    "10%)", which makes its own ``pretrain_gpt.py --help`` raise ValueError.
    """
    for action in parser._actions:
        if not isinstance(action.help, str):
            continue
        try:
            action.help % dict(vars(action), prog=parser.prog)
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")
    return parser


def _megatron_lm_default_layer_spec() -> Callable[..., Any]:
    """Megatron-LM >= 0.19's ``default_layer_spec(config, vp_stage)``."""
    return _import_megatron_lm("megatron.training.models.gpt").default_layer_spec


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
        kwargs["transformer_layer_spec"] = densemixer_spec(kwargs["transformer_layer_spec"])
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
        model = gpt_builders.gpt_builder(
            args, pre_process, post_process, vp_stage, config=config, **kwargs
        )
    check_dense_router_grad_applied(model)
    return model


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
        DenseMixerSpecFunction(_megatron_lm_default_layer_spec())
        if spec is None
        else densemixer_spec(spec)
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
    if _asks_for_help() and importlib.util.find_spec("pretrain_gpt") is None:
        # Megatron-LM's own --help needs the checkout; show what this launcher adds.
        extra_args_provider(argparse.ArgumentParser(prog=sys.argv[0])).print_help()
        print(
            f"Megatron-LM not found: set {MEGATRON_LM_PATH_ENV}=/path/to/Megatron-LM for the "
            "pretrain_gpt.py flags."
        )
        return
    pretrain_gpt = _import_megatron_lm("pretrain_gpt")
    check_megatron_lm_checkout(os.path.dirname(os.path.abspath(pretrain_gpt.__file__)))
    _pretrain_gpt_preamble(pretrain_gpt)
    _pretrain(pretrain_gpt)


def _asks_for_help() -> bool:
    return bool({"-h", "--help"} & set(sys.argv[1:]))


def _pretrain_gpt_preamble(pretrain_gpt: ModuleType) -> None:
    """pretrain_gpt.py's own ``__main__`` preamble."""
    if hasattr(pretrain_gpt, "set_startup_timestamps") and hasattr(
        pretrain_gpt, "_PROGRAM_START_TIME"
    ):
        pretrain_gpt.set_startup_timestamps(
            program_start=pretrain_gpt._PROGRAM_START_TIME, main_entry=time.time()
        )
    # Megatron-LM's dataset builder reads this to build the datasets on every rank.
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True


def _pretrain(pretrain_gpt: ModuleType) -> None:
    """Calls Megatron-LM's ``pretrain`` as pretrain_gpt.py does for the installed signature."""
    from megatron.core.enums import ModelType

    training = _import_megatron_lm("megatron.training.training")
    inprocess_restart = _import_megatron_lm("megatron.training.inprocess_restart")
    has_modelopt = getattr(pretrain_gpt, "has_nvidia_modelopt", False)
    extra_args = chain_extra_args_providers(
        getattr(pretrain_gpt, "add_modelopt_args", None) if has_modelopt else None,
        extra_args_provider,
    )
    arguments = _import_megatron_lm("megatron.training.arguments")
    if _asks_for_help():
        # The in-process-restart wrapper below parses the command line without our provider,
        # so its --help would list Megatron-LM's flags only. argparse prints and exits here.
        arguments.parse_args(
            extra_args_provider=chain_extra_args_providers(extra_args, _escape_stray_percent)
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
    "add_megatron_lm_to_path",
    "chain_extra_args_providers",
    "check_megatron_lm_checkout",
    "config_from_args",
    "densemixer_gpt_builder",
    "densemixer_gpt_model_config",
    "densemixer_options_from_args",
    "extra_args_provider",
    "option_flag",
    "run_pretrain_gpt",
]
