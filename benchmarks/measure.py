"""Timers, peak and saved memory of one step, and the statistics the tables report."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


class Progress:
    """Prints what is being measured, with the elapsed time, to stderr."""

    def __init__(self, total: int) -> None:
        """Starts the clock.

        Args:
            total: Units of work expected in all.
        """
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, message: str) -> None:
        """Reports one more unit of work, then ``message``.

        Args:
            message: What was just measured.
        """
        self.done += 1
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done}/{self.total} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def clear_grads(x: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> None:
    """Drops the input's and the parameters' grads, so each step allocates its own.

    Args:
        x: The layer input.
        params: The layer's parameters.
    """
    for p in params:
        p.grad = None
    x.grad = None


def forward_backward(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """One forward + backward of loss = <y, g>, with dL/dx and every parameter grad.

    Args:
        module: A layer returning (y, bias) like MoELayer.
        x: The input, [s, b, H], with requires_grad.
        g: dL/dy, shaped like y.
    """
    y, _ = module(x)
    y.backward(g)


def train_step(
    module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, params: Sequence[torch.nn.Parameter]
) -> None:
    """clear_grads, then forward_backward.

    Args:
        module: A layer returning (y, bias) like MoELayer.
        x: The input, [s, b, H], with requires_grad.
        g: dL/dy, shaped like y.
        params: The parameters whose grads to clear first.
    """
    clear_grads(x, params)
    forward_backward(module, x, g)


def forward_no_grad(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward under torch.no_grad (inference, RL log-prob passes).

    Args:
        module: The layer.
        x: The input, [s, b, H].
    """
    with torch.no_grad():
        module(x)


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def time_interleaved(
    runs: dict[str, Callable[[], None]], warmup: int, repeats: int, progress: Progress, label: str
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each run on both clocks.

    Runs are taken round-robin, so load drift hits all of them alike, in reverse order every
    other round, so that no run always follows the same one (caches, allocator state).
    "cpu" is this process's CPU time (all threads), "wall" the elapsed time.

    Args:
        runs: The calls to time, by name.
        warmup: Untimed rounds first.
        repeats: Timed rounds.
        progress: Told of each timed round.
        label: Names the measurement in the progress lines.

    Returns:
        {clock: {run: samples}}.
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

    Args:
        fn: The step to profile.

    Returns:
        The peak, in bytes.
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

    Args:
        fn: The forward to watch.
        exclude: Tensors not to count (weights, the input): they exist anyway.

    Returns:
        The bytes saved, each storage counted once.
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
    """Medians of ``time_interleaved``'s samples.

    Args:
        times: {clock: {run: samples}}.

    Returns:
        {clock: {run: {"median": s, "samples": [s, ...]}}}.
    """
    return {
        clock: {name: {"median": median(s), "samples": s} for name, s in runs.items()}
        for clock, runs in times.items()
    }


def ratios(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Each run's time over conventional's, paired by round.

    Pairing each sample with the conventional one of the same round cancels the load
    drift that a ratio of two medians would keep.

    Args:
        times: {clock: {run: samples}}, with a "conventional" run.

    Returns:
        {clock: {run: the median over rounds of its time / conventional's in that round}}.
    """
    return {
        clock: {
            name: median([a / b for a, b in zip(s, runs["conventional"], strict=True)])
            for name, s in runs.items()
        }
        for clock, runs in times.items()
    }
