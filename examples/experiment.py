"""A/B over seeds: conventional vs DenseMixer router gradients (optionally a frozen router).

Same task, model and steps as the demo, repeated over several seeds; every arm of a seed shares
the data and the initial weights, so the per-seed difference (DenseMixer - conventional) is a
paired comparison. Prints mean +- sample standard deviation over seeds and writes
results/experiment.json. Run from the repository root:

    .venv/bin/python -m examples.experiment [--seeds 0,1,2] [--arms conventional,densemixer]
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Dict, List, Optional

import torch

from examples import demo

METRICS = ["train_loss", "heldout_loss", "agreement", "load_entropy", "routing_flips"]


def spread(values: List[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean, sample standard deviation, min and max of the finite values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = sum(values) / len(values)
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else None
    )
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def aggregate(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per arm and metric: spread over seeds; plus the paired DenseMixer - conventional gaps."""
    rows: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for result in results:
        config = result["config"]
        rows.setdefault(config["arm"], {})[config["seed"]] = result["summary"]
    per_arm = {
        arm: {m: spread([s[m] for s in seeds.values()]) for m in METRICS}
        for arm, seeds in rows.items()
    }
    paired: Dict[str, Any] = {}
    if "conventional" in rows and "densemixer" in rows:
        seeds = sorted(set(rows["conventional"]) & set(rows["densemixer"]))
        for m in METRICS:
            gaps = [_gap(rows["densemixer"][s][m], rows["conventional"][s][m]) for s in seeds]
            paired[m] = {**spread(gaps), "per_seed": dict(zip(seeds, gaps, strict=True))}
    return {"per_arm": per_arm, "densemixer_minus_conventional": paired}


def _gap(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def _pm(stats: Dict[str, Optional[float]], digits: int = 4) -> str:
    if stats["mean"] is None:
        return "-"
    std = "n/a" if stats["std"] is None else f"{stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} +- {std}"


def print_report(summary: Dict[str, Any]) -> None:
    """Mean +- std per arm, then the paired gaps."""
    header = f"{'arm':<14}" + "".join(f"{m:>26}" for m in METRICS)
    print(header)
    print("-" * len(header))
    for arm, metrics in summary["per_arm"].items():
        print(f"{arm:<14}" + "".join(f"{_pm(metrics[m]):>26}" for m in METRICS))
    paired = summary["densemixer_minus_conventional"]
    if paired:
        print(f"{'dense - conv':<14}" + "".join(f"{_pm(paired[m]):>26}" for m in METRICS))
        n = paired["heldout_loss"]["n"]
        wins = sum(
            1 for g in paired["heldout_loss"]["per_seed"].values() if g is not None and g < 0
        )
        print(f"\nheld-out loss lower with DenseMixer on {wins} of {n} seeds (mean +- sample std)")


def main() -> None:
    """Runs the A/B."""
    parser = demo.build_parser(__doc__.splitlines()[0])
    parser.set_defaults(seeds="0,1,2", arms="conventional,densemixer", name="experiment")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    runs = demo.run_configs(args)
    start = time.perf_counter()
    results = demo.train_all(runs)
    wall = time.perf_counter() - start
    summary = aggregate(results)
    print()
    print_report(summary)
    print(f"\ntask's optimal (Bayes) loss {results[0]['loss_floor']:.4f} nats; ", end="")
    print(f"total wall time {wall:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.name}.json")
    for result in results:
        # The curves live in demo.json; keep this file to the per-run summaries.
        result.pop("history")
    with open(path, "w") as f:
        json.dump(
            {
                "wall_time_s": wall,
                "loss_floor": results[0]["loss_floor"],
                "summary": summary,
                "runs": results,
            },
            f,
            indent=1,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
