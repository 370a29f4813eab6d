"""Test-only: import Megatron-Bridge on a machine without Transformer Engine.

Megatron-Bridge imports ``transformer_engine.pytorch`` at module level in its PEFT code
(``megatron/bridge/peft/lora_layers.py``), and ``import megatron.bridge`` pulls that in, so
the package does not import at all without Transformer Engine, even though nothing on the CPU
paths tested here calls it. :func:`import_megatron_bridge` imports Bridge while a stub answers
``transformer_engine`` and its submodules: every attribute is a placeholder class, so
``isinstance(module, te.Linear)`` is False and annotations such as ``te.ops.Sequential``
evaluate; calling or instantiating one raises. The stub is removed from ``sys.modules`` again
right after Bridge's modules are imported, so a later ``import transformer_engine`` (from
megatron-core or anyone else) fails as it should on this machine.

megatron-core's own TE-dependent modules are imported before the stub goes in, so they keep
seeing Transformer Engine as absent. Never used by the package; never called for compute.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from typing import Any, Optional

STUB_ROOT = "transformer_engine"

# megatron-core modules (the wheel's ``megatron.training`` included) that test for Transformer
# Engine when first imported and that Bridge imports: imported first, without the stub, so they
# see TE as absent. Those absent from a megatron-core version are skipped.
# :func:`import_megatron_bridge` checks afterwards that no megatron module outside Bridge holds
# a stub object, so a module missing here fails loudly.
MCORE_TE_AWARE_MODULES = (
    "megatron.core.utils",
    "megatron.core.extensions.transformer_engine",
    "megatron.core.extensions.transformer_engine_spec_provider",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.gpt.experimental_attention_variant_module_specs",
    "megatron.core.models.hybrid.hybrid_layer_specs",
    "megatron.core.models.vision.clip_vit_model",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.transformer.moe.experts",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.training.utils.common_utils",
)

# Imported under the stub: the package root (which imports every model bridge) and the PEFT
# modules a LoRA/DoRA test needs.
BRIDGE_MODULES = (
    "megatron.bridge",
    "megatron.bridge.models.gpt_provider",
    "megatron.bridge.models.conversion.auto_bridge",
    "megatron.bridge.utils.instantiate_utils",
    "megatron.bridge.peft.lora",
)


class _PlaceholderMeta(type):
    """Metaclass of the placeholders: any attribute of a placeholder is another placeholder."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{cls.__qualname__} is a test stub of Transformer Engine (not installed here); "
            "this code path needs the real transformer_engine."
        )


def _placeholder(qualname: str) -> type:
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


class _StubModule(types.ModuleType):
    """A ``transformer_engine`` (sub)module whose every attribute is a placeholder."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []  # a package, so that ``transformer_engine.pytorch.x`` resolves
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname == STUB_ROOT or fullname.startswith(STUB_ROOT + "."):
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


@contextlib.contextmanager
def transformer_engine_stub() -> Iterator[None]:
    """Within the block, ``import transformer_engine[.x]`` yields the stub.

    Raises:
        RuntimeError: the real Transformer Engine is importable (no stub needed, and
            shadowing it would hide real behaviour).
    """
    if importlib.util.find_spec(STUB_ROOT) is not None:
        raise RuntimeError("transformer_engine is installed: do not stub it.")
    for name in MCORE_TE_AWARE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not name.startswith(error.name):
                raise
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == STUB_ROOT or n.startswith(STUB_ROOT + ".")]:
            del sys.modules[name]


def _holds_stub(module: types.ModuleType) -> bool:
    return any(
        isinstance(value, (_StubModule, _PlaceholderMeta)) for value in vars(module).values()
    )


def megatron_bridge_installed() -> bool:
    """Whether a Megatron-Bridge distribution is installed (without importing it)."""
    return importlib.util.find_spec("megatron.bridge") is not None


def import_megatron_bridge() -> types.ModuleType:
    """Imports Megatron-Bridge (and its PEFT modules) with the Transformer Engine stub.

    Returns:
        The ``megatron.bridge`` module.

    Raises:
        ImportError: Megatron-Bridge is not installed.
        RuntimeError: a megatron-core module was first imported under the stub (add it to
            ``MCORE_TE_AWARE_MODULES``).
    """
    if "megatron.bridge" not in sys.modules:
        if not megatron_bridge_installed():
            raise ImportError("Megatron-Bridge (megatron.bridge) is not installed")
        with transformer_engine_stub():
            before = set(sys.modules)
            for name in BRIDGE_MODULES:
                importlib.import_module(name)
            new = set(sys.modules) - before
        leaked = sorted(
            name
            for name in new
            if name.startswith("megatron.")
            and not name.startswith("megatron.bridge")
            and _holds_stub(sys.modules[name])
        )
        if leaked:
            raise RuntimeError(
                f"{leaked} imported the Transformer Engine stub; add them to "
                "MCORE_TE_AWARE_MODULES so that they are imported before it."
            )
    return sys.modules["megatron.bridge"]


__all__ = ["import_megatron_bridge", "megatron_bridge_installed", "transformer_engine_stub"]
