"""Test-only CPU stand-ins for the CUDA stream API of Megatron's EP all-to-all overlap schedule.

With ``overlap_moe_expert_parallel_comm=True`` Megatron Core (0.16.1) runs each MoE layer as
schedule nodes (attention + route + preprocess | dispatch | experts | combine + postprocess)
on two CUDA streams, ordered by one CUDA event per model chunk, and interleaves one
micro-batch's forward with another's backward. The CUDA calls on that path are:

* ``torch.cuda.Stream(device="cuda")`` and ``torch.cuda.current_stream()`` -- the compute and
  communication streams (``pipeline_parallel.utils.set_streams``, the loss node in
  ``combined_1f1b``, the combine node in ``fine_grained_callables``);
* ``torch.cuda.stream(stream)`` -- the "run this on that stream" context of every node;
* ``torch.cuda.Event()`` with ``record(stream)`` / ``wait(stream)`` -- the per-chunk event
  that orders nodes across the two streams (``stream_acquire_context``, the chunk plan's
  ``record_current_stream`` / ``wait_current_stream``);
* ``Tensor.record_stream(stream)`` -- tells the caching allocator that a tensor freed on one
  stream is still used by another (node inputs freed after forward, grads, the residual);
* ``torch.cuda.nvtx.range_push`` / ``range_pop`` / ``range`` -- profiler annotations.

None of them exists on a CPU-only torch (streams and events raise, ``aten::record_stream``
has no CPU kernel, NVTX is a stub that raises). On one CPU device every operation runs
synchronously, in program order, so each CUDA guarantee already holds: a stream is just a
name, making a stream current changes nothing, an event is complete as soon as it is
recorded (``query`` is True, ``wait`` and ``synchronize`` have nothing to wait for), a
tensor's memory is never reused while queued work still reads it, and a profiler range marks
nothing. The stand-ins below implement exactly those semantics.

How they are applied (:func:`apply_cuda_stream_standins`, idempotent):

* the four Megatron modules of the schedule get a ``torch`` of their own (a thin proxy of the
  real module) whose ``cuda`` attribute answers ``Stream``, ``Event``, ``current_stream``,
  ``default_stream``, ``stream``, ``synchronize`` and ``nvtx`` with the stand-ins and
  everything else from the real ``torch.cuda``; ``torch.cuda`` itself is left untouched;
* ``aten::record_stream`` gets a no-op kernel for the CPU dispatch key (the only process-wide
  change, and only where torch had no kernel at all: calling it used to raise). Stand-in
  streams are real ``torch.Stream`` objects on the CPU device, which the op accepts.

Call it in test processes only, together with ``megatron_cpu.apply_cpu_shim``.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "CpuEvent",
    "SCHEDULE_MODULES",
    "apply_cuda_stream_standins",
    "cpu_stream",
]

# The modules of the EP overlap schedule that call torch.cuda's stream API.
SCHEDULE_MODULES = (
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.pipeline_parallel.combined_1f1b",
    "megatron.core.models.common.model_chunk_schedule_plan",
    "megatron.core.models.gpt.fine_grained_callables",
)

_APPLIED = False
# Keeps the CPU kernel of aten::record_stream registered for the life of the process.
_RECORD_STREAM_LIBRARY: Any = None


# --------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------
_DEFAULT_STREAM: torch.Stream | None = None


def cpu_stream(device: Any = None, priority: int = 0, **kwargs: Any) -> torch.Stream:
    """Stand-in for ``torch.cuda.Stream(device, priority)``: a new CPU ``torch.Stream``.

    A CUDA stream is a queue whose work runs in order; on the CPU all work runs at once, in
    program order, so any stream object will do. A real ``torch.Stream`` (device ``cpu``) is
    returned so that ``Tensor.record_stream`` accepts it; its own ``query`` (True),
    ``synchronize``, ``wait_stream`` are already the right no-ops for the CPU device.
    ``device``, ``priority`` and any other argument are ignored.
    """
    del device, priority, kwargs
    return torch.Stream(device="cpu")


def current_stream(device: Any = None) -> torch.Stream:
    """Stand-in for ``torch.cuda.current_stream`` / ``default_stream``: the one CPU stream.

    There is no current-stream state to switch on the CPU (see :func:`stream`), so the
    current stream is always the default one, the same object on every call.
    """
    del device
    global _DEFAULT_STREAM
    if _DEFAULT_STREAM is None:
        _DEFAULT_STREAM = torch.Stream(device="cpu")
    return _DEFAULT_STREAM


def stream(stream: Any = None) -> contextlib.AbstractContextManager:  # noqa: A001 - torch's name
    """Stand-in for the ``torch.cuda.stream(stream)`` context manager.

    On CUDA it routes the kernels launched inside to ``stream``; on the CPU nothing is
    queued, so it selects nothing (``torch.cuda.stream(None)`` is a no-op on CUDA too).
    """
    del stream
    return contextlib.nullcontext()


def synchronize(device: Any = None) -> None:
    """Stand-in for ``torch.cuda.synchronize``: no queued work exists to wait for."""
    del device


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------
class CpuEvent:
    """Stand-in for ``torch.cuda.Event``: a marker that completes as soon as it is recorded.

    A CUDA event captures the work queued on a stream when it is recorded; ``wait`` makes
    another stream's later work wait for it, ``synchronize`` blocks the host until it
    completes, ``query`` says whether it has. On the CPU the captured work has finished by
    the time ``record`` returns, so ``wait`` and ``synchronize`` have nothing to wait for and
    ``query`` is True. With ``enable_timing`` it keeps the host time of its last record, so
    ``elapsed_time`` works as documented (milliseconds between two recorded events).
    """

    def __init__(
        self,
        enable_timing: bool = False,
        blocking: bool = False,
        interprocess: bool = False,
        **kwargs: Any,
    ) -> None:
        del blocking, interprocess, kwargs
        self.enable_timing = enable_timing
        self._recorded_at: float | None = None

    def record(self, stream: Any = None) -> None:
        """Records the event (on ``stream`` or the current stream); done at once."""
        del stream
        self._recorded_at = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        """Makes ``stream``'s later work wait for this event: already complete."""
        del stream

    def query(self) -> bool:
        """Whether all work captured by the event has completed: always."""
        return True

    def synchronize(self) -> None:
        """Waits for the event to complete: already complete."""

    def elapsed_time(self, end_event: CpuEvent) -> float:
        """Milliseconds between this event's record and ``end_event``'s (both timed).

        Raises:
            RuntimeError: either event was not created with ``enable_timing=True`` or has not
                been recorded (as CUDA does).
        """
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return (end_event._recorded_at - self._recorded_at) * 1000.0


# --------------------------------------------------------------------------------------
# NVTX
# --------------------------------------------------------------------------------------
class _NvtxStandIn:
    """Stand-in for ``torch.cuda.nvtx``: profiler ranges that mark nothing.

    ``range_push`` / ``range_pop`` return the depth NVTX would (zero-based depth of the
    range pushed, depth of the range popped), ``range_start`` an id; ``range`` is the
    context-manager form.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._next_id = 0

    def range_push(self, msg: str) -> int:
        self._depth += 1
        return self._depth - 1

    def range_pop(self) -> int:
        if self._depth == 0:
            return -1  # NVTX's answer to a pop without a push
        self._depth -= 1
        return self._depth

    def range_start(self, msg: str) -> int:
        self._next_id += 1
        return self._next_id

    def range_end(self, range_id: int) -> None:
        del range_id

    def mark(self, msg: str) -> None:
        del msg

    @contextlib.contextmanager
    def range(self, msg: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        self.range_push(msg.format(*args, **kwargs) if args or kwargs else msg)
        try:
            yield
        finally:
            self.range_pop()


# --------------------------------------------------------------------------------------
# The torch the schedule modules see
# --------------------------------------------------------------------------------------
class _CudaStandIn(types.ModuleType):
    """``torch.cuda`` with the stream API above; every other name is the real one."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")
        self.Stream = cpu_stream
        self.Event = CpuEvent
        self.current_stream = current_stream
        self.default_stream = current_stream
        self.stream = stream
        self.synchronize = synchronize
        self.nvtx = _NvtxStandIn()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchStandIn(types.ModuleType):
    """``torch`` as the schedule modules see it: the real module but for ``torch.cuda``."""

    def __init__(self, inner: Any, cuda: _CudaStandIn) -> None:
        super().__init__("torch")
        # ``inner`` may itself be a proxy of torch (megatron_cpu.shim puts one in
        # pipeline_parallel.schedules); keep whatever it adds.
        self._inner = inner
        self.cuda = cuda

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _register_cpu_record_stream() -> None:
    """A no-op CPU kernel for ``aten::record_stream`` (none exists: the call raises).

    ``Tensor.record_stream(s)`` keeps the caching allocator from reusing the tensor's memory
    until the work queued on ``s`` at its deallocation has run. CPU memory is freed
    synchronously and no work is ever pending, so there is nothing to record.
    """
    global _RECORD_STREAM_LIBRARY
    if torch._C._dispatch_has_kernel_for_dispatch_key("aten::record_stream", "CPU"):
        return
    library = torch.library.Library("aten", "IMPL")
    library.impl("record_stream", lambda tensor, stream: None, "CPU")
    _RECORD_STREAM_LIBRARY = library


def apply_cuda_stream_standins() -> None:
    """Let Megatron's EP overlap schedule run on a CPU-only torch; safe to call many times.

    Gives each module of :data:`SCHEDULE_MODULES` a ``torch`` whose ``cuda`` stream API is
    the CPU stand-ins, and registers the CPU no-op ``aten::record_stream``. Test-only.
    """
    global _APPLIED
    if _APPLIED:
        return
    import importlib

    cuda = _CudaStandIn()
    for name in SCHEDULE_MODULES:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _TorchStandIn):
            module.torch = _TorchStandIn(module.torch, cuda)
    _register_cpu_record_stream()
    _APPLIED = True
