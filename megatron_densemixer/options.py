"""The ``moe_dense_router_grad*`` options: fields, defaults, reading and validation.

This is the options' only home. ``DenseMixerOptions`` declares them (name, type, default,
help); config classes mix it in, and every other module reads them from any config with
``dense_router_grad_options(config)``, the one place where a default is applied to a config
that lacks a field (a plain TransformerConfig, a Megatron-Bridge provider, verl's config).
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

DENSE_ROUTER_GRAD_VARIANTS = ("partscale", "gated")
DENSE_ROUTER_GRAD_ESTIMATORS = ("exact", "ema")
SUPPORTED_DISPATCHERS = ("allgather", "alltoall", "flex")


@dataclass
class DenseMixerOptions:
    """DenseMixer's options, as a dataclass mixin for TransformerConfig subclasses.

    Each field's ``metadata["help"]`` is its documentation; Megatron-LM's argparse flags
    (``--moe-dense-router-grad*``) are built from these fields.
    """

    moe_dense_router_grad: bool = field(
        default=False,
        metadata={
            "help": "Give the MoE router a straight-through gradient from every expert's "
            "output (DenseMixer). The forward value, the experts' gradients and inference "
            "stay exactly conventional."
        },
    )
    moe_dense_router_grad_variant: Literal["partscale", "gated"] = field(
        default="partscale",
        metadata={
            "help": "Dense weights of the non-selected experts: 'partscale' (the DenseMixer "
            "reference, w_e = c s_e / stopgrad(S)) or 'gated' (also subtracts the selected "
            "experts' baseline; needs renormalised top-k weights)."
        },
    )
    moe_dense_router_grad_chunk_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the backward's dense reduction; None derives it "
            "from moe_dense_router_grad_chunk_budget_mb."
        },
    )
    moe_dense_router_grad_chunk_budget_mb: float = field(
        default=256.0,
        metadata={
            "help": "Memory budget (MiB) for the activations of one chunk of the dense "
            "reduction; used when moe_dense_router_grad_chunk_size is None."
        },
    )
    moe_dense_router_grad_topm: Optional[int] = field(
        default=None,
        metadata={
            "help": "Approximation, off when None: the dense gradient only for the top-M "
            "experts by router score (moe_router_topk < M <= num_moe_experts)."
        },
    )
    moe_dense_router_grad_token_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Approximation, off at 1.0: the dense gradient on this random fraction f "
            "of the tokens, scaled by 1/f (an unbiased estimate)."
        },
    )
    moe_dense_router_grad_estimator: Literal["exact", "ema"] = field(
        default="exact",
        metadata={
            "help": "How the non-selected experts' outputs E_e(x) are obtained: 'exact' "
            "recomputes every expert on every token in the backward; 'ema' replaces E_e(x) "
            "by A_e, a running mean of expert e's output over the tokens that selected it "
            "(one [tokens, H] x [H, E] GEMM, no token exchange under EP)."
        },
    )
    moe_dense_router_grad_ema_decay: float = field(
        default=0.99,
        metadata={
            "help": "Decay beta of the 'ema' estimator, per training forward: "
            "A_e <- beta A_e + (1 - beta) mean of E_e(x) over this forward's tokens of e "
            "(0 <= beta < 1; an expert's first batch sets A_e directly)."
        },
    )


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DenseMixerOptions))


def dense_router_grad_options(config: Any) -> DenseMixerOptions:
    """The DenseMixer options of any config object, with defaults for absent fields.

    Args:
        config: A DenseMixerTransformerConfig, or any config (TransformerConfig, a
            Megatron-Bridge provider) that may carry some ``moe_dense_router_grad*`` attributes.

    Returns:
        A DenseMixerOptions holding the values (not validated; see
        ``validate_dense_router_grad``).
    """
    return DenseMixerOptions(
        **{
            f.name: getattr(config, f.name, f.default)
            for f in dataclasses.fields(DenseMixerOptions)
        }
    )


def dense_router_grad_enabled(config: Any) -> bool:
    """Whether ``config`` asks for DenseMixer router gradients."""
    return getattr(config, "moe_dense_router_grad", False) is True


# CudaGraphScope names whose capture holds the router: the whole layer (an empty scope, which
# Megatron makes of "full"), the whole iteration, the MoE layer, or the router itself.
_ROUTER_SCOPES = ("full_iteration", "moe", "moe_router")


def replays_router(config: Any) -> bool:
    """Whether a training forward under ``config``'s CUDA graphs replays the router.

    A replayed router runs no Python: ``MoELayer.route`` hands back the captured probs and
    routing map, and no dense weights are made.
    """
    if getattr(config, "cuda_graph_impl", "none") in (None, "none"):
        return False
    names = cuda_graph_scope_names(config)
    return not names or any(name in _ROUTER_SCOPES for name in names)


def cuda_graph_scope_names(config: Any) -> list[str]:
    """The names of ``config.cuda_graph_scope``; empty for the whole layer.

    Reads every form Megatron's ``__post_init__`` normalises (a comma string, one scope, a list
    of strings or scopes), for a scope assigned after the config was built; ``"full"`` is the
    whole layer.
    """
    scope = getattr(config, "cuda_graph_scope", None) or []
    if isinstance(scope, str):
        scope = scope.split(",")
    elif not isinstance(scope, (list, tuple)):
        scope = [scope]
    return [getattr(s, "name", s) for s in scope if s and s != "full"]


def approximates(options: DenseMixerOptions) -> bool:
    """Whether an opt-in approximation (top-M or a token fraction below 1) is on."""
    return (
        options.moe_dense_router_grad_topm is not None
        or options.moe_dense_router_grad_token_fraction < 1.0
    )


def split_options(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits config keyword arguments into (DenseMixer options, everything else)."""
    options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    rest = {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}
    return options, rest


def check_option_names(names: Any, where: str) -> None:
    """Raises ValueError naming every entry of ``names`` that is not a DenseMixer option."""
    unknown = sorted(set(names) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"{where}: unknown DenseMixer option(s) {unknown}; expected some of "
            f"{list(OPTION_NAMES)}."
        )


def renormalises_topk(config: Any) -> bool:
    """Whether the top-k weights are divided by S, the sum of the selected scores.

    Megatron renormalises softmax scores when top-k comes before the softmax
    (``moe_router_pre_softmax=False``) and sigmoid-style scores whenever k > 1.
    """
    if config.moe_router_score_function == "softmax":
        return not config.moe_router_pre_softmax
    return config.moe_router_topk > 1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    # Fractions are Real but do not compare with tensors; bools are ints.
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, fractions.Fraction)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


# The token sampler keeps a token when an fp32 torch.rand draw (steps of 2**-24) is below f:
# a smaller f keeps tokens at rate 2**-24, not f, and the 1/f rescaling then overflows.
_SAMPLER_RESOLUTION = 2.0**-24


def _check_types(options: DenseMixerOptions) -> None:
    """Type and range of each option on its own, whether or not the flag is on."""
    flag = options.moe_dense_router_grad
    if not isinstance(flag, bool):
        # A YAML or CLI string such as "false" is truthy: refuse it rather than guess.
        raise ValueError(
            f"moe_dense_router_grad must be a bool (True or False), got {flag!r} "
            f"({type(flag).__name__}); convert strings from YAML or the command line first."
        )
    variant = options.moe_dense_router_grad_variant
    if variant not in DENSE_ROUTER_GRAD_VARIANTS:
        raise ValueError(
            f"moe_dense_router_grad_variant must be one of {DENSE_ROUTER_GRAD_VARIANTS}, "
            f"got {variant!r}."
        )
    chunk_size = options.moe_dense_router_grad_chunk_size
    if chunk_size is not None and not (_is_int(chunk_size) and chunk_size > 0):
        raise ValueError(
            f"moe_dense_router_grad_chunk_size must be a positive integer or None, got "
            f"{chunk_size!r}; set None to size chunks by moe_dense_router_grad_chunk_budget_mb."
        )
    budget = options.moe_dense_router_grad_chunk_budget_mb
    if not (_is_real(budget) and budget > 0):
        raise ValueError(
            f"moe_dense_router_grad_chunk_budget_mb must be a positive number of MiB, got "
            f"{budget!r}; the default is 256."
        )
    topm = options.moe_dense_router_grad_topm
    # M <= k would score no non-selected expert; M > E does not exist.
    if topm is not None and not (_is_int(topm) and topm >= 2):
        raise ValueError(
            f"moe_dense_router_grad_topm must be an integer above moe_router_topk (so at "
            f"least 2) or None, got {topm!r}; set None for the exact gradient."
        )
    fraction = options.moe_dense_router_grad_token_fraction
    if not (_is_real(fraction) and _SAMPLER_RESOLUTION <= fraction <= 1.0):
        raise ValueError(
            f"moe_dense_router_grad_token_fraction must be in (0, 1] and at least 2**-24 (the "
            f"token sampler's resolution), got {fraction!r}; 1.0 gives the exact gradient."
        )
    estimator = options.moe_dense_router_grad_estimator
    if estimator not in DENSE_ROUTER_GRAD_ESTIMATORS:
        raise ValueError(
            f"moe_dense_router_grad_estimator must be one of {DENSE_ROUTER_GRAD_ESTIMATORS}, "
            f"got {estimator!r}."
        )
    decay = options.moe_dense_router_grad_ema_decay
    # decay = 1 would freeze every expert's mean at its first batch.
    if not (_is_real(decay) and 0.0 <= decay < 1.0):
        raise ValueError(
            f"moe_dense_router_grad_ema_decay must be in [0, 1), got {decay!r}; the default "
            "is 0.99."
        )


def validate_dense_router_grad(config: Any) -> None:
    """Raises ValueError for a bad option value or an unsupported combination.

    Option types and ranges are checked whether or not ``moe_dense_router_grad`` is on, so a
    bad value fails when it is written, not when the flag is flipped; the combinations with
    the rest of the config are checked when the flag is on. Works on any TransformerConfig
    carrying the ``moe_dense_router_grad*`` attributes, so frameworks that build their own
    config class can call it too.

    It also installs the build-time watch of ``megatron_densemixer.check`` (every entry path
    validates, so every path is watched, also a config whose flag is switched on after build).

    Raises:
        ValueError: naming the option, the value and the fix.
    """
    # Megatron is imported here, where a config is validated, not at import: the options and
    # the arithmetic cost model (``python -m megatron_densemixer.cost``) do not need it.
    from megatron_densemixer import compat
    from megatron_densemixer.check import watch_moe_layers

    options = dense_router_grad_options(config)
    _check_types(options)
    num_experts = config.num_moe_experts
    # torch.topk would fail later with "selected index k out of range".
    if num_experts and config.moe_router_topk > num_experts:
        raise ValueError(
            f"moe_router_topk ({config.moe_router_topk}) must not exceed num_moe_experts "
            f"({num_experts})."
        )
    watch_moe_layers()
    if not options.moe_dense_router_grad:
        return
    _check_estimator(config, options)
    _check_routing(config, options, compat.supported_score_functions())
    _check_layer_features(config)


def _fail(message: str) -> None:
    raise ValueError(f"moe_dense_router_grad=True: {message}")


def _check_estimator(config: Any, options: DenseMixerOptions) -> None:
    """The estimator and the opt-in approximations, against the expert count."""
    num_experts = config.num_moe_experts
    # Without experts there is no router to give a gradient to.
    if not num_experts:
        _fail("requires an MoE model; set num_moe_experts.")
    topm = options.moe_dense_router_grad_topm
    # M <= k would score no non-selected expert; M > E does not exist.
    if topm is not None and not config.moe_router_topk < topm <= num_experts:
        _fail(
            f"moe_dense_router_grad_topm={topm} must satisfy moe_router_topk "
            f"({config.moe_router_topk}) < M <= num_moe_experts ({num_experts}); "
            "set it to None for the exact gradient."
        )
    # The EMA estimator needs no expert recompute, so there is nothing for them to save.
    if options.moe_dense_router_grad_estimator == "ema" and approximates(options):
        _fail(
            "moe_dense_router_grad_estimator='ema' does not combine with "
            "moe_dense_router_grad_topm or moe_dense_router_grad_token_fraction < 1 (they thin "
            "out the exact estimator's expert recompute, which 'ema' does not run); set "
            "moe_dense_router_grad_topm=None and moe_dense_router_grad_token_fraction=1.0."
        )


def _check_routing(
    config: Any, options: DenseMixerOptions, score_functions: tuple[str, ...]
) -> None:
    """The router: load balancing, score function, variant, token dropping."""
    # Sinkhorn's probs are not a function of per-expert scores that top-k merely masks.
    if config.moe_router_load_balancing_type == "sinkhorn":
        _fail(
            "moe_router_load_balancing_type='sinkhorn' is not supported; use 'aux_loss', "
            "'seq_aux_loss', 'global_aux_loss' or 'none'."
        )
    # dense_router_probs recomputes s from the logits for these score functions only.
    if config.moe_router_score_function not in score_functions:
        _fail(
            f"moe_router_score_function={config.moe_router_score_function!r} is not supported; "
            f"use one of {score_functions}."
        )
    if options.moe_dense_router_grad_variant == "gated" and not renormalises_topk(config):
        # Without renormalisation there is no shared denominator S to carry a baseline.
        _fail(
            "moe_dense_router_grad_variant='gated' requires renormalised top-k weights "
            "(softmax with moe_router_pre_softmax=False, or sigmoid/sqrtsoftplus with "
            f"moe_router_topk > 1); got score function {config.moe_router_score_function!r}, "
            f"moe_router_pre_softmax={config.moe_router_pre_softmax}, "
            f"moe_router_topk={config.moe_router_topk}. Use 'partscale' instead."
        )
    # A dropped pair keeps its share of S, the sum over the top-k before dropping, which the
    # router reads from the unfused top-k; the fused kernel returns only the dropped result.
    if config.moe_expert_capacity_factor is not None and getattr(
        config, "moe_router_fusion", False
    ):
        _fail(
            f"moe_expert_capacity_factor={config.moe_expert_capacity_factor} (token dropping) "
            "requires moe_router_fusion=False (the fused top-k does not expose the selection "
            "before dropping); set moe_router_fusion=False or moe_expert_capacity_factor=None."
        )


def _check_layer_features(config: Any) -> None:
    """The rest of the MoE layer: probs on input, latent MoE, dispatcher, fp8, CUDA graphs."""
    # With probs applied on the input, E_e(w x) is not linear in w and G_e is not dL/dw_e.
    if config.moe_apply_probs_on_input:
        _fail("moe_apply_probs_on_input=True is not supported; set it to False.")
    # Latent projections put fc1/fc2_latent_proj around the experts: E_e is no longer the
    # expert module alone, and the dense reduction does not recompute them.
    if getattr(config, "moe_latent_size", None):
        _fail("moe_latent_size (latent MoE projections) is not supported; set it to None.")
    # The dense reduction never touches the dispatcher, but a dispatcher it has not been run
    # with (a future type) is refused until it has been.
    if config.moe_token_dispatcher_type not in SUPPORTED_DISPATCHERS:
        _fail(
            f"moe_token_dispatcher_type={config.moe_token_dispatcher_type!r} is not supported; "
            f"use one of {SUPPORTED_DISPATCHERS}."
        )
    # The dense reduction reads expert weights as plain tensors; quantised ones need their
    # own GEMMs, which have not run on a GPU yet.
    if config.fp8 or getattr(config, "fp4", None):
        _fail(
            "fp8/fp4 expert weights are not supported by the dense reduction yet; "
            "train in bf16 or fp32 (unset fp8/fp4)."
        )
    # Transformer Engine's CUDA graphs are a training feature; one that holds the router replays
    # it without running it, so no dense weights would be made. The local implementation also
    # serves inference copies built from the same config, so it is checked at the first
    # training forward instead (megatron_densemixer.check).
    if getattr(config, "cuda_graph_impl", "none") == "transformer_engine" and replays_router(
        config
    ):
        _fail(
            "cuda_graph_impl='transformer_engine' with a cuda_graph_scope that captures the "
            "router (moe_router, moe, or the whole layer) replays it without making dense "
            "weights; capture attention only (cuda_graph_scope=['attn']) or set "
            "cuda_graph_impl='none'."
        )
