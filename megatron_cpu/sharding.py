"""Slicing a single-rank MoE state dict for one expert-parallel / tensor-parallel rank."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["shard_moe_state_dict"]

_SEQ_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*?)experts\.local_experts\.(?P<idx>\d+)\.(?P<lin>linear_fc[12])\.(?P<kind>weight|bias|_extra_state)$"
)
_GROUPED_EXPERT_RE = re.compile(r"^(?P<prefix>.*?)experts\.(?P<w>weight[12])$")
_SHARED_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*?)shared_experts\.(?P<lin>linear_fc[12])\.(?P<kind>weight|bias|_extra_state)$"
)


def _shard_fc1_rows(t: torch.Tensor, rank: int, size: int, gated: bool) -> torch.Tensor:
    """Column-parallel shard of fc1 (output dim 0).  With a gated linear unit fc1 is
    ``[gate; up]`` and every rank holds ``[gate_shard; up_shard]``."""
    if size == 1:
        return t
    if gated:
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]], 0)
    return torch.chunk(t, size, dim=0)[rank]


def _shard_mlp_param(value: Any, match: re.Match, rank: int, size: int, gated: bool) -> Any:
    """One MLP parameter's tensor-parallel shard: fc1 by rows, fc2's weight by columns;
    fc2's bias and TE's ``_extra_state`` are replicated."""
    if match["kind"] == "_extra_state":
        return value
    if match["lin"] == "linear_fc1":
        return _shard_fc1_rows(value, rank, size, gated)
    if match["kind"] == "weight":
        return torch.chunk(value, size, dim=1)[rank]
    return value


def _shard_grouped_weight(
    value: torch.Tensor, name: str, num_experts: int, lo: int, hi: int
) -> torch.Tensor:
    """Experts ``lo:hi`` of a legacy ``GroupedMLP`` weight (``weight1`` or ``weight2``)."""
    # GroupedMLP.forward reads expert e's weights as ``weight1.view(E, hidden, -1)[e]``
    # and ``weight2.view(E, -1, hidden)[e]``: raw contiguous memory chunks (for
    # weight1 that is *not* a column block of the [hidden, E * ffn] matrix).
    hidden = value.shape[0] if name == "weight1" else value.shape[1]
    chunks = value.reshape(num_experts, -1)[lo:hi]
    shard = chunks.reshape(-1, hidden) if name == "weight2" else chunks.reshape(hidden, -1)
    return shard.clone()


def shard_moe_state_dict(
    full_state_dict: Mapping[str, torch.Tensor],
    *,
    num_experts: int,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
    tp_size: int = 1,
    tp_rank: int = 0,
    gated_linear_unit: bool = False,
) -> dict[str, torch.Tensor]:
    """Slice the state dict of a single-rank MoE layer for one (EP, ETP, TP) rank.

    Works on ``MoELayer.state_dict()`` keys with any prefix (e.g. inside a GPTModel):

    * ``...experts.local_experts.{e}.linear_fc{1,2}.{weight,bias}`` (``SequentialMLP``):
      experts are split contiguously over EP ranks (expert ``e`` lives on EP rank
      ``e // (num_experts // ep_size)`` under local index ``e % num_local``); fc1 is
      column-parallel (rows split over ETP, GLU-aware), fc2 row-parallel (columns split
      over ETP; its bias is replicated).
    * ``...experts.weight1`` ``[hidden, E * ffn(*2)]`` / ``...experts.weight2``
      ``[E * ffn, hidden]`` (legacy ``GroupedMLP``): only ``etp_size == 1`` is handled.
    * ``...shared_experts.linear_fc{1,2}.*``: split over the dense ``tp_size`` like an MLP.
    * Everything else (router weight / bias / buffers, ``_extra_state`` entries, ...) is
      copied unchanged.

    Also usable on gradients (pass a dict of full-layer ``param.grad``) to get the
    expected local gradients of expert weights.
    """
    num_local = num_experts // ep_size
    lo, hi = ep_rank * num_local, (ep_rank + 1) * num_local
    out: dict[str, torch.Tensor] = {}
    for key, value in full_state_dict.items():
        m = _SEQ_EXPERT_RE.match(key)
        if m:
            e = int(m["idx"])
            if not lo <= e < hi:
                continue
            new_key = f"{m['prefix']}experts.local_experts.{e - lo}.{m['lin']}.{m['kind']}"
            value = _shard_mlp_param(value, m, etp_rank, etp_size, gated_linear_unit)
            out[new_key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        m = _GROUPED_EXPERT_RE.match(key)
        if m:
            if etp_size != 1:
                raise NotImplementedError("GroupedMLP sharding with etp_size > 1")
            out[key] = _shard_grouped_weight(value, m["w"], num_experts, lo, hi)
            continue
        m = _SHARED_EXPERT_RE.match(key)
        if m:
            value = _shard_mlp_param(value, m, tp_rank, tp_size, gated_linear_unit)
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out
