"""Test-only shim that lets Megatron Core 0.16.1 MoE layers run on CPU.

Megatron Core assumes CUDA (and usually NCCL + Transformer Engine) everywhere.  The
tests of this repository run on CPU-only machines, in one process or in a handful of
``torch.distributed`` processes on the ``gloo`` backend.  This module monkeypatches the
few CUDA-only spots that sit on the MoE / GPTModel forward+backward path so that the
*unmodified* Megatron code can run there.  Nothing in site-packages is edited; every
patch is applied at runtime by :func:`apply_cpu_shim` and is idempotent.

Public API
----------
* :func:`apply_cpu_shim` -- apply all patches (idempotent).
* :func:`init_process_group_single` -- a world of size 1 on gloo (FileStore in a tmp dir).
* :func:`init_model_parallel` / :func:`destroy_model_parallel` -- Megatron parallel state.
* :func:`run_distributed` -- run ``fn(rank, world_size, *args)`` in ``world_size`` gloo
  processes and re-raise child failures (with the child traceback) in the parent.
* :func:`build_moe_layer` -- build a Megatron ``MoELayer`` from the local (non-TE) spec.
* :func:`shard_moe_state_dict` -- slice a single-rank MoE state dict for one EP/ETP/TP rank.
* :func:`install_grouped_gemm_fallback` -- optional pure-torch ``grouped_gemm.ops.gmm``
  so the legacy ``GroupedMLP`` can be constructed and run (it still requires bf16).

Known limitations (Megatron 0.16.1, CPU, no apex/TE): a GPTModel needs an explicit
``attention_mask``; the local spec's ``WrappedTorchNorm`` rejects ``sequence_parallel``, so
a whole GPTModel cannot use TP > 1 (a bare MoELayer can); ``GroupedMLP.forward`` asserts
bf16.

Only ``torch``, ``megatron.core``, the standard library and ``megatron_densemixer.compat``
(which knows both MoE spec forms) are imported.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "apply_cpu_shim",
    "build_moe_layer",
    "destroy_model_parallel",
    "init_model_parallel",
    "init_process_group_single",
    "install_grouped_gemm_fallback",
    "run_distributed",
    "shard_moe_state_dict",
]

_SHIM_APPLIED = False
_CPU = torch.device("cpu")

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


# --------------------------------------------------------------------------------------
# The shim
# --------------------------------------------------------------------------------------
def _cpu_current_device() -> torch.device:
    """Stand-in for ``torch.cuda.current_device`` that names the CPU."""
    return _CPU


def _to_int_list(sizes: Any) -> list[int] | None:
    """Convert split sizes (tensor / numpy array / sequence) to a list of Python ints."""
    if sizes is None:
        return None
    if isinstance(sizes, torch.Tensor):
        return [int(s) for s in sizes.tolist()]
    return [int(s) for s in sizes]


def _patch_cuda_device() -> None:
    # Megatron allocates almost everything with ``device=torch.cuda.current_device()``
    # (router weight + buffers, tensor-parallel gather/scatter outputs, the global memory
    # buffer, weights when ``use_cpu_initialization=False``, ...).  On a CPU-only build
    # that call raises "Torch not compiled with CUDA enabled".  Returning the CPU device
    # makes all of those allocations land on the CPU.  This is process-global; the shim is
    # for CPU-only test processes.
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]


def _patch_moe_utils() -> None:
    from megatron.core.transformer.moe import moe_utils

    # Without Transformer Engine the ``from ...transformer_engine import te_general_gemm``
    # in moe_utils fails, so the name is never bound -- yet
    # ``RouterGatingLinearFunction`` (the router's gating GEMM, on every forward and
    # backward) tests ``te_general_gemm is not None`` and would raise NameError.  The other
    # TE fused ops from that import are guarded by ``HAVE_TE`` and are left alone.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # type: ignore[attr-defined]


def _patch_alltoall_dispatcher() -> None:
    from megatron.core.transformer.moe import token_dispatcher as td

    cls = td.MoEAlltoAllTokenDispatcher
    # The constructor creates a process-wide ``torch.cuda.Stream()`` (used for the async
    # device-to-host copy of the split sizes) unless one already exists; CPU torch
    # cannot create streams.  A placeholder object keeps the constructor from trying.
    if cls.cuda_dtoh_stream is None:
        cls.cuda_dtoh_stream = object()

    def _maybe_dtoh_and_synchronize(
        self: Any, point: str, tokens_per_expert: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        # CPU replacement for the CUDA stream/event based version.  On GPU the split sizes
        # are copied to host *numpy arrays* at ``cuda_dtoh_point`` (``maybe_move_tensor_to_cpu``
        # is a no-op for tensors already on the CPU, so on CPU they would stay tensors, and
        # ``all_to_all_single`` rejects tensor split sizes).  Mirror the GPU result: numpy
        # splits, no stream / event / synchronize (everything is already synchronous).
        if not self.drop_and_pad and point == self.cuda_dtoh_point:

            def _np(t: Any) -> Any:
                return t.numpy() if isinstance(t, torch.Tensor) else t

            self.input_splits = _np(self.input_splits)
            self.output_splits = _np(self.output_splits)
            self.output_splits_tp = _np(self.output_splits_tp)
        return tokens_per_expert

    cls._maybe_dtoh_and_synchronize = _maybe_dtoh_and_synchronize


def _patch_mappings() -> None:
    from megatron.core.tensor_parallel import mappings

    # (1) gloo's ``all_to_all_single`` only accepts split sizes as int sequences (numpy or
    # list); it rejects tensors.  Normalise to lists before the real forward runs.  The
    # backward re-enters ``_AllToAll.apply`` and therefore also goes through this.
    orig_a2a_forward = mappings._AllToAll.forward
    if not getattr(orig_a2a_forward, "_cpu_shim", False):

        def _a2a_forward(
            ctx: Any,
            group: Any,
            input: torch.Tensor,  # noqa: A002 - mirrors Megatron's signature
            output_split_sizes: Any,
            input_split_sizes: Any,
            *args: Any,
        ) -> torch.Tensor:
            # *args: later versions add use_nccl_stream, passed on unchanged.
            return orig_a2a_forward(
                ctx,
                group,
                input,
                _to_int_list(output_split_sizes),
                _to_int_list(input_split_sizes),
                *args,
            )

        _a2a_forward._cpu_shim = True  # type: ignore[attr-defined]
        mappings._AllToAll.forward = staticmethod(_a2a_forward)

    # (2) gloo has no uneven all_gather ("ProcessGroupGloo::allgather: invalid tensor size").
    # The alltoall dispatcher with TP>1 (or ETP>1) x EP>1 gathers a different number of
    # tokens from every TP rank via ``gather_from_sequence_parallel_region(...,
    # output_split_sizes=...)`` -> ``_gather_along_first_dim``.  Replace that module-level
    # function (looked up at call time by the autograd Functions) with pad -> gather -> trim.
    orig_gather = mappings._gather_along_first_dim
    if not getattr(orig_gather, "_cpu_shim", False):

        def _gather_along_first_dim(
            input_: torch.Tensor,
            group: Any,
            output_split_sizes: Any = None,
            use_global_buffer: bool = False,
        ) -> torch.Tensor:
            if output_split_sizes is None or group.size() == 1:
                return orig_gather(input_, group, output_split_sizes, use_global_buffer)
            sizes = _to_int_list(output_split_sizes)
            assert sizes is not None
            max_size = max(sizes)
            padded = input_.new_zeros((max_size, *input_.shape[1:]))
            padded[: input_.shape[0]] = input_
            chunks = [torch.empty_like(padded) for _ in sizes]
            dist.all_gather(chunks, padded.contiguous(), group=group)
            return torch.cat([c[:n] for c, n in zip(chunks, sizes, strict=True)], dim=0)

        _gather_along_first_dim._cpu_shim = True  # type: ignore[attr-defined]
        mappings._gather_along_first_dim = _gather_along_first_dim


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # Megatron keeps named *CUDA* RNG states (data-parallel / model-parallel /
    # expert-parallel) and swaps them in with ``get_cuda_rng_tracker().fork(name)`` around
    # weight init of TP/expert weights and around dropout in TP regions.  ``add`` and
    # ``fork`` call torch.cuda.get_rng_state / set_rng_state, which fail on CPU torch.
    # Back the tracker by the *CPU* default generator instead: ``add`` stores a CPU
    # generator state seeded with ``seed``; ``fork`` swaps it into the CPU default
    # generator and restores the previous state on exit.  Semantics match the GPU tracker
    # (per-TP/EP-rank streams, default stream untouched by work inside ``fork``).
    tracker_cls = mrandom.CudaRNGStatesTracker
    if getattr(tracker_cls.fork, "_cpu_shim", False):
        return

    def add(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self: Any, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name

    fork._cpu_shim = True  # type: ignore[attr-defined]
    tracker_cls.add = add
    tracker_cls.fork = fork

    # Activation recompute (``CheckpointFunction``) and ``get_all_rng_states`` save and
    # restore "the CUDA RNG state" through these two module functions.  There is no CUDA
    # generator on CPU; make them no-ops that carry a dummy state (the CPU state is saved
    # and restored separately by the same callers).
    def _get_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def _set_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
        return None

    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state


class _TorchWithCpuForCuda(types.ModuleType):
    """``torch`` as Megatron's pipeline schedules see it: ``device="cuda"`` means the CPU.

    Each ``forward_backward_*`` function counts tokens in
    ``torch.zeros([], dtype=torch.int, device="cuda")``; everything else is plain torch.
    """

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("device") == "cuda":
            kwargs["device"] = _CPU
        return torch.zeros(*args, **kwargs)


def _patch_pipeline_schedules() -> None:
    from megatron.core.pipeline_parallel import schedules

    # The schedules' token counter is made on "cuda" (see _TorchWithCpuForCuda); the p2p
    # layer calls torch.cuda.synchronize() after batched send/recv, a no-op need on CPU.
    if not isinstance(schedules.torch, _TorchWithCpuForCuda):
        schedules.torch = _TorchWithCpuForCuda()
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]


def apply_cpu_shim() -> None:
    """Apply every CPU patch to Megatron Core / torch.cuda; safe to call many times.

    Must run before Megatron MoE modules are *constructed* (imports may happen earlier).
    """
    global _SHIM_APPLIED
    if _SHIM_APPLIED:
        return
    _patch_cuda_device()
    _patch_moe_utils()
    _patch_alltoall_dispatcher()
    _patch_mappings()
    _patch_rng()
    _patch_pipeline_schedules()
    _SHIM_APPLIED = True


# --------------------------------------------------------------------------------------
# Optional: grouped GEMM fallback for the legacy GroupedMLP
# --------------------------------------------------------------------------------------
def _torch_gmm(
    a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False
) -> torch.Tensor:
    """Pure-torch ``grouped_gemm.ops.gmm``: rows of ``a`` grouped by ``batch_sizes``
    are multiplied by ``b[i]`` (``[num_groups, k, n]``, or ``[num_groups, n, k]`` if
    ``trans_b``).  Differentiable through autograd."""
    outs = []
    for i, chunk in enumerate(torch.split(a, _to_int_list(batch_sizes) or [], dim=0)):
        w = b[i].t() if trans_b else b[i]
        outs.append(chunk @ w)
    if not outs:
        return a.new_zeros((0, b.shape[1] if trans_b else b.shape[2]))
    return torch.cat(outs, dim=0)


def install_grouped_gemm_fallback() -> None:
    """Let the legacy ``GroupedMLP`` run without the ``grouped_gemm`` CUDA package.

    ``GroupedMLP`` asserts that ``grouped_gemm`` is importable and calls
    ``grouped_gemm_util.ops.gmm``.  This installs a pure-torch ``gmm``.  Note that
    ``GroupedMLP.forward`` additionally asserts ``config.bf16``.
    """
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    if gg.grouped_gemm is None:
        gg.grouped_gemm = types.SimpleNamespace(ops=types.SimpleNamespace(gmm=_torch_gmm))
        gg.ops = gg.grouped_gemm.ops


# --------------------------------------------------------------------------------------
# Process groups and Megatron parallel state
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Multi-process runner
# --------------------------------------------------------------------------------------
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
            [*_FORKSERVER_PRELOAD, __name__]
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


# --------------------------------------------------------------------------------------
# MoE layer construction and weight sharding
# --------------------------------------------------------------------------------------
def build_moe_layer(
    config: Any,
    spec_kind: str = "sequential",
    *,
    spec: Any = None,
    layer_cls: type | None = None,
    layer_number: int = 1,
    pg_collection: Any = None,
) -> Any:
    """Build a Megatron ``MoELayer`` (or ``layer_cls``) on CPU from the local spec.

    ``config`` is a ``TransformerConfig`` with ``num_moe_experts`` set.  ``spec_kind`` is
    ``"sequential"`` (``SequentialMLP`` experts) or ``"grouped"`` (legacy ``GroupedMLP``;
    needs ``grouped_gemm`` or :func:`install_grouped_gemm_fallback`, and bf16).  ``spec``
    (an MoE spec in either form: ``ModuleSpec`` up to 0.17, ``functools.partial`` builder
    from 0.18) overrides the spec entirely; ``layer_cls`` swaps the module class of the spec
    (e.g. a MoELayer subclass) while keeping its submodules.  Parallel state must be
    initialised (:func:`init_model_parallel`).
    """
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_densemixer import compat

    apply_cpu_shim()
    if spec_kind not in ("sequential", "grouped"):
        raise ValueError(f"spec_kind must be 'sequential' or 'grouped', not {spec_kind!r}")
    if spec is None:
        spec = get_moe_module_spec(
            use_te=False,
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=spec_kind == "grouped",
        )
    if layer_cls is not None:
        parts = compat.moe_spec_parts(spec)
        if parts is None:
            raise ValueError(f"layer_cls needs an MoE spec, got {spec!r}")
        spec = compat.replace_moe_spec(spec, layer_cls, parts[1])
    kwargs: dict[str, Any] = {"config": config, "layer_number": layer_number}
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    if isinstance(spec, ModuleSpec):
        return build_module(spec, **kwargs)
    # From 0.18 the spec is a builder (functools.partial) that TransformerLayer calls
    # directly; 0.19's build_module no longer accepts one.
    return spec(**kwargs)


_SEQ_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*?)experts\.local_experts\.(?P<idx>\d+)\.(?P<lin>linear_fc[12])\.(?P<kind>weight|bias|_extra_state)$"
)
_GROUPED_EXPERT_RE = re.compile(r"^(?P<prefix>.*?)experts\.(?P<w>weight[12])$")
_SHARED_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*?)shared_experts\.(?P<lin>linear_fc[12])\.(?P<kind>weight|bias|_extra_state)$"
)


def _shard_fc1_rows(t: torch.Tensor, rank: int, size: int, gated: bool) -> torch.Tensor:
    """Column-parallel shard of fc1 (output dim 0).  With a gated linear unit fc1 is
    ``[gate; up]`` and every rank holds ``[gate_shard; up_shard]``."""
    if size == 1:
        return t
    if gated:
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]], 0)
    return torch.chunk(t, size, dim=0)[rank]


def _shard_mlp_param(value: Any, match: re.Match, rank: int, size: int, gated: bool) -> Any:
    """One MLP parameter's tensor-parallel shard: fc1 by rows, fc2's weight by columns;
    fc2's bias and TE's ``_extra_state`` are replicated."""
    if match["kind"] == "_extra_state":
        return value
    if match["lin"] == "linear_fc1":
        return _shard_fc1_rows(value, rank, size, gated)
    if match["kind"] == "weight":
        return torch.chunk(value, size, dim=1)[rank]
    return value


def shard_moe_state_dict(
    full_state_dict: Mapping[str, torch.Tensor],
    *,
    num_experts: int,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
    tp_size: int = 1,
    tp_rank: int = 0,
    gated_linear_unit: bool = False,
) -> dict[str, torch.Tensor]:
    """Slice the state dict of a single-rank MoE layer for one (EP, ETP, TP) rank.

    Works on ``MoELayer.state_dict()`` keys with any prefix (e.g. inside a GPTModel):

    * ``...experts.local_experts.{e}.linear_fc{1,2}.{weight,bias}`` (``SequentialMLP``):
      experts are split contiguously over EP ranks (expert ``e`` lives on EP rank
      ``e // (num_experts // ep_size)`` under local index ``e % num_local``); fc1 is
      column-parallel (rows split over ETP, GLU-aware), fc2 row-parallel (columns split
      over ETP; its bias is replicated).
    * ``...experts.weight1`` ``[hidden, E * ffn(*2)]`` / ``...experts.weight2``
      ``[E * ffn, hidden]`` (legacy ``GroupedMLP``): only ``etp_size == 1`` is handled.
    * ``...shared_experts.linear_fc{1,2}.*``: split over the dense ``tp_size`` like an MLP.
    * Everything else (router weight / bias / buffers, ``_extra_state`` entries, ...) is
      copied unchanged.

    Also usable on gradients (pass a dict of full-layer ``param.grad``) to get the
    expected local gradients of expert weights.
    """
    num_local = num_experts // ep_size
    lo, hi = ep_rank * num_local, (ep_rank + 1) * num_local
    out: dict[str, torch.Tensor] = {}
    for key, value in full_state_dict.items():
        m = _SEQ_EXPERT_RE.match(key)
        if m:
            e = int(m["idx"])
            if not lo <= e < hi:
                continue
            new_key = f"{m['prefix']}experts.local_experts.{e - lo}.{m['lin']}.{m['kind']}"
            value = _shard_mlp_param(value, m, etp_rank, etp_size, gated_linear_unit)
            out[new_key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        m = _GROUPED_EXPERT_RE.match(key)
        if m:
            if etp_size != 1:
                raise NotImplementedError("GroupedMLP sharding with etp_size > 1")
            # GroupedMLP.forward reads expert e's weights as ``weight1.view(E, hidden, -1)[e]``
            # and ``weight2.view(E, -1, hidden)[e]``: raw contiguous memory chunks (for
            # weight1 that is *not* a column block of the [hidden, E * ffn] matrix).
            hidden = value.shape[0] if m["w"] == "weight1" else value.shape[1]
            chunks = value.reshape(num_experts, -1)[lo:hi]
            out[key] = (
                chunks.reshape(-1, hidden) if m["w"] == "weight2" else chunks.reshape(hidden, -1)
            )
            out[key] = out[key].clone()
            continue
        m = _SHARED_EXPERT_RE.match(key)
        if m:
            value = _shard_mlp_param(value, m, tp_rank, tp_size, gated_linear_unit)
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out
