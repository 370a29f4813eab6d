"""The CPU shim: runtime patches that let Megatron Core's MoE and GPTModel code run on CPU.

Megatron Core assumes CUDA (and usually NCCL + Transformer Engine) everywhere. This module
patches the few CUDA-only spots on the MoE / GPTModel forward and backward path so that the
*unmodified* Megatron code runs on CPU, in one process or in a few ``torch.distributed``
processes on the ``gloo`` backend. Nothing in site-packages is edited; every patch is applied
at runtime by :func:`apply_cpu_shim` and is idempotent.
:func:`install_grouped_gemm_fallback` adds an optional pure-torch ``grouped_gemm.ops.gmm`` so
that the legacy ``GroupedMLP`` can be built and run (it still requires bf16).

Known limitations (Megatron 0.16.1, CPU, no apex/TE): a GPTModel needs an explicit
``attention_mask``; the local spec's ``WrappedTorchNorm`` rejects ``sequence_parallel``, so
a whole GPTModel cannot use TP > 1 (a bare MoELayer can); ``GroupedMLP.forward`` asserts
bf16.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["apply_cpu_shim", "install_grouped_gemm_fallback"]

_SHIM_APPLIED = False
_CPU = torch.device("cpu")


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
