"""The command line: ``python -m benchmarks [--shapes quick] [--json PATH] ...``.

Run in the ``.venv`` that ``make`` builds, or from the repository root; see the package
docstring for what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import benchmarks
from benchmarks.measure import CLOCKS, Progress
from benchmarks.shapes import KNOB_SHAPES, SHAPE_SETS


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options.

    Args:
        argv: The arguments without the program name; None reads sys.argv.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=benchmarks.__doc__.split("\n\n")[0]
    )
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
    """Runs the benchmark, prints the tables, writes the JSON.

    Args:
        argv: The arguments without the program name; None reads sys.argv.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # Torch's layers and Megatron load only now (seconds): --help and a bad option answer
    # before them.
    import torch

    from benchmarks.fidelity import ROUTER_SCALES
    from benchmarks.report import evaluate_targets, format_tables, metadata
    from benchmarks.runs import bench_knobs, bench_shape
    from megatron_cpu import init_model_parallel

    torch.set_num_threads(args.threads)
    init_model_parallel(tp=1, ep=1)
    shapes = SHAPE_SETS[args.shapes]
    knob_shape = None
    if not args.no_knobs and args.shapes in KNOB_SHAPES:
        knob_shape = next(s for s in shapes if s.name == KNOB_SHAPES[args.shapes])
    # Units of progress: one per repeat of each timing loop, one per memory pass.
    knob_units = args.repeats + len(ROUTER_SCALES) if knob_shape else 0
    progress = Progress(len(shapes) * (5 * args.repeats + 1) + knob_units)
    meta = metadata(argv, args.threads, args.clock)
    print(
        f"CPU: {meta['cpu_model']}, {meta['cpus_available']} CPUs, torch threads "
        f"{args.threads}, torch {meta['torch']}, megatron-core {meta['megatron_core']}, fp32",
        file=sys.stderr,
    )
    results = [bench_shape(s, args.warmup, args.repeats, progress) for s in shapes]
    knobs = bench_knobs(knob_shape, args.warmup, args.repeats, progress) if knob_shape else None
    # At the quick shapes' sizes per-call overheads (permutation, Python loops, allocator)
    # outweigh the expert GEMMs, so the FLOP-based targets would say nothing.
    targets = [] if args.shapes == "quick" else evaluate_targets(results, args.clock)
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
