"""Router-gradient fidelity of the approximations and the EMA estimator against exact DenseMixer."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.measure import median, train_step
from benchmarks.shapes import KNOB_SETTINGS, Shape
from megatron_cpu.models import rel_err

# Router sharpness for the fidelity figures: Megatron's init (std 0.02 weights give
# near-uniform scores over many experts), and the same weights scaled up, as a stand-in for
# a trained router whose scores concentrate on few experts.
ROUTER_SCALES = (1.0, 10.0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def router_grad_fidelity(
    layers: dict[str, Any],
    x: torch.Tensor,
    g: torch.Tensor,
    shape: Shape,
    scale: float,
    draws: int,
) -> dict[str, Any]:
    """router.weight.grad of each approximation against the exact one, router weights x scale.

    Compares the whole gradient and its dense term alone (minus the conventional grad, which
    every setting keeps exactly). The token fraction draws new tokens each step: its figures
    are medians over ``draws`` steps. The EMA estimator's table is emptied, then warmed on
    ``draws`` other batches of the same distribution at this scale, so the measured step sees
    a table built mostly from other tokens, as in training. The router weights are scaled back
    afterwards.

    Args:
        layers: "conventional" and one layer per ``KNOB_SETTINGS`` name, same weights.
        x: The input, [s, b, H], with requires_grad.
        g: dL/dy, shaped like x.
        shape: The layer shape.
        scale: Multiplies every router weight for the measurement.
        draws: Steps per randomised setting.

    Returns:
        The router's logit std and top-k mass at this scale, and per setting the cosine and
        relative error of the whole gradient and of its dense term.
    """
    for layer in layers.values():
        with torch.no_grad():
            layer.router.weight.mul_(scale)
    try:
        exact = _router_grad(layers["exact"], x, g)
        conv = _router_grad(layers["conventional"], x, g)
        with torch.no_grad():
            logits = x.reshape(-1, shape.hidden) @ layers["exact"].router.weight.t()
            topk_mass = torch.softmax(logits, -1).topk(shape.topk, dim=-1).values.sum(-1)
        torch.manual_seed(3)  # the token-fraction draws
        settings = {}
        for name, overrides in KNOB_SETTINGS.items():
            random = "moe_dense_router_grad_token_fraction" in overrides(shape.topk)
            _warm_ema(layers[name], x, g, draws)
            grads = [_router_grad(layers[name], x, g) for _ in range(draws if random else 1)]
            settings[name] = _agreement(grads, exact, conv)
    finally:
        for layer in layers.values():
            with torch.no_grad():
                layer.router.weight.div_(scale)
    return {
        "router_weight_scale": scale,
        "logit_std": logits.std().item(),
        "topk_mass": topk_mass.mean().item(),
        "draws": draws,
        "settings": settings,
    }


def _router_grad(layer: Any, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """router.weight.grad after one training step of ``layer`` on x with dL/dy = g."""
    train_step(layer, x, g, list(layer.parameters()))
    return layer.router.weight.grad.clone()


def _warm_ema(layer: Any, x: torch.Tensor, g: torch.Tensor, draws: int) -> None:
    """Empties ``layer``'s EMA table, if it has one, and warms it on ``draws`` fresh batches.

    Without the warm-up the measured step would see a table built only from its own tokens,
    unlike training, where the table holds mostly other batches'.
    """
    ema = getattr(layer, "dense_router_grad_ema", None)
    if ema is None:
        return
    ema.reset()
    for _ in range(draws):
        warm = torch.randn_like(x).requires_grad_(True)
        train_step(layer, warm, g, list(layer.parameters()))


def _agreement(
    grads: list[torch.Tensor], exact: torch.Tensor, conv: torch.Tensor
) -> dict[str, float]:
    """Median cosine and relative error of ``grads`` against ``exact``, whole and dense term.

    The dense term is the gradient minus the conventional one, ``conv``, which every setting
    keeps exactly.
    """
    return {
        "cosine": median([cosine(gr, exact) for gr in grads]),
        "rel_err": median([rel_err(gr, exact) for gr in grads]),
        "dense_term_cosine": median([cosine(gr - conv, exact - conv) for gr in grads]),
        "dense_term_rel_err": median([rel_err(gr - conv, exact - conv) for gr in grads]),
    }
