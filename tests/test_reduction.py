"""The dense reduction: the (token, expert) pairs it scores and its chunking."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_densemixer.experts import expert_output_scores
from tests.support import reference as ref
from tests.support.builders import (
    HIDDEN,
    build_pair,
    make_config,
    make_expert_weights,
    reference_model,
    reference_routing,
    rel_err,
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
    full = expert_output_scores(x, g, experts, config, 3)
    part = expert_output_scores(x, g, experts, config, 3, pairs=pairs)
    torch.testing.assert_close(part, torch.where(pairs, full, torch.zeros_like(full)))


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunk_size_does_not_change_the_gradient(chunk_size):
    """Chunking is only a memory bound: every chunk size gives the same router gradient."""
    config = make_config(moe_dense_router_grad_chunk_size=chunk_size)
    dense, _ = build_pair(config)
    assert dense.dense_reduction.chunk_size == chunk_size
    torch.manual_seed(5)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    g = torch.randn(SEQ, BATCH, config.hidden_size)
    _, _, grads = run_layer(dense, x, g)
    model, routing = reference_model(dense, config), reference_routing(dense, config)
    expected = ref.reference(
        model, x.reshape(-1, HIDDEN), g.reshape(-1, HIDDEN), routing, dense=True
    )
    assert rel_err(grads["router.weight"], expected.d_router_w) < 1e-5
