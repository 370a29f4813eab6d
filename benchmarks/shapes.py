"""What the benchmark measures: the layer shapes, and the approximation settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Shape:
    """One MoE layer shape. Experts are gated (SwiGLU) MLPs: H -> 2F -> F -> H."""

    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    topk: int
    chunk_size: Optional[int] = None
    """Tokens per chunk of the dense backward; None keeps the plugin's default budget."""

    def expert_flops(self) -> int:
        """FLOPs of one expert forward on one token: 6HF for a gated expert."""
        return 6 * self.hidden * self.ffn

    def theory_densemixer(self) -> float:
        """(3k + E) / 3k: the plugin's expert compute over conventional."""
        return (3 * self.topk + self.experts) / (3 * self.topk)

    def theory_reference(self) -> float:
        """3E / 3k = E / k: the reference approach's expert compute over conventional."""
        return self.experts / self.topk

    def conventional_gflop(self) -> float:
        """Expert GFLOPs of one conventional forward + backward (3k expert forwards/token)."""
        return 3 * self.topk * self.tokens * self.expert_flops() / 1e9


# Hidden/FFN ratios follow the named models; token counts and widths are scaled down so the
# default set runs in minutes on two CPU cores.
SHAPE_SETS: dict[str, list[Shape]] = {
    "quick": [
        Shape("mixtral-like-xs", tokens=128, hidden=64, ffn=224, experts=8, topk=2),
        Shape("qwen3-30b-a3b-like-xs", tokens=128, hidden=64, ffn=24, experts=32, topk=4),
    ],
    "default": [
        # Mixtral 8x7B: H=4096, F=14336, E=8, k=2.
        Shape("mixtral-like", tokens=1024, hidden=256, ffn=896, experts=8, topk=2),
        # Qwen1.5-MoE-A2.7B-like expert count (E=60, k=4) at E/k = 15; rounded to E=64.
        Shape("e64-k4", tokens=1024, hidden=256, ffn=128, experts=64, topk=4),
        # Qwen3-30B-A3B: H=2048, F=768, E=128, k=8.
        Shape("qwen3-30b-a3b-like", tokens=1024, hidden=256, ffn=96, experts=128, topk=8),
        # OLMoE-1B-7B: H=2048, F=1024, E=64, k=8; the largest default shape.
        Shape("olmoe-like", tokens=1024, hidden=384, ffn=192, experts=64, topk=8),
        # The Qwen3-like shape with the dense backward split into 4 chunks of 256 tokens.
        Shape(
            "qwen3-30b-a3b-like-chunk256",
            tokens=1024,
            hidden=256,
            ffn=96,
            experts=128,
            topk=8,
            chunk_size=256,
        ),
    ],
    "large": [
        Shape("mixtral-like-l", tokens=4096, hidden=512, ffn=1792, experts=8, topk=2),
        Shape("qwen3-30b-a3b-like-l", tokens=4096, hidden=512, ffn=192, experts=128, topk=8),
    ],
}

# The opt-in approximations, as config overrides given k (topk); measured on KNOB_SHAPES.
KNOB_SETTINGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "exact": lambda k: {},
    "topm=2k": lambda k: {"moe_dense_router_grad_topm": 2 * k},
    "topm=4k": lambda k: {"moe_dense_router_grad_topm": 4 * k},
    "f=0.5": lambda k: {"moe_dense_router_grad_token_fraction": 0.5},
    "f=0.25": lambda k: {"moe_dense_router_grad_token_fraction": 0.25},
    "ema": lambda k: {"moe_dense_router_grad_estimator": "ema"},
}
KNOB_SHAPES = {"default": "qwen3-30b-a3b-like", "quick": "qwen3-30b-a3b-like-xs"}


def knob_theory(shape: Shape, overrides: dict[str, Any]) -> float:
    """Expert compute over conventional: 3k + M scored pairs per token, or 3k + fE.

    The EMA estimator scores no expert: its one GEMM, g A^T, costs 2HE FLOPs per token, E / 3F
    expert forwards (its forward-side sums are elementwise and left out, like the router's).

    Args:
        shape: The layer shape.
        overrides: One of the ``KNOB_SETTINGS`` config overrides for ``shape.topk``.

    Returns:
        The theoretical step-time ratio to conventional.
    """
    dense = shape.experts
    if overrides.get("moe_dense_router_grad_estimator") == "ema":
        dense = shape.experts / (3 * shape.ffn)
    elif "moe_dense_router_grad_topm" in overrides:
        dense = overrides["moe_dense_router_grad_topm"]
    dense *= overrides.get("moe_dense_router_grad_token_fraction", 1.0)
    return (3 * shape.topk + dense) / (3 * shape.topk)
