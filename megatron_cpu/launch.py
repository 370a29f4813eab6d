"""Multi-process runs: ``fn(rank, world_size, *args)`` in a fresh gloo world of processes."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["cached_world_runs", "run_distributed"]

# Modules imported in the fork server once, so that each child of ``run_distributed``
# does not pay the ~6-9 s import of torch + megatron.core again.
_FORKSERVER_PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.models.gpt.moe_module_specs",
    "megatron.core.models.gpt.gpt_model",
]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    store_path: str,
    timeout_s: float,
    args: tuple[Any, ...],
) -> None:
    # One intra-op thread per rank: the suite runs on 2 cores with several ranks.
    torch.set_num_threads(1)
    dist.init_process_group(
        backend="gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        # An exception escaping here is formatted (with traceback) by
        # torch.multiprocessing in the child and re-raised in the parent.
        fn(rank, world_size, *args)
    finally:
        with contextlib.suppress(Exception):
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def cached_world_runs(
    run_world: Callable[[int, int, list[str], str], None],
    case_worlds: Mapping[str, int],
    make_dir: Callable[[], str],
) -> Callable[[int], dict]:
    """``get(world)``: runs ``run_world(rank, world, names, path)`` in a gloo world of that
    size once, for every case name of that size, and returns the JSON it wrote to ``path``.

    One spawned world per size, not per case: process start-up dominates these tests.
    """
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            names = [name for name, size in case_worlds.items() if size == world]
            path = os.path.join(make_dir(), f"world{world}.json")
            run_distributed(run_world, world, names, path)
            with open(path) as f:
                cache[world] = json.load(f)
        return cache[world]

    return get


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    start_method: str = "forkserver",
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh gloo processes.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function of an importable
    module).  Each child gets ``torch.distributed`` initialised (gloo, FileStore in a
    fresh tmp dir, ``timeout_s`` collective timeout) and ``torch.set_num_threads(1)``;
    Megatron parallel state is *not* initialised -- call :func:`init_model_parallel` in
    ``fn``.  If any child fails, the others are terminated and a ``RuntimeError`` carrying
    the child's traceback is raised here.  Return values of ``fn`` are discarded.

    ``start_method="forkserver"`` (default) imports torch + megatron.core once in a fork
    server (reused by later calls in the same parent process) instead of once per child
    as with ``"spawn"``; children are still fresh processes, not forks of the parent.
    """
    import torch.multiprocessing as tmp

    if start_method == "forkserver":
        import multiprocessing

        # Only has an effect before the fork server starts (first call); failures to
        # import a preload module are ignored by multiprocessing.
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            [*_FORKSERVER_PRELOAD, "megatron_cpu"]
        )

    store_dir = tempfile.mkdtemp(prefix="megatron_cpu_dist_")
    try:
        ctx = tmp.start_processes(
            _worker,
            args=(fn, world_size, os.path.join(store_dir, "store"), timeout_s, args),
            nprocs=world_size,
            join=False,
            start_method=start_method,
        )
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s + 30)
        try:
            while not ctx.join(timeout=1.0):
                if datetime.datetime.now() > deadline:
                    raise TimeoutError(f"run_distributed: {fn!r} exceeded {timeout_s} s")
        except tmp.ProcessRaisedException as exc:
            raise RuntimeError(f"distributed run of {fn!r} failed:\n{exc}") from None
        except tmp.ProcessExitedException as exc:
            raise RuntimeError(f"distributed run of {fn!r} failed: {exc}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(timeout=10)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
