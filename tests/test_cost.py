"""The dense backward's communication volume: hand-computed cases and the real collectives."""

from __future__ import annotations

import pytest
import torch

from megatron_densemixer import reduction as dm_reduction
from megatron_densemixer.cost import dense_router_grad_comm_bytes
from megatron_densemixer.experts import ExpertWeights
from tests.support.builders import EXPERTS, FFN, HIDDEN, parallel_config


def test_comm_bytes_single_rank_is_zero():
    """Without EP or expert TP the dense backward communicates nothing."""
    bytes_ = dense_router_grad_comm_bytes(parallel_config(), num_tokens_per_rank=4096)
    assert bytes_ == (0, 0, 0, 0, 0) and bytes_.total == 0


@pytest.mark.parametrize(
    "kw, dtype, expected",
    [
        # EP=4, ETP=1, fp32: P=4, L=2. x, g: 3*100*16*4 = 19200; scores: 3*100*2*4 = 2400;
        # token counts: 3*8 = 24.
        (dict(ep=4), None, (19200, 19200, 2400, 0, 24)),
        # EP=2 x ETP=2, bf16 x and g: P=4, L=4. x, g: 3*100*16*2 = 9600; scores: 3*100*4*4.
        (dict(ep=2, tp=2), torch.bfloat16, (9600, 9600, 4800, 0, 24)),
        # TP=2 with ETP=1, EP=2: P=2 (TP ranks outside the group). x, g: 1*100*16*4 = 6400;
        # scores: 1*100*4*4 = 1600; counts: 8.
        (dict(ep=2, tp=2, etp=1), None, (6400, 6400, 1600, 0, 8)),
        # ETP=2 alone: P=2, L=8: x, g: 6400; scores: 1*100*8*4 = 3200.
        (dict(etp=2), None, (6400, 6400, 3200, 0, 8)),
        # Top-M approximation adds the uint8 pair mask: 3*100*8 = 2400.
        (dict(ep=4, moe_dense_router_grad_topm=4), None, (19200, 19200, 2400, 2400, 24)),
    ],
)
def test_comm_bytes_hand_computed(kw, dtype, expected):
    """dense_router_grad_comm_bytes on hand-computed cases (T=100 tokens per rank, H=16,
    E=8): guards the formula against using the wrong group size, expert count or dtype."""
    tp, ep, etp = kw.pop("tp", 1), kw.pop("ep", 1), kw.pop("etp", None)
    config = parallel_config("alltoall", tp=tp, ep=ep, etp=etp, **kw)
    bytes_ = dense_router_grad_comm_bytes(config, 100, dtype=dtype)
    assert tuple(bytes_) == expected
    assert bytes_.total == sum(expected)


def test_comm_bytes_overrides_and_params_dtype():
    """Explicit EP/ETP override the config; x and g default to the params dtype."""
    config = parallel_config(params_dtype=torch.bfloat16, bf16=True)
    bytes_ = dense_router_grad_comm_bytes(
        config, 10, expert_model_parallel_size=8, expert_tensor_parallel_size=1
    )
    # P=8, L=1: x, g: 7*10*16*2 = 2240; scores: 7*10*1*4 = 280; counts: 7*8 = 56.
    assert tuple(bytes_) == (2240, 2240, 280, 0, 56)


def test_comm_bytes_match_the_collectives(monkeypatch):
    """The reported bytes equal what DenseReduction.scores actually passes to its
    collectives (counted on a fake 4-rank group), so the formula cannot drift from the code."""
    config = parallel_config("alltoall", ep=2, tp=2, moe_dense_router_grad_topm=4)
    group_size, num_tokens = 4, 5
    received = {"all_gather": 0, "all_to_all": 0}

    def all_gather_into_tensor(output, tensor, group=None):
        received["all_gather"] += (output.numel() - tensor.numel()) * tensor.element_size()
        output.copy_(tensor.repeat((group_size,) + (1,) * (tensor.dim() - 1)))

    def all_to_all_single(output, tensor, output_split_sizes, input_split_sizes, group=None):
        own = output_split_sizes[0] * output.shape[1]  # the block this rank keeps
        received["all_to_all"] += (output.numel() - own) * output.element_size()
        output.copy_(tensor)

    monkeypatch.setattr(dm_reduction.dist, "get_world_size", lambda group=None: group_size)
    monkeypatch.setattr(dm_reduction.dist, "all_gather_into_tensor", all_gather_into_tensor)
    monkeypatch.setattr(dm_reduction.dist, "all_to_all_single", all_to_all_single)
    local = EXPERTS // 2
    weights = [
        ExpertWeights(torch.randn(FFN, HIDDEN), None, torch.randn(HIDDEN, FFN // 2), None)
        for _ in range(local)
    ]
    reduction = dm_reduction.DenseReduction(
        config=config,
        chunk_size=3,
        tp_ep_group=object(),
        expert_tp_size=2,
        expert_tp_rank=0,
        local_expert_offset=0,
    )
    pairs = torch.ones(num_tokens, EXPERTS, dtype=torch.bool)
    scores = reduction.scores(
        torch.randn(num_tokens, HIDDEN), torch.randn(num_tokens, HIDDEN), weights, pairs
    )
    assert scores.shape == (num_tokens, EXPERTS)
    expected = dense_router_grad_comm_bytes(config, num_tokens)
    assert received["all_gather"] == (
        expected.all_gather_hidden
        + expected.all_gather_grad
        + expected.all_gather_pairs
        + expected.all_gather_token_counts
    )
    assert received["all_to_all"] == expected.all_to_all_scores
