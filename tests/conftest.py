"""Test-wide set-up for running Megatron Core on CPU.

Modules that build Megatron layers opt in to its parallel state with
``pytestmark = pytest.mark.usefixtures("model_parallel")``.
"""

import pytest
import torch

from megatron_cpu import init_model_parallel

# Megatron wraps its fused kernels (bias-dropout-add, activations) in torch.compile; on CPU
# compiling them costs tens of seconds per shape and tests nothing of ours: run them eagerly.
torch._dynamo.config.disable = True


@pytest.fixture(scope="module")
def model_parallel() -> None:
    """Megatron's parallel state for one CPU rank (TP = EP = 1), set up once per module.

    Layers, block specs (which ask the pipeline layout how many layers this rank builds) and
    Megatron's RNG tracker need it.
    """
    init_model_parallel(tp=1, ep=1)


@pytest.fixture
def fresh_model_parallel() -> None:
    """As ``model_parallel``, but set up anew for each test (re-seeding the RNG tracker)."""
    init_model_parallel(tp=1, ep=1)
