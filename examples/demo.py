"""Trains a small Megatron Core MoE GPT on CPU: frozen, conventional and DenseMixer routers.

The task (see examples/_synthetic.py) is a token-level mixture of sub-languages, each with
its own next-token table, so the ideal routing (by sub-language) is known. Every arm uses the
same seeds, data and initial weights. Prints a table and writes results/demo.json and
results/demo.png. Run from the repository root:

    .venv/bin/python -m examples.demo [--steps 500] [--seeds 0] [--arms frozen,conventional,...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Any, Dict, List

# Megatron warns at import that Apex / Transformer Engine are absent; expected on CPU.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

import torch  # noqa: E402

from examples import _synthetic as syn  # noqa: E402

COLUMNS = [
    ("train_loss", "train loss"),
    ("heldout_loss", "held-out loss"),
    ("load_entropy", "load entropy"),
    ("agreement", "routing agreement"),
    ("router_grad_norm", "router grad norm"),
    ("dense_share", "dense share"),
    ("routing_flips", "tokens flipped"),
    ("step_time", "wall s/step"),
    ("step_cpu_time", "cpu s/step"),
]


def build_parser(description: str) -> argparse.ArgumentParser:
    """The command line shared with the experiment.

    Args:
        description: The parser's description.

    Returns:
        The parser, with the demo's defaults.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=500, help="training steps per arm")
    parser.add_argument("--seeds", type=str, default="0", help="comma-separated seeds")
    parser.add_argument("--arms", type=str, default=",".join(syn.ARMS), help="comma-separated")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    parser.add_argument("--topk", type=int, default=2, help="experts per token")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (all MoE)")
    parser.add_argument("--expert-ffn", type=int, default=16, help="FFN size of each expert")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 by default: the matrices are tiny, and spinning "
        "intra-op threads slow a step several-fold as soon as anything else uses the cores",
    )
    parser.add_argument("--out", type=str, default="results", help="output directory")
    parser.add_argument("--name", type=str, default="demo", help="output file stem")
    return parser


def run_configs(args: argparse.Namespace) -> List[syn.RunConfig]:
    """One RunConfig per (seed, arm), seeds outermost."""
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in syn.ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; choose from {syn.ARMS}.")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return [
        syn.RunConfig(
            arm=arm,
            seed=seed,
            steps=args.steps,
            batch_size=args.batch_size,
            hidden=args.hidden,
            experts=args.experts,
            topk=args.topk,
            layers=args.layers,
            expert_ffn=args.expert_ffn,
            eval_every=args.eval_every,
        )
        for seed in seeds
        for arm in arms
    ]


def train_all(runs: List[syn.RunConfig]) -> List[Dict[str, Any]]:
    """Trains every run with a progress bar; returns the results with their summaries."""
    results = []
    for run in runs:
        result = syn.train(run, progress=syn.ProgressBar(f"{run.arm} (seed {run.seed})"))
        result["summary"] = syn.summarize(result)
        results.append(result)
    return results


def arm_means(results: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per arm: the mean of each summary column over seeds."""
    by_arm: Dict[str, List[Dict[str, Any]]] = {}
    for result in results:
        by_arm.setdefault(result["config"]["arm"], []).append(result["summary"])
    return {
        arm: {key: syn.mean_or_none([s[key] for s in rows]) for key, _ in COLUMNS}
        for arm, rows in by_arm.items()
    }


def print_table(means: Dict[str, Dict[str, Any]]) -> None:
    """The summary table, one row per arm."""
    header = f"{'arm':<14}" + "".join(f"{title:>19}" for _, title in COLUMNS)
    print(header)
    print("-" * len(header))
    for arm, row in means.items():
        cells = "".join(f"{syn.format_value(row[key], 4):>19}" for key, _ in COLUMNS)
        print(f"{arm:<14}{cells}")


def plot(results: List[Dict[str, Any]], path: str) -> None:
    """Loss and routing curves, one line per arm (first seed) in each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    seen = set()
    for result in results:
        arm = result["config"]["arm"]
        if arm in seen:
            continue
        seen.add(arm)
        history, evals = result["history"], result["evals"]
        steps = [e["step"] for e in evals]
        axes[0, 0].plot(range(1, len(history["loss"]) + 1), _ema(history["loss"]), label=arm)
        excess = [e["loss"] - result["loss_floor"] for e in evals]
        axes[0, 1].plot(steps, excess, marker="o", ms=3, label=arm)
        agreement = [syn.mean_or_none(e["agreement"]) for e in evals]
        axes[1, 0].plot(steps, agreement, marker="o", ms=3, label=arm)
        flips = [v if v is not None else float("nan") for v in history["routing_flips"]]
        axes[1, 1].plot(range(1, len(flips) + 1), _ema(flips), label=arm)
    titles = [
        ("train loss (EMA 0.9)", "step"),
        ("held-out loss minus the task's optimal loss", "step"),
        ("routing agreement I(lang; top-1 expert) / H(lang)", "step"),
        ("tokens that changed expert since last step (EMA)", "step"),
    ]
    for ax, (title, xlabel) in zip(axes.flat, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ema(values: List[float], decay: float = 0.9) -> List[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None or acc != acc else decay * acc + (1 - decay) * v
        out.append(acc)
    return out


def main() -> None:
    """Runs the demo."""
    args = build_parser(__doc__.splitlines()[0]).parse_args()
    # Megatron warns about Apex / Transformer Engine being absent; expected on CPU.
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    runs = run_configs(args)
    print(
        f"{len(runs)} runs: {args.steps} steps each, {args.layers} MoE layers, "
        f"{args.experts} experts (top-{args.topk}), hidden {args.hidden}, expert FFN "
        f"{args.expert_ffn}, task vocab {runs[0].task.vocab_size} "
        f"({runs[0].task.languages} sub-languages)"
    )
    start = time.perf_counter()
    results = train_all(runs)
    wall = time.perf_counter() - start
    means = arm_means(results)
    print()
    print_table(means)
    print(
        f"\ntask's optimal (Bayes) loss {results[0]['loss_floor']:.4f} nats; "
        f"total wall time {wall:.0f} s"
    )
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{args.name}.json")
    png_path = os.path.join(args.out, f"{args.name}.png")
    with open(json_path, "w") as f:
        json.dump(
            {
                "wall_time_s": wall,
                "loss_floor": results[0]["loss_floor"],
                "means": means,
                "runs": results,
            },
            f,
            indent=1,
            allow_nan=False,
        )
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
