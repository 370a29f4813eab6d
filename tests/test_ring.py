"""The dense ring: the (token, expert) pairs it scores and its chunking."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_cpu import run_distributed
from megatron_cpu.models import HIDDEN, build_pair, make_config, rel_err
from megatron_densemixer.experts import expert_routing_weight_grads
from megatron_densemixer.options import dense_router_grad_options
from megatron_densemixer.ring import dense_pairs
from tests.support import reference as ref
from tests.support.builders import (
    loop_scores,
    make_expert_weights,
    reference_model,
    reference_routing,
    run_layer,
)

pytestmark = pytest.mark.usefixtures("model_parallel")

T, H, FFN, E = 11, 8, 6, 4
SEQ, BATCH = 6, 2


def test_pairs_restrict_the_work():
    """With pairs, G is computed exactly on those (token, expert) pairs and 0 elsewhere."""
    experts = make_expert_weights(E, H, FFN, glu=True, bias=False)
    config = SimpleNamespace(gated_linear_unit=True, activation_func=F.silu)
    x, g = torch.randn(T, H, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64)
    pairs = torch.rand(T, E) < 0.4
    full = expert_routing_weight_grads(x, g, experts, config, 3)
    part = expert_routing_weight_grads(x, g, experts, config, 3, pairs=pairs)
    torch.testing.assert_close(part, torch.where(pairs, full, torch.zeros_like(full)))


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunk_size_does_not_change_the_gradient(chunk_size):
    """Chunking is only a memory bound: every chunk size gives the same router gradient."""
    config = make_config(moe_dense_router_grad_chunk_size=chunk_size)
    dense, _ = build_pair(config)
    assert dense.dense_token_ring.chunk_size == chunk_size
    torch.manual_seed(5)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    g = torch.randn(SEQ, BATCH, config.hidden_size)
    _, _, grads = run_layer(dense, x, g)
    model, routing = reference_model(dense, config), reference_routing(dense, config)
    expected = ref.reference(
        model, x.reshape(-1, HIDDEN), g.reshape(-1, HIDDEN), routing, dense=True
    )
    assert rel_err(grads["router.weight"], expected.d_router_w) < 1e-5


# --------------------------------------------------------------------------------------
# The ring exchange over the expert-TP x EP group (gloo processes)
# --------------------------------------------------------------------------------------
RING_EXPERTS, RING_HIDDEN, RING_FFN = 8, 8, 6

# name: (expert-TP size, every member's token count, score only sampled pairs). Uneven and
# empty blocks are what the all-to-all dispatcher can hand the layer.
RING_CASES = {
    2: {
        "ep2": (1, (5, 5), False),
        "ep2_uneven_pairs": (1, (6, 3), True),
    },
    4: {
        "ep4_uneven_empty": (1, (4, 0, 7, 2), False),
        "ep4_pairs": (1, (3, 3, 3, 3), True),
        "ep2_etp2_uneven_pairs": (2, (2, 5, 4, 1), True),
    },
}


def _expert_tp_shard(w, rank: int, size: int):
    """Expert TP rank ``rank``'s F-slice of a gated expert: fc1 rows of gate and of up, fc2
    columns; the replicated fc2 bias is added on expert-TP rank 0 only."""

    def rows(t):
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, size)[rank], torch.chunk(up, size)[rank]])

    fc2 = torch.chunk(w.fc2_weight, size, dim=1)[rank]
    return type(w)(rows(w.fc1_weight), rows(w.fc1_bias), fc2, w.fc2_bias)


def _ring_worker(rank: int, world: int, cases: dict) -> None:
    """Each member scores its share through TokenRing over the whole world and checks
    its rows of G against the float64 loop over all members' tokens and all experts."""
    import torch.distributed as dist

    from megatron_densemixer.ring import TokenRing

    config = SimpleNamespace(gated_linear_unit=True, activation_func=F.silu)
    for name, (etp, counts, with_pairs) in cases.items():
        gen = torch.Generator().manual_seed(7)
        experts = make_expert_weights(RING_EXPERTS, RING_HIDDEN, RING_FFN, glu=True, bias=True)
        x = torch.randn(sum(counts), RING_HIDDEN, generator=gen, dtype=torch.float64)
        g = torch.randn(sum(counts), RING_HIDDEN, generator=gen, dtype=torch.float64)
        pairs = torch.rand(sum(counts), RING_EXPERTS, generator=gen) < 0.5
        expected = loop_scores(x, g, experts, F.silu, glu=True)
        if with_pairs:
            expected = torch.where(pairs, expected, torch.zeros_like(expected))
        ep_rank, etp_rank = divmod(rank, etp)
        num_local = RING_EXPERTS // (world // etp)
        offset = ep_rank * num_local
        local = [_expert_tp_shard(w, etp_rank, etp) for w in experts[offset : offset + num_local]]
        ring = TokenRing(
            config=config,
            chunk_size=2,
            tp_ep_group=dist.group.WORLD,
            expert_tp_size=etp,
            expert_tp_rank=etp_rank,
            local_expert_offset=offset,
        )
        mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        got = ring.routing_weight_grads(
            x[mine], g[mine], local, pairs[mine] if with_pairs else None
        )
        # float64 on both sides, only the summation order differs: agreement to ~1e-14
        # relative; a block scored by the wrong expert or F-slice, or returned to the wrong
        # member, is off by O(1).
        torch.testing.assert_close(
            got, expected[mine], rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("world", sorted(RING_CASES))
def test_ring_exchange_equals_direct_float64(world):
    """TokenRing.scores over EP=2, EP=4 and EP=2 x expert-TP=2 gloo groups, with uneven
    and empty token blocks and with sampled pairs, equals a direct float64 computation over
    all tokens: guards the ring's block order, the return of partial scores to their owner,
    the expert-TP sum and the skipped empty transfers."""
    run_distributed(_ring_worker, world, RING_CASES[world])


def test_topm_keeps_m_experts_per_token_under_dropping():
    """Top-M scores exactly M experts per token even when dropping left fewer than k
    selected (K is forced in, the rest by score): M = num_experts is the exact gradient."""
    config = make_config(moe_dense_router_grad_topm=4)
    torch.manual_seed(0)
    dense_probs = torch.rand(5, 8)
    selected = torch.zeros(5, 8, dtype=torch.bool)
    selected[0, [1, 2]] = True  # two kept
    selected[1, 3] = True  # one kept, one dropped
    dense_probs = dense_probs.masked_fill(selected, 0.0)
    pairs = dense_pairs(dense_probs, selected, dense_router_grad_options(config))
    assert pairs.sum(-1).tolist() == [4] * 5
    assert (pairs | ~selected).all(), "K is always scored"
    expected_row1 = {3, *dense_probs[1].topk(3).indices.tolist()}
    assert set(pairs[1].nonzero().squeeze(1).tolist()) == expected_row1


def test_token_fraction_leaves_the_global_rng_alone():
    """The token sampling draws from the layer's own generator: the global RNG stream (every
    dropout mask after the MoE layer, also in an activation recompute, which draws only when
    grad is enabled) is the same whether or not the draw happens."""
    options = dense_router_grad_options(make_config(moe_dense_router_grad_token_fraction=0.5))
    selected = torch.zeros(6, 8, dtype=torch.bool)
    probs = torch.rand(6, 8)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    assert dense_pairs(probs, selected, options, torch.Generator().manual_seed(0)) is not None
    assert torch.equal(torch.rand(3), expected)
    # The global generator would move the stream: this test can tell the two apart.
    torch.manual_seed(1)
    dense_pairs(probs, selected, options)
    assert not torch.equal(torch.rand(3), expected)
