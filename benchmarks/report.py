"""Targets, tables and run metadata of the benchmark's results."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.shapes import Shape

MIB = 2**20


def evaluate_targets(results: list[dict[str, Any]], clock: str) -> list[dict[str, Any]]:
    """Checks the four targets of the benchmark on the measured results.

    1. Step time of densemixer over conventional within 1.15x of (3k + E) / 3k on the
       largest shape (by conventional expert FLOPs).
    2. At E/k >= 4, the reference's overhead over conventional at least 2x densemixer's.
    3. Peak memory of densemixer at most conventional's + one chunk + 5% of conventional's.
    4. No-grad forward of densemixer within 2% of conventional's.

    Args:
        results: The JSON "shapes" list, one ``bench_shape`` result per shape.
        clock: Whose medians to compare, "cpu" or "wall".

    Returns:
        One entry per target and shape: what, the value, the limit, met or not, a detail line.
    """
    largest = max(results, key=lambda r: Shape(**r["shape"]).conventional_gflop())
    targets = [_step_time_target(largest, clock)]
    for r in results:
        if r["shape"]["experts"] / r["shape"]["topk"] >= 4:
            targets.append(_reference_overhead_target(r, clock))
        targets.append(_peak_memory_target(r))
        targets.append(_no_grad_forward_target(r, clock))
    return targets


def _step_time_target(largest: dict[str, Any], clock: str) -> dict[str, Any]:
    """Target 1 on the largest shape's result."""
    measured = largest["step_ratio"][clock]["densemixer"]
    theory = largest["theory"]["densemixer"]
    return {
        "target": "step time / conventional <= 1.15 x theory, largest shape",
        "shape": largest["shape"]["name"],
        "value": measured / theory,
        "limit": 1.15,
        "met": measured <= 1.15 * theory,
        "detail": f"measured {measured:.2f}x, theory {theory:.2f}x",
    }


def _reference_overhead_target(r: dict[str, Any], clock: str) -> dict[str, Any]:
    """Target 2 on one shape's result."""
    ours = r["step_ratio"][clock]["densemixer"] - 1.0
    ref = r["step_ratio"][clock]["reference"] - 1.0
    ratio = ref / ours if ours > 0 else float("inf")
    return {
        "target": "reference overhead / densemixer overhead >= 2 (E/k >= 4)",
        "shape": r["shape"]["name"],
        "value": ratio,
        "limit": 2.0,
        "met": ratio >= 2.0,
        "detail": f"overheads: densemixer +{ours:.2f}x, reference +{ref:.2f}x",
    }


def _peak_memory_target(r: dict[str, Any]) -> dict[str, Any]:
    """Target 3 on one shape's result."""
    conv_peak, ours_peak = r["peak_bytes"]["conventional"], r["peak_bytes"]["densemixer"]
    allowed = r["chunk_bytes"] + 0.05 * conv_peak
    return {
        "target": "peak - conventional peak <= one chunk + 5% of conventional peak",
        "shape": r["shape"]["name"],
        "value": (ours_peak - conv_peak) / MIB,
        "limit": allowed / MIB,
        "met": ours_peak - conv_peak <= allowed,
        "detail": f"+{(ours_peak - conv_peak) / MIB:.2f} MiB, allowed "
        f"{allowed / MIB:.2f} MiB (chunk {r['chunk_bytes'] / MIB:.2f} MiB)",
    }


def _no_grad_forward_target(r: dict[str, Any], clock: str) -> dict[str, Any]:
    """Target 4 on one shape's result."""
    fwd = r["no_grad_forward_ratio"][clock]["densemixer"]
    return {
        "target": "no-grad forward / conventional <= 1.02",
        "shape": r["shape"]["name"],
        "value": fwd,
        "limit": 1.02,
        "met": fwd <= 1.02,
        "detail": f"{fwd:.3f}x (conventional against itself: "
        f"{r['no_grad_forward_ratio'][clock]['conventional_again']:.3f}x)",
    }


def format_tables(
    results: list[dict[str, Any]],
    knobs: Optional[dict[str, Any]],
    targets: list[dict[str, Any]],
    clock: str,
) -> str:
    """Markdown tables of the results, with times on ``clock``.

    Args:
        results: The JSON "shapes" list.
        knobs: The JSON "approximations" entry, or None when they were skipped.
        targets: ``evaluate_targets``'s list; empty when they were not evaluated.
        clock: Whose times to show, "cpu" or "wall".

    Returns:
        The tables, then the targets, as one string.
    """
    lines = _step_table(results, clock) + [""] + _memory_table(results, clock)
    if knobs is not None:
        lines += [""] + _knobs_table(knobs, clock)
    lines += ["", "Targets", ""] + _target_lines(targets)
    return "\n".join(lines)


def _step_table(results: list[dict[str, Any]], clock: str) -> list[str]:
    """Forward + backward step time of the three layers, one row per shape."""
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
    return lines


def _memory_table(results: list[dict[str, Any]], clock: str) -> list[str]:
    """Peak and saved memory of the three layers, and no-grad forward time, one row per shape."""
    lines = [
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
    return lines


def _knobs_table(knobs: dict[str, Any], clock: str) -> list[str]:
    """Step time and router-gradient fidelity of each approximation, one column per sharpness."""
    lines = [
        f"Approximations and the EMA estimator on {knobs['shape']['name']}: step time, "
        "and router.weight.grad "
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
    return lines


def _target_lines(targets: list[dict[str, Any]]) -> list[str]:
    """One bullet per target, met or MISSED, or why none were evaluated."""
    if not targets:
        return [
            "- not evaluated: the quick shapes are too small (fixed per-call costs outweigh "
            "the expert GEMMs); run the default set"
        ]
    return [
        f"- {'met   ' if t['met'] else 'MISSED'} {t['target']} [{t['shape']}]: {t['detail']}"
        for t in targets
    ]


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


def metadata(argv: Sequence[str], threads: int, clock: str) -> dict[str, Any]:
    """Where and how the benchmark ran.

    Args:
        argv: The command-line arguments, without the program name.
        threads: Torch intra-op threads.
        clock: The clock of the tables and targets, "cpu" or "wall".

    Returns:
        The JSON "meta" entry; the caller adds the end-of-run load average and wall time.
    """
    return {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *argv]),
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
