"""The two runs: the three layers on one shape, and the approximations on one shape."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.fidelity import ROUTER_SCALES, router_grad_fidelity
from benchmarks.layers import build_layers, make_config
from benchmarks.measure import (
    Progress,
    clear_grads,
    forward_backward,
    forward_no_grad,
    peak_step_bytes,
    ratios,
    saved_activation_bytes,
    summarise,
    time_interleaved,
    train_step,
)
from benchmarks.shapes import KNOB_SETTINGS, Shape, knob_theory
from megatron_cpu.models import build_dense_layer
from megatron_densemixer.cost import dense_chunk_bytes_per_token


def bench_shape(shape: Shape, warmup: int, repeats: int, progress: Progress) -> dict[str, Any]:
    """Times, peak memory, saved bytes and no-grad forward of the three layers on ``shape``.

    Args:
        shape: The layer shape.
        warmup: Untimed rounds before each timing loop.
        repeats: Timed rounds of forward + backward (four times as many no-grad forwards).
        progress: Told of each timed round and of the memory pass.

    Returns:
        The shape's entry of the JSON "shapes" list.
    """
    conventional, densemixer, reference = build_layers(shape)
    params = list(densemixer.parameters())
    params_conv = list(conventional.parameters())
    torch.manual_seed(1)
    x = torch.randn(shape.tokens, 1, shape.hidden, requires_grad=True)
    g = torch.randn(shape.tokens, 1, shape.hidden)

    steps: dict[str, Callable[[], None]] = {
        "conventional": lambda: train_step(conventional, x, g, params_conv),
        "densemixer": lambda: train_step(densemixer, x, g, params),
        "reference": lambda: train_step(reference, x, g, params),
    }
    times = time_interleaved(steps, warmup, repeats, progress, f"{shape.name} fwd+bwd")
    fwd_times = _time_no_grad_forwards(
        conventional, densemixer, x, warmup, repeats, progress, shape.name
    )
    layers = {
        "conventional": (conventional, params_conv),
        "densemixer": (densemixer, params),
        "reference": (reference, params),
    }
    peaks, saved = _profile_memory(layers, x, g)
    progress.step(f"{shape.name} memory profiled")

    chunk_tokens = min(densemixer.dense_token_ring.chunk_size, shape.tokens)
    return {
        "shape": dataclasses.asdict(shape),
        "theory": {
            "densemixer": shape.theory_densemixer(),
            "reference": shape.theory_reference(),
        },
        "conventional_expert_gflop": shape.conventional_gflop(),
        "step_s": summarise(times),
        "step_ratio": ratios(times),
        "no_grad_forward_s": summarise(fwd_times),
        "no_grad_forward_ratio": ratios(fwd_times),
        "peak_bytes": peaks,
        "saved_bytes": saved,
        "chunk_tokens": chunk_tokens,
        # The plugin's own budget formula, so the target checks what it promises.
        "chunk_bytes": chunk_tokens
        * dense_chunk_bytes_per_token(densemixer.config, shape.ffn, torch.float32),
    }


def _time_no_grad_forwards(
    conventional: torch.nn.Module,
    densemixer: torch.nn.Module,
    x: torch.Tensor,
    warmup: int,
    repeats: int,
    progress: Progress,
    name: str,
) -> dict[str, dict[str, list[float]]]:
    """Times of the no-grad forward of conventional (twice per round) and densemixer."""
    # The no-grad forward is short: more repeats for a stable median.
    # "conventional_again" times the same layer twice per round: its ratio is the noise
    # floor against which the densemixer ratio should be read.
    forwards = {
        "conventional": lambda: forward_no_grad(conventional, x),
        "densemixer": lambda: forward_no_grad(densemixer, x),
        "conventional_again": lambda: forward_no_grad(conventional, x),
    }
    return time_interleaved(forwards, warmup + 1, 4 * repeats, progress, f"{name} no-grad fwd")


def _profile_memory(
    layers: dict[str, tuple[torch.nn.Module, list[torch.nn.Parameter]]],
    x: torch.Tensor,
    g: torch.Tensor,
) -> tuple[dict[str, int], dict[str, int]]:
    """Peak bytes of one forward + backward and bytes saved for backward, per layer name."""
    peaks = {}
    for name, (layer, layer_params) in layers.items():
        clear_grads(x, layer_params)  # outside the profile: the step starts with no grads
        peaks[name] = peak_step_bytes(functools.partial(forward_backward, layer, x, g))
    saved = {
        name: saved_activation_bytes(functools.partial(layer, x), [*layer_params, x.detach()])
        for name, (layer, layer_params) in layers.items()
    }
    return peaks, saved


def bench_knobs(shape: Shape, warmup: int, repeats: int, progress: Progress) -> dict[str, Any]:
    """Step time and router-gradient fidelity of the approximations against exact DenseMixer.

    Fidelity compares router.weight.grad with the exact DenseMixer one on the same x and g,
    over the whole gradient and over its dense term alone (minus the conventional grad,
    which both keep exactly). The token fraction draws new tokens each step, so its figures
    are medians over the timed steps.

    Args:
        shape: The layer shape.
        warmup: Untimed rounds before the timing loop.
        repeats: Timed rounds, and draws of each randomised setting's fidelity.
        progress: Told of each timed round and of each router scale.

    Returns:
        The JSON "approximations" entry.
    """
    conventional, exact, _ = build_layers(shape)
    state = exact.state_dict()
    layers: dict[str, Any] = {"conventional": conventional}
    for name, overrides in KNOB_SETTINGS.items():
        config = make_config(shape, **overrides(shape.topk))
        layer = exact if not overrides(shape.topk) else build_dense_layer(config)
        layer.load_state_dict(state, strict=True)
        layers[name] = layer

    torch.manual_seed(2)
    x = torch.randn(shape.tokens, 1, shape.hidden, requires_grad=True)
    g = torch.randn(shape.tokens, 1, shape.hidden)
    runs = {
        name: functools.partial(train_step, layer, x, g, list(layer.parameters()))
        for name, layer in layers.items()
    }
    times = time_interleaved(runs, warmup, repeats, progress, f"{shape.name} approximations")

    fidelity = []
    for scale in ROUTER_SCALES:
        fidelity.append(router_grad_fidelity(layers, x, g, shape, scale, draws=repeats))
        progress.step(f"{shape.name} approximations: fidelity, router weights x{scale:g}")
    settings = {
        name: {
            "overrides": overrides(shape.topk),
            "theory": knob_theory(shape, overrides(shape.topk)),
        }
        for name, overrides in KNOB_SETTINGS.items()
    }
    return {
        "shape": dataclasses.asdict(shape),
        "step_s": summarise(times),
        "step_ratio": ratios(times),
        "settings": settings,
        "fidelity": fidelity,
    }
