"""Doors into training frameworks: Megatron-LM, Megatron-Bridge, verl, NeMo-RL.

Each submodule is imported on its own and only where it is wanted. Nothing here patches a
framework at import time except ``megatron_densemixer.integrations.verl``, which verl imports
through ``actor_rollout_ref.model.external_lib`` precisely so that it patches.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Callable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# Set on every function this package installs in a framework, so patching twice is a no-op.
_PATCHED = "__densemixer__"


def is_patched(function: Any) -> bool:
    """Whether ``function`` is one of this package's wrappers."""
    return getattr(function, _PATCHED, False)


def mark_patched(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    """Installs ``wrapper`` as ``owner.name``, marked so that ``is_patched`` recognises it."""
    setattr(wrapper, _PATCHED, True)
    setattr(owner, name, wrapper)


def require_version(distribution: str, supported: str, tested: str) -> None:
    """Raises unless the installed ``distribution`` is a release this package supports.

    Args:
        distribution: The distribution's pip name, e.g. ``"verl"``.
        supported: The supported releases as a PEP 440 specifier, e.g. ``">=0.9,<0.10"``.
        tested: The releases the tests ran against, named in the message.

    Raises:
        ImportError: the installed version is outside ``supported`` (naming both), or the
            distribution is not installed.
    """
    installed = importlib.metadata.version(distribution)
    if Version(installed) not in SpecifierSet(supported):
        raise ImportError(
            f"megatron_densemixer supports {distribution} {supported} (tested: {tested}); "
            f"found {distribution} {installed}. Install a supported release, or call "
            "megatron_densemixer.densemixer_spec / densemixer_provider directly."
        )
