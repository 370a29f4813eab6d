"""The experts' scores G = <g, E_e(x)> against explicit float64 loops, and expert weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_densemixer.experts import expert_output_scores, local_expert_weights
from tests.support.builders import loop_scores, make_expert_weights

T, H, FFN, E = 11, 8, 6, 4


def make_experts(glu: bool, bias: bool, dtype=torch.float64, seed: int = 0):
    return make_expert_weights(E, H, FFN, glu, bias, dtype, seed)


CASES = {
    "swiglu": dict(glu=True, bias=False, act=F.silu),
    "swiglu_bias": dict(glu=True, bias=True, act=F.silu),
    "gelu_bias": dict(glu=False, bias=True, act=F.gelu),
    "squared_relu": dict(glu=False, bias=False, act=lambda v: F.relu(v) ** 2),
    "glu_offset_clamp": dict(glu=True, bias=True, act=F.silu, offset=1.0, clamp=0.7),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_expert_output_scores(case, chunk_size):
    """G = <g, E_e(x)> for gated/non-gated units, biases, GLU offset and clamp, any chunking.

    float64 throughout, so the only error is summation order: 1e-12.
    """
    spec = CASES[case]
    experts = make_experts(spec["glu"], spec["bias"])
    config = SimpleNamespace(
        gated_linear_unit=spec["glu"],
        activation_func=spec["act"],
        glu_linear_offset=spec.get("offset", 0.0),
        activation_func_clamp_value=spec.get("clamp"),
    )
    x = torch.randn(T, H, dtype=torch.float64)
    g = torch.randn(T, H, dtype=torch.float64)
    got = expert_output_scores(x, g, experts, config, chunk_size)
    expected = loop_scores(
        x, g, experts, spec["act"], spec["glu"], spec.get("offset", 0.0), spec.get("clamp")
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-12, atol=1e-12)


def test_fc2_bias_added_once():
    """Under expert TP only one rank adds <g, b2>: add_fc2_bias=False drops exactly that."""
    experts = make_experts(glu=True, bias=True)
    config = SimpleNamespace(gated_linear_unit=True, activation_func=F.silu)
    x, g = torch.randn(T, H, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64)
    with_bias = expert_output_scores(x, g, experts, config, 4)
    without = expert_output_scores(x, g, experts, config, 4, add_fc2_bias=False)
    bias_term = torch.stack([g @ w.fc2_bias for w in experts], dim=1)
    torch.testing.assert_close(with_bias.double() - without.double(), bias_term)


def test_raises_for_unsupported_expert_module():
    """A layer whose experts are not SequentialMLP/GroupedMLP/TEGroupedMLP is refused."""

    class CustomExperts(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="does not support expert module CustomExperts"):
        local_expert_weights(CustomExperts())
