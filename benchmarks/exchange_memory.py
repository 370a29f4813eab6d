"""Extra peak memory of the dense backward's exchange at several EP sizes (gloo, on CPU).

``python -m benchmarks.exchange_memory`` runs ``TokenRing.routing_weight_grads`` (the part of
the backward that DenseMixer adds) in EP=2, 4 and 8 gloo worlds with the same tokens per rank,
and reports each rank's peak of live tensor bytes during the call above what was live before
it (torch.profiler's CPU allocator events, ``benchmarks.measure``), against the budget
``cost.memory_bytes`` promises.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F

from benchmarks.measure import peak_step_bytes
from megatron_cpu import run_distributed
from megatron_densemixer.cost import MoELayerShape, memory_bytes
from megatron_densemixer.experts import ExpertWeights
from megatron_densemixer.ring import TokenRing, dense_chunk_size

MIB = 2**20


def _worker(rank: int, world: int, args: dict[str, Any], out: str):
    """One EP rank: the peak of the ring's ``routing_weight_grads`` call."""
    import torch.distributed as dist

    config = SimpleNamespace(gated_linear_unit=True, activation_func=F.silu)
    tokens, hidden, ffn, experts = args["tokens"], args["hidden"], args["ffn"], args["experts"]
    gen = torch.Generator().manual_seed(0)
    local = experts // world
    weights = [
        ExpertWeights(
            torch.randn(2 * ffn, hidden, generator=gen) / hidden**0.5,
            None,
            torch.randn(hidden, ffn, generator=gen) / ffn**0.5,
            None,
        )
        for _ in range(experts)
    ][rank * local : (rank + 1) * local]
    gen.manual_seed(1 + rank)
    x = torch.randn(tokens, hidden, generator=gen)
    g = torch.randn(tokens, hidden, generator=gen)
    chunk = dense_chunk_size(config, ffn, torch.float32)
    result: dict[str, Any] = {"chunk_tokens": chunk}
    ring = TokenRing(
        config=config,
        chunk_size=chunk,
        tp_ep_group=dist.group.WORLD,
        local_expert_offset=rank * local,
    )
    ring.routing_weight_grads(x, g, weights)  # warm-up: gloo's connections
    result["current_peak"] = peak_step_bytes(lambda: ring.routing_weight_grads(x, g, weights))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def measure(args: dict[str, Any], ep: int) -> dict[str, Any]:
    """Runs ``_worker`` in an EP-rank gloo world; the largest figures over its ranks."""
    with tempfile.TemporaryDirectory() as out:
        run_distributed(_worker, ep, args, out)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    merged = {k: max(r[k] for r in ranks) for k in ranks[0]}
    shape = MoELayerShape(
        args["experts"], 2, args["hidden"], args["ffn"], args["tokens"], ep=ep, element_size=4
    )
    merged["budget"] = memory_bytes(shape, merged["chunk_tokens"]).total
    return merged


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Measures every EP size and prints a markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exchange_memory")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args(argv)
    sizes = {k: getattr(args, k) for k in ("tokens", "hidden", "ffn", "experts")}
    results = {ep: measure(sizes, ep) for ep in args.ep}
    print(
        f"fp32, T={args.tokens} tokens per rank, H={args.hidden}, F={args.ffn} (SwiGLU), "
        f"E={args.experts}; peak MiB over ranks",
        file=sys.stderr,
    )
    head = "| EP | budget MiB | peak MiB | peak / budget |"
    print(head)
    print("|" + "--:|" * (head.count("|") - 1))
    for ep, r in results.items():
        line = (
            f"| {ep} | {r['budget'] / MIB:.1f} | {r['current_peak'] / MIB:.1f} "
            f"| {r['current_peak'] / r['budget']:.3f} |"
        )
        print(line)


if __name__ == "__main__":
    main()
