"""``python -m megatron_densemixer.cost``: the dense backward's cost on a cluster, per layer.

Examples::

    python -m megatron_densemixer.cost --model deepseek-v3 --device h100
    python -m megatron_densemixer.cost --experts 64 --topk 8 --hidden 2048 --ffn 1024 \\
        --tokens 4096 --ep 8 --device b200
    python -m megatron_densemixer.cost --table     # every model preset on every device

See ``cluster.py`` for the model and ``presets.py`` for the figures and their sources.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from megatron_densemixer.cost import MoELayerShape, chunk_tokens
from megatron_densemixer.cost.cluster import ClusterCost, cluster_cost
from megatron_densemixer.cost.presets import DEVICES, MODELS

MIB = 2**20

# Arguments that override a preset's layer shape: (flag, MoELayerShape field, type).
SHAPE_ARGS = (
    ("--experts", "num_experts", int),
    ("--topk", "topk", int),
    ("--hidden", "hidden", int),
    ("--ffn", "ffn", int),
    ("--tokens", "tokens", int),
    ("--ep", "ep", int),
    ("--etp", "etp", int),
    ("--element-size", "element_size", int),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options; shape flags override ``--model``'s preset."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_densemixer.cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", choices=sorted(MODELS), default=None)
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100")
    parser.add_argument("--table", action="store_true", help="markdown table of all presets")
    for flag, field, kind in SHAPE_ARGS:
        parser.add_argument(flag, dest=field, type=kind, default=None)
    parser.add_argument("--no-gated", dest="gated", action="store_false", default=None)
    # Absent unless given, so dense_router_grad_options applies the plugin's own defaults.
    for name in ("chunk_size", "chunk_budget_mb"):
        parser.add_argument(
            f"--moe-dense-router-grad-{name.replace('_', '-')}",
            type=float if name == "chunk_budget_mb" else int,
            default=argparse.SUPPRESS,
        )
    return parser.parse_args(argv)


def check_shape(shape: MoELayerShape) -> None:
    """Refuses a layer shape the formulas would turn into nonsense, naming the flag.

    Raises:
        ValueError: a size is not positive, ``--topk`` exceeds ``--experts``, ``--ep`` does
            not divide ``--experts`` or ``--etp`` does not divide ``--ffn``.
    """
    flags = {field: flag for flag, field, _ in SHAPE_ARGS}
    for field, flag in flags.items():
        if getattr(shape, field) < 1:
            raise ValueError(f"{flag} must be a positive integer, got {getattr(shape, field)}")
    if shape.topk > shape.num_experts:
        raise ValueError(f"--topk ({shape.topk}) must not exceed --experts ({shape.num_experts})")
    # Each EP rank holds E / EP whole experts, each expert-TP rank F / ETP of each.
    if shape.num_experts % shape.ep:
        raise ValueError(f"--ep ({shape.ep}) must divide --experts ({shape.num_experts})")
    if shape.ffn % shape.etp:
        raise ValueError(f"--etp ({shape.etp}) must divide --ffn ({shape.ffn})")


def predict(args: argparse.Namespace, model: Optional[str], device: str) -> ClusterCost:
    """The prediction for one preset (or none) with the command line's overrides applied.

    Raises:
        ValueError: A shape flag is missing and no ``--model`` supplies it, or the shape is
            refused by ``check_shape``.
    """
    fields = [field for _, field, _ in SHAPE_ARGS] + ["gated"]
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if model is None:
        missing = [flag for flag, f, _ in SHAPE_ARGS[:5] if f not in overrides]
        if missing:
            raise ValueError(f"give --model or all of {', '.join(missing)}")
        shape = MoELayerShape(**overrides)
    else:
        shape = MODELS[model].shape._replace(**overrides)
    check_shape(shape)
    tokens = chunk_tokens(args, shape.local_ffn, shape.gated, shape.element_size)
    return cluster_cost(shape, DEVICES[device], tokens)


def report(cost: ClusterCost) -> str:
    """The prediction for one layer and rank, as text."""
    s, m = cost.shape, cost.memory
    link = "inter-node" if cost.spans_nodes else "NVLink"
    return "\n".join(
        [
            f"layer: E={s.num_experts} k={s.topk} H={s.hidden} F={s.ffn} "
            f"{'gated' if s.gated else 'ungated'}, T={s.tokens} tokens/rank, "
            f"EP={s.ep} ETP={s.etp}, {s.element_size}-byte x/g; device {cost.device.name}",
            f"dense backward FLOPs:   {cost.dense_flops / 1e12:.3f} TFLOP "
            f"(conventional expert GEMMs {cost.conventional_flops / 1e12:.3f} TFLOP)",
            f"bytes per ring link:    {cost.link_bytes / 1e9:.3f} GB each way over {link}; "
            f"received in all {cost.comm.total / 1e9:.3f} GB "
            f"(partial G {cost.comm.weight_grads / 1e6:.1f} MB)",
            f"extra memory:           {m.total / MIB:.1f} MiB = blocks {m.blocks / MIB:.1f} "
            f"+ chunk {m.chunk / MIB:.1f} + G {m.weight_grads / MIB:.1f}",
            f"dense backward:         {cost.dense_s * 1e3:.2f} ms = max(compute "
            f"{cost.dense_compute_s * 1e3:.2f}, exchange {cost.dense_comm_s * 1e3:.2f})",
            f"conventional MoE layer: {cost.conventional_s * 1e3:.2f} ms = GEMMs "
            f"{cost.conventional_compute_s * 1e3:.2f} + all-to-alls "
            f"{cost.conventional_comm_s * 1e3:.2f}",
            f"overhead:               {cost.overhead:.2f}x the conventional layer "
            f"(step {1 + cost.overhead:.2f}x)",
        ]
    )


def table(args: argparse.Namespace) -> str:
    """Every model preset on every device, as a markdown table."""
    lines = [
        "| model | layout | T | device | dense TFLOP | GB per link | extra MiB "
        "| dense ms (compute, exchange) | conventional ms (GEMMs + a2a) | overhead |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for key, preset in MODELS.items():
        for device in DEVICES:
            c = predict(args, key, device)
            link = "IB" if c.spans_nodes else "NVLink"
            lines.append(
                f"| {preset.name} | {preset.layout} | {c.shape.tokens} | {c.device.name} "
                f"| {c.dense_flops / 1e12:.2f} | {c.link_bytes / 1e9:.2f} ({link}) "
                f"| {c.memory.total / MIB:.0f} | {c.dense_s * 1e3:.2f} "
                f"({c.dense_compute_s * 1e3:.2f}, {c.dense_comm_s * 1e3:.2f}) "
                f"| {c.conventional_s * 1e3:.2f} ({c.conventional_compute_s * 1e3:.2f} + "
                f"{c.conventional_comm_s * 1e3:.2f}) | {c.overhead:.2f}x |"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Prints one prediction, or with ``--table`` the presets' table."""
    args = parse_args(argv)
    try:
        print(table(args) if args.table else report(predict(args, args.model, args.device)))
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
