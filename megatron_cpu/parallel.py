"""Process groups and Megatron's parallel state on CPU (gloo).

:func:`init_model_parallel` is the one call a CPU process needs before it builds a Megatron
layer: it applies the CPU shim, creates a one-process gloo world if there is none, sets up
Megatron's parallel state and seeds Megatron's RNG tracker.
"""

from __future__ import annotations

import datetime
import os
import tempfile

import torch.distributed as dist

from megatron_cpu.shim import apply_cpu_shim

__all__ = ["destroy_model_parallel", "init_model_parallel", "init_process_group_single"]

_SINGLE_STORE_DIR: str | None = None


def init_process_group_single(timeout_s: float = 120.0) -> None:
    """Initialise a gloo world of size 1 (FileStore in a tmp dir) unless one exists."""
    global _SINGLE_STORE_DIR
    if dist.is_initialized():
        return
    _SINGLE_STORE_DIR = tempfile.mkdtemp(prefix="megatron_cpu_pg_")
    dist.init_process_group(
        backend="gloo",
        init_method=f"file://{os.path.join(_SINGLE_STORE_DIR, 'store')}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_model_parallel(
    tp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    pp: int = 1,
    seed: int | None = 1234,
    cp: int = 1,
    vpp: int | None = None,
) -> None:
    """Apply the shim and initialise Megatron's ``parallel_state``.

    ``torch.distributed`` should already be initialised (gloo); if it is not, a world of
    size 1 is created (:func:`init_process_group_single`). A previous Megatron parallel
    state with another layout is destroyed first; the same layout keeps its groups. ``etp``
    is ``expert_tensor_parallel_size`` (Megatron's default, ``None``, means "same as
    ``tp``"); ``cp`` the context-parallel size and ``vpp`` the virtual pipeline size (model
    chunks per pipeline rank, None for none). If ``seed`` is not None the RNG tracker is
    seeded via ``model_parallel_cuda_manual_seed(seed)`` -- Megatron's layers fork the
    tracker during weight init, so this is needed before building any layer.
    """
    apply_cpu_shim()
    if not dist.is_initialized():
        init_process_group_single()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    layout = (tp, ep, etp or tp, pp, cp, vpp)
    # Every new process group starts gloo threads that live as long as the process: re-use
    # the groups when the layout is unchanged (a process building many models would
    # otherwise accumulate thousands of threads).
    if _current_layout() != layout:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            context_parallel_size=cp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            # The default group backend is already gloo; extra gloo copies only cost time.
            create_gloo_process_groups=False,
        )
    if seed is not None:
        model_parallel_cuda_manual_seed(seed)


def _current_layout() -> tuple | None:
    """(tp, ep, etp, pp, cp, vpp) of Megatron's current parallel state, or None."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size(),
    )


def destroy_model_parallel() -> None:
    """Tear down Megatron's parallel state (leaves torch.distributed initialised)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
