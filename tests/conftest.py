"""Test-wide set-up for running Megatron Core on CPU."""

import torch

# Megatron wraps its fused kernels (bias-dropout-add, activations) in torch.compile; on CPU
# compiling them costs tens of seconds per shape and tests nothing of ours: run them eagerly.
torch._dynamo.config.disable = True
