"""Fixtures for the framework tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# GPTModel writes the attention backend it was built with into these process-wide variables
# and asserts that later models agree; the framework tests build with the local backend (CPU),
# the rest of the suite with Megatron's default.
ATTENTION_BACKEND_ENV = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@pytest.fixture(autouse=True)
def restore_attention_backend_env() -> Iterator[None]:
    """Restores the NVTE_* attention variables after each test."""
    saved = {name: os.environ.get(name) for name in ATTENTION_BACKEND_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
