"""Step time and memory of one MoE layer: conventional, DenseMixer (this plugin), reference.

Three implementations of the same layer, sharing one set of weights, run the same
forward + backward (loss = <y, g> with a fixed random g, and dL/dx computed):

* ``conventional``: Megatron Core's MoELayer (allgather dispatcher, SequentialMLP experts).
* ``densemixer``: DenseMixerMoELayer. The forward is MoELayer's; the backward recomputes
  every expert on every token, chunk by chunk, to get G[t, e] = <g_t, E_e(x_t)>.
* ``reference``: the reference DenseMixer approach written here from the math (DESIGN.md
  section 2): every expert runs on every token in the forward and keeps its activations;
  y = sparse.detach() + (dense - dense.detach()) with dense = sum_e w_e E_e(x), and each
  expert's output gradient is masked to the tokens that selected it.

Cost per token in units of one expert forward (DESIGN.md section 3): conventional 3k,
densemixer 3k + E, reference 3E, so the theoretical step-time ratios to conventional are
(3k + E) / 3k and E / k. They count expert GEMMs only (router, permutation and elementwise
work are left out).

Memory is measured two ways, both as bytes handed out by torch's CPU allocator (weights,
the input and everything alive before the step are excluded):

* ``peak``: the highest total of live tensor bytes allocated during one forward + backward,
  from the allocation events of ``torch.profiler`` (``profile_memory=True``), replayed in
  time order. It includes activations, transient backward buffers and the parameter grads.
* ``saved``: bytes of the tensors autograd saves for backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``; unique storages, weights and input excluded).

It also times the no-grad forward (inference, RL log-prob passes) of conventional against
densemixer, and the cost and router-gradient fidelity of the two opt-in approximations
(``moe_dense_router_grad_topm``, ``moe_dense_router_grad_token_fraction``) against the
exact DenseMixer gradient.

Runs on CPU through the test-only shim in tests/megatron_cpu.py, in fp32, with one torch
thread by default, and reports this process's CPU time per call (``--clock wall`` for elapsed
time): on a machine shared with other jobs, CPU time with one thread measures the work done,
while elapsed time also counts the waits for a core. Warm-up, then ``--repeats`` rounds in
which the implementations run round-robin; times are medians, ratios the median over rounds
of the per-round ratio to conventional. Example:

    .venv/bin/python benchmarks/bench_moe_layer.py --json results/bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One MoE layer shape. Experts are gated (SwiGLU) MLPs: H -> 2F -> F -> H."""

    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    topk: int
    chunk_size: Optional[int] = None
    """Tokens per chunk of the dense backward; None keeps the plugin's default budget."""

    def expert_flops(self) -> int:
        """FLOPs of one expert forward on one token: 6HF for a gated expert."""
        return 6 * self.hidden * self.ffn

    def theory_densemixer(self) -> float:
        """(3k + E) / 3k: the plugin's expert compute over conventional."""
        return (3 * self.topk + self.experts) / (3 * self.topk)

    def theory_reference(self) -> float:
        """3E / 3k = E / k: the reference approach's expert compute over conventional."""
        return self.experts / self.topk

    def conventional_gflop(self) -> float:
        """Expert GFLOPs of one conventional forward + backward (3k expert forwards/token)."""
        return 3 * self.topk * self.tokens * self.expert_flops() / 1e9


# Hidden/FFN ratios follow the named models; token counts and widths are scaled down so the
# default set runs in minutes on two CPU cores.
SHAPE_SETS: dict[str, list[Shape]] = {
    "quick": [
        Shape("mixtral-like-xs", tokens=128, hidden=64, ffn=224, experts=8, topk=2),
        Shape("qwen3-30b-a3b-like-xs", tokens=128, hidden=64, ffn=24, experts=32, topk=4),
    ],
    "default": [
        # Mixtral 8x7B: H=4096, F=14336, E=8, k=2.
        Shape("mixtral-like", tokens=1024, hidden=256, ffn=896, experts=8, topk=2),
        # Qwen1.5-MoE-A2.7B-like expert count (E=60, k=4) at E/k = 15; rounded to E=64.
        Shape("e64-k4", tokens=1024, hidden=256, ffn=128, experts=64, topk=4),
        # Qwen3-30B-A3B: H=2048, F=768, E=128, k=8.
        Shape("qwen3-30b-a3b-like", tokens=1024, hidden=256, ffn=96, experts=128, topk=8),
        # OLMoE-1B-7B: H=2048, F=1024, E=64, k=8; the largest default shape.
        Shape("olmoe-like", tokens=1024, hidden=384, ffn=192, experts=64, topk=8),
        # The Qwen3-like shape with the dense backward split into 4 chunks of 256 tokens.
        Shape(
            "qwen3-30b-a3b-like-chunk256",
            tokens=1024,
            hidden=256,
            ffn=96,
            experts=128,
            topk=8,
            chunk_size=256,
        ),
    ],
    "large": [
        Shape("mixtral-like-l", tokens=4096, hidden=512, ffn=1792, experts=8, topk=2),
        Shape("qwen3-30b-a3b-like-l", tokens=4096, hidden=512, ffn=192, experts=128, topk=8),
    ],
}

# The opt-in approximations, as config overrides given k (topk); measured on KNOB_SHAPES.
KNOB_SETTINGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "exact": lambda k: {},
    "topm=2k": lambda k: {"moe_dense_router_grad_topm": 2 * k},
    "topm=4k": lambda k: {"moe_dense_router_grad_topm": 4 * k},
    "f=0.5": lambda k: {"moe_dense_router_grad_token_fraction": 0.5},
    "f=0.25": lambda k: {"moe_dense_router_grad_token_fraction": 0.25},
}
KNOB_SHAPES = {"default": "qwen3-30b-a3b-like", "quick": "qwen3-30b-a3b-like-xs"}


def knob_theory(shape: Shape, overrides: dict[str, Any]) -> float:
    """Expert compute over conventional: 3k + M scored pairs per token, or 3k + fE."""
    dense = shape.experts
    if "moe_dense_router_grad_topm" in overrides:
        dense = overrides["moe_dense_router_grad_topm"]
    dense *= overrides.get("moe_dense_router_grad_token_fraction", 1.0)
    return (3 * shape.topk + dense) / (3 * shape.topk)


# --------------------------------------------------------------------------------------
# Building the three layers
# --------------------------------------------------------------------------------------


def cpu_shim() -> Any:
    """Imports tests/megatron_cpu.py (a test-only module) with the repository on sys.path."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("tests.megatron_cpu")


def make_config(shape: Shape, **overrides: Any) -> Any:
    """A DenseMixer config for ``shape``: fp32, SwiGLU experts, no biases, allgather."""
    from megatron_densemixer import DenseMixerTransformerConfig

    fields: dict[str, Any] = dict(
        num_layers=1,
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn,
        moe_ffn_hidden_size=shape.ffn,
        num_attention_heads=4,
        num_moe_experts=shape.experts,
        moe_router_topk=shape.topk,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_token_dispatcher_type="allgather",
        # No aux loss: it costs the same in all three and would only add noise.
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        use_cpu_initialization=True,
        moe_dense_router_grad=True,
        moe_dense_router_grad_chunk_size=shape.chunk_size,
    )
    fields.update(overrides)
    return DenseMixerTransformerConfig(**fields)


def build_layers(shape: Shape, seed: int = 0) -> tuple[Any, Any, torch.nn.Module]:
    """(conventional MoELayer, DenseMixerMoELayer, reference), all with the same weights.

    The reference shares the DenseMixer layer's router and experts (same Parameters);
    every step clears the grads first, so sharing changes nothing in what is measured.
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_densemixer import densemixer_spec

    shim = cpu_shim()
    config = make_config(shape)
    torch.manual_seed(seed)
    spec = get_moe_module_spec(use_te=False, num_experts=shape.experts)
    densemixer = shim.build_moe_layer(config, spec=densemixer_spec(spec))
    conventional = shim.build_moe_layer(dataclasses.replace(config, moe_dense_router_grad=False))
    conventional.load_state_dict(densemixer.state_dict(), strict=True)
    return conventional, densemixer, ReferenceDenseMoE(densemixer)


def _mask_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad * mask


class ReferenceDenseMoE(torch.nn.Module):
    """The reference DenseMixer layer: all experts on all tokens, masked expert gradients.

    For tokens x [T, H], the router's conventional top-k probs p [T, E] (zero off K) and its
    dense weights of the non-selected experts d [T, E] (zero on K, DESIGN.md section 2):

        out_e  = E_e(x)                       for every expert e, on every token
        sparse = sum_e p_e * out_e            (the conventional forward value)
        dense  = sum_e (p_e + d_e) * out_e
        y      = sparse.detach() + (dense - dense.detach())

    and dL/d(out_e) is multiplied by m_e = 1[e in K] (a tensor hook), so each expert's
    weights and x receive only their selected tokens' gradient, while the router receives
    <g, out_e> for every expert. Cost: E expert forwards and 2E expert backwards per token.

    Reuses the layer's DenseMixerTopKRouter (for p and d) and the SequentialMLP experts'
    weights; the experts run as plain F.linear calls on all tokens, one GEMM per projection.
    """

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Returns (y [s, b, H], None), like MoELayer."""
        layer = self.layer
        probs, routing_map = layer.router(hidden_states)  # [T, E] each
        dense_probs = layer.router.pop_dense_probs()  # [T, E], zero on K
        weights = probs + dense_probs  # the DenseMixer weights of every expert
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        mask = routing_map.to(x.dtype)
        sparse = torch.zeros_like(x)
        dense = torch.zeros_like(x)
        for e, mlp in enumerate(layer.experts.local_experts):
            fc1 = F.linear(x, mlp.linear_fc1.weight)  # [T, 2F]
            gate, linear = torch.chunk(fc1, 2, dim=-1)
            out = F.linear(F.silu(gate) * linear, mlp.linear_fc2.weight)  # [T, H]
            out.register_hook(functools.partial(_mask_grad, mask=mask[:, e : e + 1]))
            with torch.no_grad():
                sparse.addcmul_(out, probs[:, e : e + 1])
            dense = dense + out * weights[:, e : e + 1]
        y = sparse + (dense - dense.detach())
        return y.view_as(hidden_states), None


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


class Progress:
    """Prints what is being measured, with the elapsed time, to stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, message: str) -> None:
        """Reports one more unit of work, then ``message``."""
        self.done += 1
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done}/{self.total} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def clear_grads(x: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> None:
    """Drops the input's and the parameters' grads, so each step allocates its own."""
    for p in params:
        p.grad = None
    x.grad = None


def forward_backward(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """One forward + backward of loss = <y, g>, with dL/dx and every parameter grad."""
    y, _ = module(x)
    y.backward(g)


def train_step(
    module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, params: Sequence[torch.nn.Parameter]
) -> None:
    """clear_grads, then forward_backward."""
    clear_grads(x, params)
    forward_backward(module, x, g)


def forward_no_grad(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward under torch.no_grad (inference, RL log-prob passes)."""
    with torch.no_grad():
        module(x)


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def time_interleaved(
    runs: dict[str, Callable[[], None]], warmup: int, repeats: int, progress: Progress, label: str
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each run on both clocks, {clock: {run: samples}}.

    Runs are taken round-robin, so load drift hits all of them alike, in reverse order every
    other round, so that no run always follows the same one (caches, allocator state).
    "cpu" is this process's CPU time (all threads), "wall" the elapsed time.
    """
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    samples: dict[str, dict[str, list[float]]] = {c: {n: [] for n in runs} for c in CLOCKS}
    for r in range(repeats):
        order = list(runs.items())
        for name, fn in order if r % 2 == 0 else reversed(order):
            start = {c: clock() for c, clock in CLOCKS.items()}
            fn()
            for c, clock in CLOCKS.items():
                samples[c][name].append(clock() - start[c])
        progress.step(
            f"{label} repeat {r + 1}/{repeats} (cpu/wall ms): "
            + ", ".join(
                f"{n} {1e3 * samples['cpu'][n][-1]:.0f}/{1e3 * samples['wall'][n][-1]:.0f}"
                for n in runs
            )
        )
    return samples


def peak_step_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes of live tensors allocated by ``fn`` above what was live when it started.

    Replays torch.profiler's CPU allocation/free events (``profile_memory=True``) in time
    order; frees of tensors that existed before ``fn`` can push the running total below 0.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def saved_activation_bytes(fn: Callable[[], Any], exclude: Sequence[torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn`` runs.

    Storages of ``exclude`` (weights, the input) are not counted: they exist anyway.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def summarise(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """{clock: {run: {"median": s, "samples": [s, ...]}}}."""
    return {
        clock: {name: {"median": median(s), "samples": s} for name, s in runs.items()}
        for clock, runs in times.items()
    }


def ratios(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """{clock: {run: the median over rounds of its time / conventional's in that round}}.

    Pairing each sample with the conventional one of the same round cancels the load
    drift that a ratio of two medians would keep.
    """
    return {
        clock: {
            name: median([a / b for a, b in zip(s, runs["conventional"], strict=True)])
            for name, s in runs.items()
        }
        for clock, runs in times.items()
    }


def bench_shape(shape: Shape, warmup: int, repeats: int, progress: Progress) -> dict[str, Any]:
    """Times, peak memory, saved bytes and no-grad forward of the three layers on ``shape``."""
    from megatron_densemixer.moe_layer import dense_chunk_bytes_per_token

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

    # The no-grad forward is short: more repeats for a stable median.
    # "conventional_again" times the same layer twice per round: its ratio is the noise
    # floor against which the densemixer ratio should be read.
    forwards = {
        "conventional": lambda: forward_no_grad(conventional, x),
        "densemixer": lambda: forward_no_grad(densemixer, x),
        "conventional_again": lambda: forward_no_grad(conventional, x),
    }
    fwd_times = time_interleaved(
        forwards, warmup + 1, 4 * repeats, progress, f"{shape.name} no-grad fwd"
    )

    forward_backwards = {
        "conventional": (params_conv, lambda: forward_backward(conventional, x, g)),
        "densemixer": (params, lambda: forward_backward(densemixer, x, g)),
        "reference": (params, lambda: forward_backward(reference, x, g)),
    }
    peaks = {}
    for name, (layer_params, fn) in forward_backwards.items():
        clear_grads(x, layer_params)  # outside the profile: the step starts with no grads
        peaks[name] = peak_step_bytes(fn)
    saved = {
        "conventional": saved_activation_bytes(lambda: conventional(x), [*params_conv, x.detach()]),
        "densemixer": saved_activation_bytes(lambda: densemixer(x), [*params, x.detach()]),
        "reference": saved_activation_bytes(lambda: reference(x), [*params, x.detach()]),
    }
    progress.step(f"{shape.name} memory profiled")

    chunk_tokens = min(densemixer.dense_reduction.chunk_size, shape.tokens)
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


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def bench_knobs(shape: Shape, warmup: int, repeats: int, progress: Progress) -> dict[str, Any]:
    """Step time and router-gradient fidelity of the approximations against exact DenseMixer.

    Fidelity compares router.weight.grad with the exact DenseMixer one on the same x and g,
    over the whole gradient and over its dense term alone (minus the conventional grad,
    which both keep exactly). The token fraction draws new tokens each step, so its figures
    are medians over the timed steps.
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_densemixer import densemixer_spec

    shim = cpu_shim()
    conventional, exact, _ = build_layers(shape)
    state = exact.state_dict()
    spec = densemixer_spec(get_moe_module_spec(use_te=False, num_experts=shape.experts))
    layers: dict[str, Any] = {"conventional": conventional}
    for name, overrides in KNOB_SETTINGS.items():
        config = make_config(shape, **overrides(shape.topk))
        layer = exact if not overrides(shape.topk) else shim.build_moe_layer(config, spec=spec)
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


# Router sharpness for the fidelity figures: Megatron's init (std 0.02 weights give
# near-uniform scores over many experts), and the same weights scaled up, as a stand-in for
# a trained router whose scores concentrate on few experts.
ROUTER_SCALES = (1.0, 10.0)


def router_grad_fidelity(
    layers: dict[str, Any],
    x: torch.Tensor,
    g: torch.Tensor,
    shape: Shape,
    scale: float,
    draws: int,
) -> dict[str, Any]:
    """router.weight.grad of each approximation against the exact one, router weights x scale.

    Compares the whole gradient and its dense term alone (minus the conventional grad, which
    every setting keeps exactly). The token fraction draws new tokens each step: its figures
    are medians over ``draws`` steps.
    """
    for layer in layers.values():
        with torch.no_grad():
            layer.router.weight.mul_(scale)
    try:

        def router_grad(name: str) -> torch.Tensor:
            layer = layers[name]
            train_step(layer, x, g, list(layer.parameters()))
            return layer.router.weight.grad.clone()

        exact, conv = router_grad("exact"), router_grad("conventional")
        with torch.no_grad():
            logits = x.reshape(-1, shape.hidden) @ layers["exact"].router.weight.t()
            topk_mass = torch.softmax(logits, -1).topk(shape.topk, dim=-1).values.sum(-1)
        torch.manual_seed(3)  # the token-fraction draws
        settings = {}
        for name, overrides in KNOB_SETTINGS.items():
            random = "moe_dense_router_grad_token_fraction" in overrides(shape.topk)
            grads = [router_grad(name) for _ in range(draws if random else 1)]
            settings[name] = {
                "cosine": median([cosine(gr, exact) for gr in grads]),
                "rel_err": median([rel_err(gr, exact) for gr in grads]),
                "dense_term_cosine": median([cosine(gr - conv, exact - conv) for gr in grads]),
                "dense_term_rel_err": median([rel_err(gr - conv, exact - conv) for gr in grads]),
            }
    finally:
        for layer in layers.values():
            with torch.no_grad():
                layer.router.weight.div_(scale)
    return {
        "router_weight_scale": scale,
        "logit_std": logits.std().item(),
        "topk_mass": topk_mass.mean().item(),
        "draws": draws,
        "settings": settings,
    }


# --------------------------------------------------------------------------------------
# Targets, tables, metadata
# --------------------------------------------------------------------------------------


def evaluate_targets(results: list[dict[str, Any]], clock: str) -> list[dict[str, Any]]:
    """Checks the four targets of the benchmark on the measured results.

    1. Step time of densemixer over conventional within 1.15x of (3k + E) / 3k on the
       largest shape (by conventional expert FLOPs).
    2. At E/k >= 4, the reference's overhead over conventional at least 2x densemixer's.
    3. Peak memory of densemixer at most conventional's + one chunk + 5% of conventional's.
    4. No-grad forward of densemixer within 2% of conventional's.

    Times are medians on ``clock`` ("cpu" or "wall").
    """
    targets: list[dict[str, Any]] = []
    largest = max(results, key=lambda r: Shape(**r["shape"]).conventional_gflop())
    measured = largest["step_ratio"][clock]["densemixer"]
    theory = largest["theory"]["densemixer"]
    targets.append(
        {
            "target": "step time / conventional <= 1.15 x theory, largest shape",
            "shape": largest["shape"]["name"],
            "value": measured / theory,
            "limit": 1.15,
            "met": measured <= 1.15 * theory,
            "detail": f"measured {measured:.2f}x, theory {theory:.2f}x",
        }
    )
    for r in results:
        name = r["shape"]["name"]
        if r["shape"]["experts"] / r["shape"]["topk"] >= 4:
            ours = r["step_ratio"][clock]["densemixer"] - 1.0
            ref = r["step_ratio"][clock]["reference"] - 1.0
            ratio = ref / ours if ours > 0 else float("inf")
            targets.append(
                {
                    "target": "reference overhead / densemixer overhead >= 2 (E/k >= 4)",
                    "shape": name,
                    "value": ratio,
                    "limit": 2.0,
                    "met": ratio >= 2.0,
                    "detail": f"overheads: densemixer +{ours:.2f}x, reference +{ref:.2f}x",
                }
            )
        conv_peak, ours_peak = r["peak_bytes"]["conventional"], r["peak_bytes"]["densemixer"]
        allowed = r["chunk_bytes"] + 0.05 * conv_peak
        targets.append(
            {
                "target": "peak - conventional peak <= one chunk + 5% of conventional peak",
                "shape": name,
                "value": (ours_peak - conv_peak) / MIB,
                "limit": allowed / MIB,
                "met": ours_peak - conv_peak <= allowed,
                "detail": f"+{(ours_peak - conv_peak) / MIB:.2f} MiB, allowed "
                f"{allowed / MIB:.2f} MiB (chunk {r['chunk_bytes'] / MIB:.2f} MiB)",
            }
        )
        fwd = r["no_grad_forward_ratio"][clock]["densemixer"]
        targets.append(
            {
                "target": "no-grad forward / conventional <= 1.02",
                "shape": name,
                "value": fwd,
                "limit": 1.02,
                "met": fwd <= 1.02,
                "detail": f"{fwd:.3f}x (conventional against itself: "
                f"{r['no_grad_forward_ratio'][clock]['conventional_again']:.3f}x)",
            }
        )
    return targets


def format_tables(
    results: list[dict[str, Any]],
    knobs: Optional[dict[str, Any]],
    targets: list[dict[str, Any]],
    clock: str,
) -> str:
    """Markdown tables of the results, with times on ``clock``."""
    lines = [
        f"Forward + backward, median {clock} ms (ratio to conventional; "
        "theory = expert FLOP ratio)",
        "",
        "| shape | T | H | F | E | k | conventional | densemixer | theory | reference | theory |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        s, t, q = r["shape"], r["step_s"][clock], r["step_ratio"][clock]
        lines.append(
            f"| {s['name']} | {s['tokens']} | {s['hidden']} | {s['ffn']} | {s['experts']} "
            f"| {s['topk']} | {1e3 * t['conventional']['median']:.1f} "
            f"| {1e3 * t['densemixer']['median']:.1f} ({q['densemixer']:.2f}x) "
            f"| {r['theory']['densemixer']:.2f}x "
            f"| {1e3 * t['reference']['median']:.1f} ({q['reference']:.2f}x) "
            f"| {r['theory']['reference']:.2f}x |"
        )
    lines += [
        "",
        "Memory of one forward + backward (MiB above the weights and input) and no-grad "
        f"forward (median {clock} ms)",
        "",
        "| shape | peak conv | peak densemixer (+chunk) | peak reference | saved conv "
        "| saved densemixer | saved reference | no-grad fwd conv ms | densemixer ms "
        "| conv again (noise) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        p, sv = r["peak_bytes"], r["saved_bytes"]
        fw, fq = r["no_grad_forward_s"][clock], r["no_grad_forward_ratio"][clock]
        lines.append(
            f"| {r['shape']['name']} | {p['conventional'] / MIB:.1f} "
            f"| {p['densemixer'] / MIB:.1f} ({r['chunk_bytes'] / MIB:.1f}, "
            f"{r['chunk_tokens']} tok) | {p['reference'] / MIB:.1f} "
            f"| {sv['conventional'] / MIB:.1f} | {sv['densemixer'] / MIB:.1f} "
            f"| {sv['reference'] / MIB:.1f} | {1e3 * fw['conventional']['median']:.2f} "
            f"| {1e3 * fw['densemixer']['median']:.2f} ({fq['densemixer']:.3f}x) "
            f"| {fq['conventional_again']:.3f}x |"
        )
    if knobs is not None:
        lines += [
            "",
            f"Approximations on {knobs['shape']['name']}: step time, and router.weight.grad "
            "against exact DenseMixer (cosine / relative error) at two router sharpnesses",
            "",
            f"| setting | step {clock} ms | / conventional | theory "
            + "".join(
                f"| cos, rel err (logit std {f['logit_std']:.2f}, top-k mass {f['topk_mass']:.2f}) "
                for f in knobs["fidelity"]
            )
            + "|",
            "|---|--:|--:|--:|" + "--:|" * len(knobs["fidelity"]),
        ]
        kt, kq = knobs["step_s"][clock], knobs["step_ratio"][clock]
        for name, k in knobs["settings"].items():
            lines.append(
                f"| {name} | {1e3 * kt[name]['median']:.1f} | {kq[name]:.2f}x "
                f"| {k['theory']:.2f}x "
                + "".join(
                    f"| {f['settings'][name]['cosine']:.4f}, {f['settings'][name]['rel_err']:.3f} "
                    for f in knobs["fidelity"]
                )
                + "|"
            )
    lines += ["", "Targets", ""]
    for t in targets:
        mark = "met   " if t["met"] else "MISSED"
        lines.append(f"- {mark} {t['target']} [{t['shape']}]: {t['detail']}")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU model name, from lscpu (or platform.processor() without it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def metadata(threads: int, clock: str) -> dict[str, Any]:
    """Where and how the benchmark ran."""
    from importlib.metadata import version

    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": "cpu",
        "cpu_model": cpu_model(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "clock": clock,
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "python": platform.python_version(),
        "dtype": "float32",
        "load_average_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="default")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per layer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per layer first")
    # One intra-op thread by default: then the process's CPU time per step is the work done,
    # whatever else shares the machine, and no OpenMP thread spins waiting for a busy core.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="what the tables and targets use: this process's CPU time (robust on a shared "
        "machine when --threads 1) or wall time (use on an idle machine with more threads)",
    )
    parser.add_argument("--no-knobs", action="store_true", help="skip the approximations")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs the benchmark, prints the tables, writes the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shim = cpu_shim()
    shim.init_model_parallel(tp=1, ep=1)
    shapes = SHAPE_SETS[args.shapes]
    knob_shape = None
    if not args.no_knobs and args.shapes in KNOB_SHAPES:
        knob_shape = next(s for s in shapes if s.name == KNOB_SHAPES[args.shapes])
    # Units of progress: one per repeat of each timing loop, one per memory pass.
    knob_units = args.repeats + len(ROUTER_SCALES) if knob_shape else 0
    progress = Progress(len(shapes) * (5 * args.repeats + 1) + knob_units)
    meta = metadata(args.threads, args.clock)
    print(
        f"CPU: {meta['cpu_model']}, {meta['cpus_available']} CPUs, torch threads "
        f"{args.threads}, torch {meta['torch']}, megatron-core {meta['megatron_core']}, fp32",
        file=sys.stderr,
    )
    results = [bench_shape(s, args.warmup, args.repeats, progress) for s in shapes]
    knobs = bench_knobs(knob_shape, args.warmup, args.repeats, progress) if knob_shape else None
    targets = evaluate_targets(results, args.clock)
    meta["load_average_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - progress.start

    print(
        f"\n{meta['command']}\nCPU {meta['cpu_model']} ({meta['cpus_available']} CPUs, "
        f"torch threads {args.threads}), torch {meta['torch']}, megatron-core "
        f"{meta['megatron_core']}, fp32, {args.repeats} repeats after {args.warmup} warm-up, "
        f"median {args.clock} time; load average {meta['load_average_start'][0]:.2f} at start, "
        f"{meta['load_average_end'][0]:.2f} at end; {meta['wall_s']:.0f} s in all\n"
    )
    print(format_tables(results, knobs, targets, args.clock))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "shapes": results, "approximations": knobs, "targets": targets}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
