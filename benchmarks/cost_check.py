"""The cluster cost model's compute part against the CPU benchmark's measured step ratios.

``python -m benchmarks.cost_check results/bench.json`` reads a ``python -m benchmarks --json``
file and prints, per shape, the step ratio DenseMixer / conventional that the cost model's
compute part predicts (1 + dense reduction FLOPs / conventional expert GEMM FLOPs, the same
rate for both) next to the measured one, and the rate each part reached on the CPU: the
conventional step's expert FLOPs over its time, and the dense reduction's FLOPs over the
time DenseMixer added.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from megatron_densemixer.cost import MoELayerShape, dense_flops
from megatron_densemixer.cost.cluster import conventional_flops


def check_rows(results: dict[str, Any], clock: str = "cpu") -> list[dict[str, Any]]:
    """Predicted and measured ratios of every shape in a benchmark JSON.

    Args:
        results: The JSON written by ``python -m benchmarks --json``.
        clock: "cpu" or "wall", as in the benchmark.

    Returns:
        One dict per shape: name, predicted, measured, and the two rates in GFLOP/s.
    """
    rows = []
    for entry in results["shapes"]:
        s = entry["shape"]
        # The benchmark's experts are SwiGLU MLPs in fp32 on one rank.
        shape = MoELayerShape(
            s["experts"], s["topk"], s["hidden"], s["ffn"], s["tokens"], element_size=4
        )
        conventional = entry["step_s"][clock]["conventional"]["median"]
        densemixer = entry["step_s"][clock]["densemixer"]["median"]
        rows.append(
            {
                "shape": s["name"],
                "predicted": 1 + dense_flops(shape) / conventional_flops(shape),
                "measured": entry["step_ratio"][clock]["densemixer"],
                "conventional_gflops": conventional_flops(shape) / conventional / 1e9,
                "dense_gflops": dense_flops(shape) / (densemixer - conventional) / 1e9,
            }
        )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Prints the comparison as a markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost_check")
    parser.add_argument("json", type=Path, help="output of python -m benchmarks --json")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args(argv)
    rows = check_rows(json.loads(args.json.read_text()), args.clock)
    print(
        "| shape | predicted step ratio | measured | measured / predicted "
        "| conventional GFLOP/s | dense reduction GFLOP/s |"
    )
    print("|---|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['predicted']:.2f}x | {r['measured']:.2f}x "
            f"| {r['measured'] / r['predicted']:.2f} | {r['conventional_gflops']:.1f} "
            f"| {r['dense_gflops']:.1f} |"
        )


if __name__ == "__main__":
    main()
