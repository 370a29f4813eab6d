"""Trains a small Megatron Core MoE GPT on CPU: frozen, conventional and DenseMixer routers.

The task (see examples/_synthetic.py) is a token-level mixture of sub-languages, each with
its own next-token table, so the ideal routing (by sub-language) is known. Every arm uses the
same seeds, data and initial weights. Prints a table and writes results/demo.json and
results/demo.png. Run in the ``.venv`` that ``make`` builds, as a module or as a script:

    .venv/bin/python -m examples.demo [--steps 500] [--seeds 0] [--arms frozen,densemixer]
    .venv/bin/python examples/demo.py --help
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

# Only torch-free modules up to the argument check: torch and Megatron take seconds to load.
from examples._common import (
    ARM_TITLES,
    DEMO_ARMS,
    arm_list,
    format_value,
    mean_or_none,
    require_packages,
    seed_list,
    write_record,
)

if TYPE_CHECKING:
    from examples._synthetic import RunConfig

COLUMNS: List[Tuple[str, Tuple[str, str], int]] = [
    ("train_loss", ("train", "loss"), 4),
    ("heldout_loss", ("held-out", "loss"), 4),
    ("load_entropy", ("load", "entropy"), 3),
    ("agreement", ("routing", "agreement"), 3),
    ("router_grad_norm", ("router", "grad norm"), 4),
    ("dense_share", ("dense share", "of router grad"), 2),
    ("step_cpu_time", ("CPU", "s/step"), 3),
]
"""The table's columns: summary key, header (two lines) and digits shown."""


def build_parser(description: str) -> argparse.ArgumentParser:
    """The command line.

    Args:
        description: The parser's description.

    Returns:
        The parser, with the demo's defaults.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=500, help="training steps per arm")
    parser.add_argument("--seeds", type=seed_list, default="0", help="comma-separated seeds")
    parser.add_argument(
        "--arms",
        type=arm_list(DEMO_ARMS),
        default=",".join(DEMO_ARMS),
        help=f"comma-separated, from {','.join(DEMO_ARMS)}",
    )
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


def train_all(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Trains one run per (seed, arm), seeds outermost.

    Args:
        args: The parsed command line.

    Returns:
        Every run's result (see ``_synthetic.train``) with its ``summary``.
    """
    # Megatron warns at import that Apex / Transformer Engine are absent; expected on CPU.
    warnings.filterwarnings("ignore")
    import torch

    from examples import _synthetic as syn

    torch.set_num_threads(args.threads)
    runs = [
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
        for seed in args.seeds
        for arm in args.arms
    ]
    print(
        f"{len(runs)} runs: {args.steps} steps each, {args.layers} MoE layers, "
        f"{args.experts} experts (top-{args.topk}), hidden {args.hidden}, expert FFN "
        f"{args.expert_ffn}, task vocab {runs[0].task.vocab_size} "
        f"({runs[0].task.languages} sub-languages)",
        flush=True,
    )
    return [train_one(run) for run in runs]


def train_one(run: RunConfig) -> Dict[str, Any]:
    """Trains one run and prints a line when it is done.

    The progress bar shows on a terminal only; a redirected log gets just the line.
    """
    from tqdm import tqdm

    from examples import _synthetic as syn

    title = f"{ARM_TITLES[run.arm]} (seed {run.seed})"
    start = time.perf_counter()
    with tqdm(total=run.steps, desc=title, unit="step", leave=False, disable=None) as bar:
        result = syn.train(run, progress=_advance(bar))
    result["summary"] = syn.summarize(result)
    print(
        f"{title}: {run.steps} steps in {time.perf_counter() - start:.0f} s, "
        f"held-out loss {format_value(result['summary']['heldout_loss'], 4)}",
        flush=True,
    )
    return result


def _advance(bar: Any) -> Callable[[int, int, float], None]:
    """A ``train`` progress callback that moves ``bar`` one step and shows the loss."""

    def advance(step: int, total: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)

    return advance


def arm_means(results: List[Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Per arm, the mean over seeds of every summary value."""
    by_arm: Dict[str, List[Dict[str, Any]]] = {}
    for result in results:
        by_arm.setdefault(result["config"]["arm"], []).append(result["summary"])
    return {
        arm: {key: mean_or_none([s[key] for s in rows]) for key in rows[0]}
        for arm, rows in by_arm.items()
    }


def format_table(means: Dict[str, Dict[str, Optional[float]]]) -> str:
    """The summary table, one row per arm, under two-line headers (under 100 columns)."""
    cells = {
        ARM_TITLES[arm]: [format_value(row[key], digits) for key, _, digits in COLUMNS]
        for arm, row in means.items()
    }
    arm_width = max(len("arm"), *(len(title) for title in cells))
    widths = [
        max(len(header[0]), len(header[1]), *(len(row[i]) for row in cells.values()))
        for i, (_, header, _) in enumerate(COLUMNS)
    ]

    def line(first: str, values: Sequence[str]) -> str:
        return f"{first:<{arm_width}}" + "".join(
            f"  {v:>{w}}" for v, w in zip(values, widths, strict=True)
        )

    lines = [
        line("", [header[0] for _, header, _ in COLUMNS]),
        line("arm", [header[1] for _, header, _ in COLUMNS]),
    ]
    lines.append("-" * len(lines[0]))
    lines.extend(line(title, row) for title, row in cells.items())
    return "\n".join(lines)


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
        label = ARM_TITLES[arm]
        history, evals = result["history"], result["evals"]
        steps = [e["step"] for e in evals]
        axes[0, 0].plot(range(1, len(history["loss"]) + 1), _ema(history["loss"]), label=label)
        excess = [e["loss"] - result["loss_floor"] for e in evals]
        axes[0, 1].plot(steps, excess, marker="o", ms=3, label=label)
        agreement = [mean_or_none(e["agreement"]) for e in evals]
        axes[1, 0].plot(steps, agreement, marker="o", ms=3, label=label)
        flips = [v if v is not None else float("nan") for v in history["routing_flips"]]
        axes[1, 1].plot(range(1, len(flips) + 1), _ema(flips), label=label)
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs the demo.

    Args:
        argv: The arguments; ``sys.argv[1:]`` if None.
    """
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    require_packages("examples/demo.py", ["tqdm", "matplotlib"])
    start = time.perf_counter()
    results = train_all(args)
    wall = time.perf_counter() - start
    means = arm_means(results)
    print()
    print(format_table(means))
    print(
        f"\ntask's optimal (Bayes) loss {results[0]['loss_floor']:.4f} nats; "
        f"total wall time {wall:.0f} s"
    )
    record = {
        "wall_time_s": wall,
        "loss_floor": results[0]["loss_floor"],
        "means": means,
        "runs": results,
    }
    json_path, png_path = write_record(
        args.out, args.name, record, lambda path: plot(results, path), allow_nan=False
    )
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
