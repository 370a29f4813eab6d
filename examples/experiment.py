"""Post-training adaptation A/B: pretrain conventionally on task A, fine-tune on task B in arms.

Per seed, one small Megatron Core MoE GPT is pretrained conventionally on task A; five copies
of it are then fine-tuned on task B, where new sub-languages re-use A's tables under a
permutation (see examples/_adaptation.py), in the arms frozen router, conventional, exact
DenseMixer, the EMA estimator and top-M. Every arm of a seed shares the pretrained weights
and the fine-tuning data, so the per-seed differences against conventional are paired.
Prints mean and 95% confidence intervals over seeds and writes results/experiment.json and
results/experiment.png. Each finished seed is saved under results/experiment_seeds/, and a
re-run with the same settings reuses it (an interrupted run resumes). Run in the
``.venv`` that ``make`` builds, as a module or as a script:

    .venv/bin/python -m examples.experiment [--seeds 0,1,2,3,4,5,6,7] [--workers 2]
    .venv/bin/python examples/experiment.py --help
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

# ``examples`` pins the CPU code paths and must load before torch does (run as a module it
# already has; run as a script, the make-built venv's editable install makes it importable).
import examples  # noqa: E402, F401

# Megatron warns at import that Apex / Transformer Engine are absent; expected on CPU.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

import torch  # noqa: E402

from examples import _adaptation as ad  # noqa: E402
from examples._common import (  # noqa: E402
    EXPERIMENT_ARMS,
    arm_list,
    mean_or_none,
    require_packages,
    seed_list,
    write_record,
)

METRICS = [
    ("loss_b", "held-out loss B"),
    ("loss_a", "held-out loss A"),
    ("ideal_agreement", "ideal routing agreement"),
    ("specialisation", "specialisation"),
    ("load_balance", "load balance"),
    ("fidelity_cosine", "cos vs exact"),
    ("fidelity_dense_cosine", "dense-term cos"),
    ("step_cpu_time", "cpu s/step"),
]


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults are the README's run."""
    defaults = ad.AdaptationConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=seed_list, default="0,1,2,3,4,5,6,7", help="comma-separated"
    )
    parser.add_argument(
        "--arms",
        type=arm_list(EXPERIMENT_ARMS),
        default=",".join(EXPERIMENT_ARMS),
        help=f"comma-separated, from {','.join(EXPERIMENT_ARMS)}",
    )
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes, one seed each at a time (one torch thread each); the results do "
        "not depend on it",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="recompute seeds already saved under --out"
    )
    parser.add_argument("--out", type=str, default="results", help="output directory")
    parser.add_argument("--name", type=str, default="experiment", help="output file stem")
    return parser


def run_seed(args: tuple) -> Dict[str, Any]:
    """Pretrains one seed and fine-tunes it in every arm (runs in a worker process)."""
    cfg, seed, arms = args
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True  # Megatron's compiled CPU kernels: eager is faster here
    start_cpu, start = time.process_time(), time.perf_counter()
    pretrained = ad.pretrain(cfg, seed)
    print(f"seed {seed}: pretrained, held-out A loss {pretrained.evals[-1]['loss_a']:.4f}")
    runs = []
    for arm in arms:
        result = ad.finetune(arm, cfg, seed, pretrained)
        s = result["summary"]
        print(
            f"seed {seed}: {arm:<13} loss B {s['loss_b']:.4f}  loss A {s['loss_a']:.4f}  "
            f"ideal agreement {s['ideal_agreement']:.3f}",
            flush=True,
        )
        runs.append(result)
    return {
        "seed": seed,
        "pretrain": {
            "final": pretrained.evals[-1],
            "evals": pretrained.evals,
            "owner": pretrained.owner,
            "step_cpu_time": mean_or_none(pretrained.history["step_cpu_time"]),
        },
        "runs": runs,
        "cpu_s": time.process_time() - start_cpu,
        "wall_s": time.perf_counter() - start,
    }


def _save_seed(cache: str, cfg: ad.AdaptationConfig, arms: List[str], result: dict) -> dict:
    """Writes one seed's results (without per-step curves) where a re-run will find them."""
    for run in result["runs"]:
        run.pop("history", None)  # per-step losses: large; the evals carry the curves
    with open(os.path.join(cache, f"seed{result['seed']}.json"), "w") as f:
        json.dump({"config": ad.config_dict(cfg), "arms": arms, "result": result}, f)
    return result


def _cached_seeds(
    cache: str, cfg: ad.AdaptationConfig, arms: List[str], seeds: List[int]
) -> Dict[int, dict]:
    """Seeds already run with this exact config and these arms (an interrupted run resumes)."""
    found = {}
    for seed in seeds:
        path = os.path.join(cache, f"seed{seed}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            saved = json.load(f)
        if saved["config"] == ad.config_dict(cfg) and saved["arms"] == arms:
            found[seed] = saved["result"]
    return found


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children, imports included."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (p > 0.5).

    Bisection on the CDF, integrated from the density by Simpson's rule (error < 1e-9 here).
    """
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        total = 0.0
        for i in range(n + 1):
            t = i * h
            weight = 1 if i in (0, n) else (4 if i % 2 else 2)
            total += weight * math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def interval(values: List[Optional[float]]) -> Dict[str, Any]:
    """Mean, sample std and the 95% t confidence interval of the mean."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "std": None, "ci95": None, "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def aggregate(seeds: List[Dict[str, Any]], arms: List[str]) -> Dict[str, Any]:
    """Per arm and metric: mean and CI over seeds; per arm: paired differences against
    conventional (arm - conventional, per seed) with their CI."""
    table = {
        arm: {
            key: interval(
                [run["summary"][key] for s in seeds for run in s["runs"] if run["arm"] == arm]
            )
            for key, _ in METRICS
        }
        for arm in arms
    }
    paired: Dict[str, Any] = {}
    if "conventional" in arms:
        for arm in arms:
            if arm == "conventional":
                continue
            paired[arm] = {}
            for key, _ in METRICS[:5]:
                gaps = {}
                for s in seeds:
                    by_arm = {run["arm"]: run["summary"][key] for run in s["runs"]}
                    gaps[s["seed"]] = by_arm[arm] - by_arm["conventional"]
                paired[arm][key] = {**interval(list(gaps.values())), "per_seed": gaps}
    pretrain = {
        key: interval([s["pretrain"]["final"][key] for s in seeds])
        for key in ("loss_a", "specialisation_a")
    }
    return {"per_arm": table, "paired_vs_conventional": paired, "pretrain": pretrain}


def _fmt(stats: Dict[str, Any], digits: int = 4) -> str:
    if stats["mean"] is None:
        return "-"
    if stats["ci95"] is None:
        return f"{stats['mean']:.{digits}f}"
    half = (stats["ci95"][1] - stats["ci95"][0]) / 2
    return f"{stats['mean']:.{digits}f} +- {half:.{digits}f}"


def print_report(summary: Dict[str, Any]) -> None:
    """Mean +- CI half-width per arm, then the paired differences."""
    print("mean +- 95% CI half-width over seeds, at the end of fine-tuning\n")
    header = f"{'arm':<14}" + "".join(f"{title:>25}" for _, title in METRICS)
    print(header + "\n" + "-" * len(header))
    for arm, row in summary["per_arm"].items():
        print(f"{arm:<14}" + "".join(f"{_fmt(row[k]):>25}" for k, _ in METRICS))
    print("\npaired difference arm - conventional (mean +- 95% CI half-width)\n")
    header = f"{'arm':<14}" + "".join(f"{title:>25}" for _, title in METRICS[:5])
    print(header + "\n" + "-" * len(header))
    for arm, row in summary["paired_vs_conventional"].items():
        print(f"{arm:<14}" + "".join(f"{_fmt(row[k]):>25}" for k, _ in METRICS[:5]))


def _curve(seeds: List[Dict[str, Any]], arm: str, key: str) -> tuple[List[int], List[float]]:
    """Mean over seeds of an eval metric, per eval step."""
    runs = [run for s in seeds for run in s["runs"] if run["arm"] == arm]
    steps = [e["step"] for e in runs[0]["evals"]]
    means = []
    for i in range(len(steps)):
        values = [run["evals"][i].get(key) for run in runs]
        means.append(mean_or_none(values))
    return steps, [float("nan") if m is None else m for m in means]


def _color(arm: str) -> str:
    """One matplotlib colour per arm, the same in every panel."""
    return f"C{EXPERIMENT_ARMS.index(arm)}"


def plot(seeds: List[Dict[str, Any]], summary: Dict[str, Any], arms: List[str], path: str) -> None:
    """Curves (mean over seeds) and the paired differences with their 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        ("loss_b", "held-out loss on B (fine-tuning task)", True),
        ("loss_a", "held-out loss on A (forgetting)", False),
        ("ideal_agreement", "ideal routing agreement on B", False),
        ("load_balance", "load balance on B (normalised entropy)", False),
        ("fidelity_cosine", "router grad cosine vs exact DenseMixer (whole, dense term)", False),
    ]
    for ax, (key, title, log) in zip(axes.flat, panels, strict=False):
        for arm in arms:
            steps, values = _curve(seeds, arm, key)
            if any(v == v for v in values):
                ax.plot(steps, values, marker="o", ms=3, label=arm, color=_color(arm))
            if key == "fidelity_cosine":
                steps, values = _curve(seeds, arm, "fidelity_dense_cosine")
                if any(v == v for v in values):
                    label = f"{arm}, dense term"
                    ax.plot(
                        steps, values, ls="--", marker="x", ms=3, label=label, color=_color(arm)
                    )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if log:
            ax.set_yscale("log")
    ax = axes[1, 2]
    keys = ["loss_b", "loss_a", "ideal_agreement"]
    others = list(summary["paired_vs_conventional"])
    width = 0.8 / max(1, len(others))
    for i, arm in enumerate(others):
        means, errors = [], [[], []]
        for key in keys:
            stats = summary["paired_vs_conventional"][arm][key]
            means.append(stats["mean"])
            low, high = stats["ci95"] or (stats["mean"], stats["mean"])
            errors[0].append(stats["mean"] - low)
            errors[1].append(high - stats["mean"])
        xs = [k + (i - (len(others) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=arm, color=_color(arm))
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(keys)), ["loss B", "loss A", "ideal agreement"])
    ax.set_title("arm - conventional, paired by seed (95% CI)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_seeds(
    args: argparse.Namespace, cfg: ad.AdaptationConfig, arms: List[str]
) -> Tuple[List[Dict[str, Any]], List[int]]:
    """Runs every seed not saved yet under ``--out`` (all of them with ``--fresh``).

    Args:
        args: The parsed command line (seeds, workers, output directory).
        cfg: The task, model and schedule.
        arms: The arms to fine-tune.

    Returns:
        Every seed's result, in ``--seeds`` order, and the seeds reused from disk.
    """
    cache = os.path.join(args.out, f"{args.name}_seeds")
    os.makedirs(cache, exist_ok=True)
    done = {} if args.fresh else _cached_seeds(cache, cfg, arms, args.seeds)
    reused = sorted(done)
    if done:
        print(f"reusing seeds {reused} from {cache} (--fresh recomputes them)")
    jobs = [(cfg, seed, arms) for seed in args.seeds if seed not in done]
    if args.workers > 1 and len(jobs) > 1:
        # spawn: fresh interpreters, each with its own single-rank gloo world.
        with multiprocessing.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            for result in pool.imap_unordered(run_seed, jobs, chunksize=1):
                done[result["seed"]] = _save_seed(cache, cfg, arms, result)
            pool.close()
            pool.join()  # reaped, so their CPU time is in RUSAGE_CHILDREN
    else:
        for job in jobs:
            result = run_seed(job)
            done[result["seed"]] = _save_seed(cache, cfg, arms, result)
    return [done[seed] for seed in args.seeds], reused


def main() -> None:
    """Runs the A/B."""
    args = build_parser().parse_args()
    require_packages("examples/experiment.py", ["matplotlib"])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = ad.AdaptationConfig(
        pretrain_steps=args.pretrain_steps,
        finetune_steps=args.finetune_steps,
        eval_every=args.eval_every,
    )
    print(
        f"{len(args.seeds)} seeds x (pretrain {cfg.pretrain_steps} steps on A + "
        f"{len(args.arms)} arms x {cfg.finetune_steps} steps on B); {args.workers} worker(s), "
        "1 torch thread each"
    )
    start = time.perf_counter()
    seeds, reused = run_seeds(args, cfg, args.arms)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds()
    summary = aggregate(seeds, args.arms)
    print()
    print_report(summary)
    pre = summary["pretrain"]
    print(
        f"\nafter pretraining on A: held-out loss {_fmt(pre['loss_a'])}, specialisation "
        f"{_fmt(pre['specialisation_a'], 3)}; task's optimal loss {cfg.loss_floor:.4f} nats"
    )
    runs_cpu = sum(s["cpu_s"] for s in seeds)
    print(
        f"wall time {wall:.0f} s, CPU time {cpu:.0f} s (this process and its workers); "
        f"the seeds' runs took {runs_cpu:.0f} CPU s in all"
    )
    record = {
        "command": "python -m examples.experiment " + " ".join(sys.argv[1:]),
        "config": ad.config_dict(cfg),
        "arms": args.arms,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "runs_cpu_time_s": runs_cpu,
        "reused_seeds": reused,
        "summary": summary,
        "seeds": seeds,
    }
    json_path, png_path = write_record(
        args.out,
        args.name,
        record,
        lambda path: plot(record["seeds"], record["summary"], record["arms"], path),
    )
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
