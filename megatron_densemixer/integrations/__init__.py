"""Doors into training frameworks: Megatron-LM, Megatron-Bridge, verl, NeMo-RL.

Each submodule is imported on its own and only where it is wanted. Nothing here patches a
framework at import time except ``megatron_densemixer.integrations.verl``, which verl imports
through ``actor_rollout_ref.model.external_lib`` precisely so that it patches.
"""

from __future__ import annotations

from typing import Any, Callable

# Set on every function this package installs in a framework, so patching twice is a no-op.
_PATCHED = "__densemixer__"


def is_patched(function: Any) -> bool:
    """Whether ``function`` is one of this package's wrappers."""
    return getattr(function, _PATCHED, False)


def mark_patched(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    """Installs ``wrapper`` as ``owner.name``, marked so that ``is_patched`` recognises it."""
    setattr(wrapper, _PATCHED, True)
    setattr(owner, name, wrapper)
