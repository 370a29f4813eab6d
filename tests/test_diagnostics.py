"""RouterDiagnostics and its helpers, on hand-computed cases and on real MoE layers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_cpu.models import HIDDEN, build_dense_layer, make_config
from megatron_densemixer.diagnostics import (
    TRACKER_PREFIX,
    RouterDiagnostics,
    changed_rows,
    dense_router_weight_grad,
    grad_split,
    normalized_entropy,
)
from tests.support.builders import moe_metrics, remove_moe_metrics

pytestmark = pytest.mark.usefixtures("model_parallel")

SEQ, BATCH = 5, 2


def forward_backward(layer, seed: int = 1) -> None:
    """loss = sum(y * g) for fixed random x and g."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    grad = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    output, _ = layer(x)
    (output * grad).sum().backward()


# Hand-computed cases of the helpers.
def test_dense_weight_grad_unnormalised_top1():
    """Softmax before top-1 (w_e = p_e): dz_j = u_e p_e (delta_ej - p_j); guards the Jacobian.

    z = 0 over 3 experts gives p = 1/3; K = {0}; u = (0, 1, 0); x = (1, 2):
    dz = (1/3) * (-1/3, 2/3, -1/3) = (-1/9, 2/9, -1/9) and D = dz^T x.
    """
    config = make_config(num_moe_experts=3, moe_router_topk=1, moe_router_pre_softmax=True)
    routing_map = torch.tensor([[True, False, False]])
    grad = dense_router_weight_grad(
        torch.tensor([[1.0, 2.0]]),
        torch.zeros(1, 3),
        routing_map,
        torch.tensor([[0.0, 1, 0]]),
        config,
    )
    expected = torch.tensor([[-1.0, -2.0], [2.0, 4.0], [-1.0, -2.0]]) / 9
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("scaling", [None, 2.0])
def test_dense_weight_grad_renormalised_top2(scaling):
    """Top-2 then softmax (w_e = c p_e / stopgrad(S)): S stays out of the dense Jacobian.

    z = 0 over 3 experts, K = {0, 1}, S = 2/3, u = (0, 0, 1), x = (1, 2):
    dz_j = (c / S) p_2 (delta_2j - p_j) = c * (-1/6, -1/6, 1/3).
    """
    config = make_config(
        num_moe_experts=3, moe_router_topk=2, moe_router_topk_scaling_factor=scaling
    )
    routing_map = torch.tensor([[True, True, False]])
    grad = dense_router_weight_grad(
        torch.tensor([[1.0, 2.0]]),
        torch.zeros(1, 3),
        routing_map,
        torch.tensor([[0.0, 0, 1]]),
        config,
    )
    c = scaling or 1.0
    expected = c * torch.tensor([[-1 / 6, -1 / 3], [-1 / 6, -1 / 3], [1 / 3, 2 / 3]])
    torch.testing.assert_close(grad, expected)


def test_grad_split_hand_cases():
    """Share and cosine: orthogonal halves, parallel parts, and no dense part at all."""
    norm_t, norm_c, norm_d, share, cosine = grad_split(
        torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])
    )
    assert (norm_t, norm_c, norm_d) == pytest.approx((math.sqrt(2), 1.0, 1.0))
    assert share == pytest.approx(0.5) and cosine == pytest.approx(0.0)

    _, norm_c, norm_d, share, cosine = grad_split(
        torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])
    )
    assert (norm_c, norm_d, share, cosine) == pytest.approx((2.0, 1.0, 1 / 3, 1.0))

    _, _, _, share, cosine = grad_split(torch.tensor([3.0, 4.0]), torch.zeros(2))
    assert share == 0.0 and cosine is None
    assert grad_split(torch.zeros(2), torch.zeros(2))[3:] == (None, None)


def test_normalized_entropy_hand_cases():
    """log(2)/log(4) for two of four experts; 1 when balanced; 0 for one expert; None for none."""
    assert normalized_entropy(torch.tensor([2, 2, 0, 0])) == pytest.approx(0.5)
    assert normalized_entropy(torch.tensor([3, 3, 3, 3])) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([5, 0, 0, 0])) == pytest.approx(0.0)
    assert normalized_entropy(torch.zeros(4)) is None


def test_changed_rows_counts_tokens_not_pairs():
    """A token whose whole top-2 set moved counts once, like one with a single swap."""
    before = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    after = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert changed_rows(before, after) == 2


# RouterDiagnostics on real layers.
def test_split_matches_dense_minus_conventional_layer():
    """The dense part D equals the difference between a DenseMixer layer's router grad and a
    conventional layer's with the same weights and inputs; guards the hook-based split."""
    config = make_config()
    dense_layer = build_dense_layer(config, seed=0)
    conventional = build_dense_layer(
        dataclasses.replace(config, moe_dense_router_grad=False), seed=0
    )
    conventional.load_state_dict(dense_layer.state_dict())
    diagnostics = RouterDiagnostics(dense_layer, log_to_tracker=False)
    forward_backward(dense_layer)
    forward_backward(conventional)
    (stats,) = diagnostics.step()

    total = dense_layer.router.weight.grad.double()
    conv = conventional.router.weight.grad.double()
    dense = total - conv
    assert stats.grad_norm == pytest.approx(float(total.norm()), rel=1e-5)
    assert stats.conventional_grad_norm == pytest.approx(float(conv.norm()), rel=1e-4)
    assert stats.dense_grad_norm == pytest.approx(float(dense.norm()), rel=1e-4)
    cosine = float((conv.flatten() @ dense.flatten()) / (conv.norm() * dense.norm()))
    assert stats.cosine == pytest.approx(cosine, abs=1e-4)
    assert 0.0 < stats.dense_share < 1.0


def test_conventional_and_frozen_routers():
    """No dense part without the flag; no gradient fields at all for a frozen router."""
    config = make_config(moe_dense_router_grad=False)
    layer = build_dense_layer(config, seed=0)
    diagnostics = RouterDiagnostics(layer, log_to_tracker=False)
    forward_backward(layer)
    (stats,) = diagnostics.step()
    assert stats.grad_norm == pytest.approx(float(layer.router.weight.grad.norm()), rel=1e-5)
    assert stats.dense_grad_norm is None and stats.dense_share is None and stats.cosine is None

    frozen = build_dense_layer(make_config(), seed=0)
    frozen.router.weight.requires_grad_(False)
    diagnostics = RouterDiagnostics(frozen, log_to_tracker=False)
    forward_backward(frozen)
    (stats,) = diagnostics.step()
    assert stats.grad_norm is None and stats.dense_share is None
    assert stats.tokens == SEQ * BATCH


def test_load_and_flips():
    """Load = routed pairs per expert; flips: None first, 1.0 after permuting the router's
    rows (every top-2 set of 8 moves under a cyclic shift), 0.0 with unchanged weights."""
    layer = build_dense_layer(make_config(), seed=0)
    maps = []
    layer.router.register_forward_hook(lambda m, a, out: maps.append(out[1].clone()))
    diagnostics = RouterDiagnostics(layer, log_to_tracker=False)

    forward_backward(layer)
    (stats,) = diagnostics.step()
    counts = maps[-1].sum(0).double()
    assert stats.routing_flips is None
    assert stats.tokens == SEQ * BATCH
    assert stats.expert_load == pytest.approx((counts / counts.sum()).tolist())
    assert stats.load_entropy == pytest.approx(normalized_entropy(counts))

    with torch.no_grad():
        layer.router.weight.copy_(layer.router.weight.roll(1, dims=0))
    forward_backward(layer)
    assert diagnostics.step()[0].routing_flips == 1.0
    forward_backward(layer)
    assert diagnostics.step()[0].routing_flips == 0.0


def test_eval_and_no_grad_are_not_counted():
    """Evaluation forwards must not pollute the training step's stats."""
    layer = build_dense_layer(make_config(), seed=0)
    diagnostics = RouterDiagnostics(layer, log_to_tracker=False)
    with torch.no_grad():
        layer(torch.randn(SEQ, BATCH, HIDDEN))
    layer.eval()
    layer(torch.randn(SEQ, BATCH, HIDDEN))
    (stats,) = diagnostics.step()
    assert stats.tokens == 0 and stats.grad_norm is None and stats.load_entropy is None


def test_logs_to_megatron_tracker():
    """Scalars land in Megatron's layer-wise tracker at the layer's index, under our prefix."""
    layer = build_dense_layer(make_config(), seed=3)
    diagnostics = RouterDiagnostics(layer)
    try:
        forward_backward(layer)
        (stats,) = diagnostics.step()
        index = stats.layer_number - 1
        metrics = moe_metrics()
        for name in ("dense_share", "cosine", "load_entropy", "grad_norm"):
            values = metrics[TRACKER_PREFIX + name]
            assert values[index].item() == pytest.approx(getattr(stats, name), rel=1e-6)
        # routing_flips is None on the first step and is not logged then.
        assert TRACKER_PREFIX + "routing_flips" not in metrics
    finally:
        remove_moe_metrics(k for k in moe_metrics() if k.startswith(TRACKER_PREFIX))


def test_requires_moe_layers():
    """A model without MoE layers is a usage error, not a silent no-op."""
    with pytest.raises(ValueError, match="has no MoELayer"):
        RouterDiagnostics(torch.nn.Linear(2, 2))
