"""A naive float64 reference of DenseMixer (DESIGN section 2), independent of the plugin.

Loops over tokens and experts and writes the router gradient out as explicit formulas:

    G[t, e]   = <g_t, E_e(x_t)>
    dL/ds_j   = c (G_j - sum_{e in K} (s_e / S) G_e) / S   j in K, renormalised
              = c G_j / S                                   j not in K, "partscale"
              = c (G_j - sum_{e in K} (s_e / S) G_e) / S   j not in K, "gated"
              = c G_j                                       every j, not renormalised
                (conventional training: 0 for j not in K)
    dL/dz     = (ds/dz)^T dL/ds,   dL/dW_r = dL/dz^T x,   dL/dx_router = dL/dz W_r

With token dropping, K is the top-k pairs that survived capacity and T the top-k before
dropping: S = sum_{j in T} s_j, weights c s_e / S on K, the conventional term above for
every j in T (a dropped j gets only its share of S: c (0 - sum_K ...) / S) and the dense
term for every j not in K.

Only the conventional expert path of dL/dx and the aux/z losses use float64 autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

f64 = torch.float64


@dataclass
class Expert:
    """E(x) = w2 act(w1 x + b1) + b2 with weights in [out, in] layout, float64."""

    w1: torch.Tensor
    b1: Optional[torch.Tensor]
    w2: torch.Tensor
    b2: Optional[torch.Tensor]

    def __call__(self, x: torch.Tensor, act: Callable, glu: bool) -> torch.Tensor:
        a = x @ self.w1.T
        if self.b1 is not None:
            a = a + self.b1
        if glu:
            half = a.shape[-1] // 2
            h = act(a[..., :half]) * a[..., half:]
        else:
            h = act(a)
        out = h @ self.w2.T
        return out + self.b2 if self.b2 is not None else out


@dataclass
class Routing:
    """The routing options of one case (Megatron names)."""

    score_function: str = "softmax"
    topk: int = 2
    pre_softmax: bool = False
    scaling_factor: Optional[float] = None
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    expert_bias: Optional[torch.Tensor] = None
    variant: str = "partscale"
    aux_loss_coeff: float = 0.0
    z_loss_coeff: Optional[float] = None

    @property
    def renormalised(self) -> bool:
        if self.score_function == "softmax":
            return not self.pre_softmax
        return self.topk > 1


@dataclass
class Model:
    router_w: torch.Tensor
    router_b: Optional[torch.Tensor]
    experts: List[Expert]
    act: Callable
    glu: bool
    shared: Optional[Expert] = None
    shared_gate: Optional[torch.Tensor] = None


@dataclass
class Result:
    y: torch.Tensor
    selected: torch.Tensor  # bool [T, E]
    d_router_w: torch.Tensor
    d_router_b: Optional[torch.Tensor]
    d_x: torch.Tensor
    extras: dict = field(default_factory=dict)


def _scores(z: torch.Tensor, fn: str) -> torch.Tensor:
    if fn == "softmax":
        return torch.softmax(z, dim=-1)
    if fn == "sigmoid":
        return torch.sigmoid(z)
    return F.softplus(z).sqrt()


def _select(s_row: torch.Tensor, z_row: torch.Tensor, r: Routing) -> List[int]:
    sel = s_row.clone() if r.score_function != "softmax" or r.pre_softmax else z_row.clone()
    if r.expert_bias is not None:
        sel = sel + r.expert_bias
    num_experts = sel.numel()
    allowed = list(range(num_experts))
    if r.group_topk:
        size = num_experts // r.num_groups
        per_group = r.topk // r.group_topk
        group_score = [
            sum(sorted(sel[g * size : (g + 1) * size].tolist(), reverse=True)[:per_group])
            for g in range(r.num_groups)
        ]
        groups = sorted(range(r.num_groups), key=lambda g: -group_score[g])[: r.group_topk]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
    return sorted(allowed, key=lambda e: -sel[e].item())[: r.topk]


def reference(
    model: Model,
    x: torch.Tensor,
    g: torch.Tensor,
    r: Routing,
    dense: bool,
    forced_selection: Optional[torch.Tensor] = None,
    kept: Optional[torch.Tensor] = None,
) -> Result:
    """Forward value and gradients of loss = sum(y * g) (+ aux/z losses) in float64.

    ``forced_selection`` (bool [T, E]) is the top-k set of every token, as routing replay
    imposes it (an empty row routes that token nowhere); None selects it from the scores.
    ``kept`` (bool [T, E]) marks the top-k pairs that survived token dropping; the others
    count for S but not for the output. None keeps every pair. ``Result.selected`` is the
    kept set K.
    """
    x = x.to(f64)
    g = g.to(f64)
    z = x @ model.router_w.T
    if model.router_b is not None:
        z = z + model.router_b
    s = _scores(z, r.score_function)

    outputs = torch.stack([expert(x, model.act, model.glu) for expert in model.experts], 1)
    G = torch.einsum("th,teh->te", g, outputs)  # [T, E]

    y, selected, weights, ds = _route(x, z, s, outputs, G, r, dense, forced_selection, kept)
    dz = _scores_backward(z, s, ds, r.score_function)
    dz = dz + _aux_grad(z, selected, r)
    shared, d_x_experts = _expert_path(model, x, g, weights)
    if shared is not None:
        y = y + shared

    return Result(
        y=y,
        selected=selected,
        d_router_w=dz.T @ x,
        d_router_b=dz.sum(0) if model.router_b is not None else None,
        d_x=dz @ model.router_w + d_x_experts,
        extras={"G": G, "weights": weights},
    )


def _route(
    x: torch.Tensor,
    z: torch.Tensor,
    s: torch.Tensor,
    outputs: torch.Tensor,
    G: torch.Tensor,
    r: Routing,
    dense: bool,
    forced_selection: Optional[torch.Tensor],
    kept: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routes one token at a time: y [T, H], K (bool [T, E]), the weights and dL/ds [T, E]."""
    num_tokens, num_experts = s.shape
    c = r.scaling_factor or 1.0
    eps = 0.0 if r.score_function == "softmax" else 1e-20
    y = torch.zeros_like(x)
    selected = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    weights = torch.zeros(num_tokens, num_experts, dtype=f64)
    ds = torch.zeros(num_tokens, num_experts, dtype=f64)
    for t in range(num_tokens):
        if forced_selection is None:
            top = _select(s[t], z[t], r)
        else:
            top = forced_selection[t].nonzero()[:, 0].tolist()
        if not top:
            # Routed nowhere (padding exclusion, an empty replayed row): no output, no
            # router gradient.
            continue
        K = [e for e in top if kept is None or kept[t, e]]
        selected[t, K] = True
        S = sum(s[t, e] for e in top) + eps
        for e in K:
            weights[t, e] = c * s[t, e] / S if r.renormalised else c * s[t, e]
            y[t] += weights[t, e] * outputs[t, e]
        ds[t] = _token_score_grad(s[t], G[t], top, K, S, c, r, dense)
    return y, selected, weights, ds


def _token_score_grad(
    s_t: torch.Tensor,
    G_t: torch.Tensor,
    top: List[int],
    K: List[int],
    S: torch.Tensor,
    c: float,
    r: Routing,
    dense: bool,
) -> torch.Tensor:
    """dL/ds [E] of one token, expert by expert, as the module docstring writes it."""
    ds_t = torch.zeros(s_t.numel(), dtype=f64)
    baseline = sum(s_t[e] / S * G_t[e] for e in K) if r.renormalised else 0.0
    for j in range(s_t.numel()):
        if not r.renormalised:
            ds_t[j] = c * G_t[j] if (j in K or dense) else 0.0
            continue
        if j in top:  # the conventional term: j's weight, or only its share of S
            ds_t[j] = c * ((G_t[j] if j in K else 0.0) - baseline) / S
        if dense and j not in K:
            ds_t[j] += c * (G_t[j] if r.variant == "partscale" else G_t[j] - baseline) / S
    return ds_t


def _scores_backward(z: torch.Tensor, s: torch.Tensor, ds: torch.Tensor, fn: str) -> torch.Tensor:
    """dL/dz = (ds/dz)^T dL/ds [T, E] for each score function."""
    if fn == "softmax":
        return s * (ds - (s * ds).sum(-1, keepdim=True))
    if fn == "sigmoid":
        return ds * s * (1 - s)
    return ds * torch.sigmoid(z) / (2 * s)


def _expert_path(
    model: Model, x: torch.Tensor, g: torch.Tensor, weights: torch.Tensor
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The shared expert's output (None without one) and dL/dx through the expert outputs.

    The routed experts count through their conventional path only, at the fixed ``weights``
    [T, E]; the router's share of dL/dx comes from dz. Autograd through a naive loop.
    """
    x_leaf = x.clone().requires_grad_(True)
    y_path = torch.zeros_like(x)
    for e, expert in enumerate(model.experts):
        y_path = y_path + weights[:, e : e + 1] * expert(x_leaf, model.act, model.glu)
    shared = None
    if model.shared is not None:
        shared = model.shared(x_leaf, model.act, model.glu)
        if model.shared_gate is not None:
            shared = shared * torch.sigmoid(x_leaf @ model.shared_gate.T)
        y_path = y_path + shared
    (d_x_experts,) = torch.autograd.grad((y_path * g).sum(), x_leaf)
    return (shared.detach() if shared is not None else None), d_x_experts


def _aux_grad(z: torch.Tensor, selected: torch.Tensor, r: Routing) -> torch.Tensor:
    """dL/dz of Megatron's switch aux loss and z-loss (their published formulas)."""
    z = z.detach().clone().requires_grad_(True)
    loss = z.new_zeros(())
    num_tokens, num_experts = z.shape
    if r.aux_loss_coeff:
        if r.score_function == "softmax":
            p = torch.softmax(z, -1)
        else:
            p = _scores(z, r.score_function)
            p = p / (p.sum(-1, keepdim=True) + 1e-20)
        top = torch.topk(p.detach(), r.topk, dim=-1).indices
        f = torch.zeros(num_experts, dtype=f64).index_add_(
            0, top.reshape(-1), torch.ones(top.numel(), dtype=f64)
        )
        # aux = E * coeff / (k T^2) * sum_i (sum_t p_ti) f_i
        loss = (
            loss + num_experts * r.aux_loss_coeff / (r.topk * num_tokens**2) * (p.sum(0) * f).sum()
        )
    if r.z_loss_coeff:
        loss = loss + r.z_loss_coeff * torch.logsumexp(z, -1).square().mean()
    if not loss.requires_grad:
        return torch.zeros_like(z)
    (dz,) = torch.autograd.grad(loss, z)
    return dz


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under token dropping: ceil(T k / E * capacity factor)."""
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


def keep_by_probs(weights: torch.Tensor, capacity: int) -> torch.Tensor:
    """The "probs" drop policy: each expert keeps its ``capacity`` highest-weight tokens.

    ``weights`` [T, E] are the top-k weights (0 off the top-k); returns the kept top-k pairs,
    bool [T, E], one expert and one token at a time.
    """
    kept = torch.zeros(weights.shape, dtype=torch.bool)
    for e in range(weights.shape[1]):
        tokens = [t for t in range(weights.shape[0]) if weights[t, e] > 0]
        for t in sorted(tokens, key=lambda t: -weights[t, e].item())[:capacity]:
            kept[t, e] = True
    return kept
