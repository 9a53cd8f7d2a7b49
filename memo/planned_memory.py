"""Planned memory at run time: a plan's Level-1 layer offsets serve the swapped layers' device
allocations, through memo's CUDA allocator (csrc/cuda/arena_alloc.cu, csrc/arena.h).

NOTE [ Planned memory at run time ]
  1. memo's allocator replaces PyTorch's CUDA caching allocator for the whole process
     (``torch.cuda.memory.change_current_allocator``), as the MEMO paper does. Not a
     ``torch.cuda.MemPool``: (a) behind a MemPool the caching allocator still sits in front and
     asks the pluggable allocator for *segments* (2 MiB for requests up to 1 MiB, 20 MiB up to
     10 MiB, then 2 MiB multiples), cached across steps, so the k-th request the arena sees is
     not the k-th tensor and the plan's per-tensor offsets cannot be honoured; (b)
     ``use_mem_pool`` routes only the calling thread, and CUDA backward runs on autograd's
     device threads (pytorch/pytorch#167353). Process-wide, every tensor request arrives with
     its own size and stream on any thread.
  2. The price: the allocator must be installed before the process's first CUDA allocation
     (PyTorch cannot swap allocators later). ``install()`` at program start does it; the
     first swapped forward refuses with that fix when it was not done (by then the model is
     on the GPU: too late to install). Requests
     outside the arena's phases (parameters, optimizer, embedding, head, kept layers) are
     served by ``cudaMallocAsync`` with a pool that keeps what it frees (PyTorch's own
     ``backend:cudaMallocAsync``). ``torch.cuda.memory_stats`` is unavailable under a
     pluggable allocator; ``memo.stats`` reports the arena and that pool's reserved/used bytes.
  3. Phases, one arena per device: phase 0 (the plan's layer forward) runs from the start of a
     swapped layer's forward to its return; phase 1 (backward) from the gradient of the layer's
     output (a tensor hook) to the gradient of its input, or to the end of the backward pass
     when the input needs no gradient. memo's restore of a layer (prefetch copies,
     recomputation) runs with the arena suspended (NOTE [ Arena replay ] rule 7). Which plan
     tensors are served: NOTE [ Planned allocations ] in memo/planner/planfile.py.
  4. CPU devices are refused: host tensors come from the C allocator, which memo cannot
     replace; the replay itself is tested on CPU through ``memo.arena.ArenaReplay``.
  5. Layer i's input is layer i-1's output, one tensor holding two hooks: layer i-1's "begin
     backward" (registered first) and layer i's "end backward". Tensor hooks run in the order
     they were registered, so the end comes second; it ends only the phase its own layer
     began (``LayerPhases``), never the one layer i-1 just began. The hooks run on autograd's
     thread for the device; the arena's phase state is per device and behind a mutex, and a
     forward and a backward of one model do not run at once.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from memo import _ext
from memo.arena import ArenaPlan
from memo.errors import MemoError

_installed = False


def _cuda_native():
    native = _ext.csrc()
    if native is None or not _ext.cuda_part():
        raise MemoError("memo.planned_memory: planned memory needs the CUDA part of memo._C (" +
                        str(_ext.status().get("cuda_reason") or _ext.status().get("reason")) +
                        "); rebuild with a CUDA torch and nvcc, or drop MemoConfig(planned_memory=True)")
    return native


def install() -> None:
    """Make memo's arena allocator PyTorch's CUDA allocator (rule 1). Call it before anything
    touches the GPU; memo.wrap calls it when that is still possible."""
    global _installed
    if _installed:
        return
    native = _cuda_native()
    if torch.cuda.is_initialized():
        raise MemoError("memo.planned_memory: CUDA is already initialized, and PyTorch cannot change its "
                        "allocator after that; call memo.planned_memory.install() at the start of the program, "
                        "before the model moves to the GPU (NOTE [ Planned memory at run time ] rule 2)")
    allocator = torch.cuda.memory.CUDAPluggableAllocator(native.__file__, native.arena_alloc_symbol,
                                                         native.arena_free_symbol)
    torch.cuda.memory.change_current_allocator(allocator)
    _installed = True


def check_device(device: torch.device) -> None:
    """Rule 4."""
    if device.type != "cuda":
        raise MemoError(f"memo.planned_memory: MemoConfig(planned_memory=True) plans device memory, but the layers "
                        f"run on {device}; run on a CUDA device, or drop planned_memory (host memory is not planned)")


class LayerPhases:
    """The phase boundaries of the swapped layers on one arena (rules 3 and 5). ``arena`` has
    ``begin_phase(p)``, ``end_phase()``, ``suspend()`` and ``resume()``: the device arena of
    :class:`PlannedMemory`, or the CPU replay ``memo.arena.ArenaReplay``."""

    FORWARD, BACKWARD = 0, 1

    def __init__(self, arena) -> None:
        self.arena = arena
        self._owner: Optional[object] = None   # the forward call whose backward phase is open

    @contextlib.contextmanager
    def forward(self, hidden_states: torch.Tensor):
        """Phase 0 around the layer's forward; yields a list the caller appends the output to,
        so the backward phase can start at its gradient."""
        outputs: list = []
        self.arena.begin_phase(self.FORWARD)
        try:
            yield outputs
        finally:
            self.arena.end_phase()
        out = outputs[0] if outputs else None
        out = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(out, torch.Tensor) and out.requires_grad:
            call = object()
            out.register_hook(functools.partial(self._begin_backward, call))
            if isinstance(hidden_states, torch.Tensor) and hidden_states.requires_grad:
                hidden_states.register_hook(functools.partial(self._end_backward, call))

    def _begin_backward(self, call: object, grad: torch.Tensor) -> None:
        self.arena.begin_phase(self.BACKWARD)
        self._owner = call
        # Rule 3: the phase ends with the backward pass at the latest (an input without gradient).
        torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._end_backward, call, None))

    def _end_backward(self, call: object, grad: Optional[torch.Tensor]) -> None:
        if self._owner is call:   # rule 5
            self._owner = None
            self.arena.end_phase()

    @contextlib.contextmanager
    def suspended(self):
        """memo's own off-plan allocations (restore, recompute): NOTE [ Arena replay ] rule 7."""
        self.arena.suspend()
        try:
            yield
        finally:
            self.arena.resume()


class _DeviceArena:
    """The CUDA arena of one device (csrc/cuda/arena_alloc.cu), as LayerPhases calls it."""

    def __init__(self, native, device: int) -> None:
        self.native, self.device = native, device

    def begin_phase(self, phase: int) -> None:
        self.native.arena_begin_phase(self.device, phase)

    def end_phase(self) -> None:
        self.native.arena_end_phase(self.device)

    def suspend(self) -> None:
        self.native.arena_suspend(self.device)

    def resume(self) -> None:
        self.native.arena_resume(self.device)


class PlannedMemory:
    """The arena of one device, and the phase boundaries of the swapped layers (rule 3)."""

    def __init__(self, plan: dict, device: torch.device) -> None:
        check_device(device)
        install()
        self.native = _cuda_native()
        self.device = device.index if device.index is not None else torch.cuda.current_device()
        self.arena = ArenaPlan.from_plan(plan)
        try:
            self.native.arena_configure(self.arena.arena_bytes, [list(ph) for ph in self.arena.phases],
                                        self.arena.alignment, self.device)
        except RuntimeError as e:
            raise MemoError(str(e)) from e
        self.phases = LayerPhases(_DeviceArena(self.native, self.device))

    def forward(self, hidden_states: torch.Tensor):
        """``LayerPhases.forward``: phase 0 around a swapped layer's forward."""
        return self.phases.forward(hidden_states)

    def suspended(self):
        """memo's own off-plan allocations (restore, recompute): NOTE [ Arena replay ] rule 7."""
        return self.phases.suspended()

    def stats(self) -> dict:
        """Arena counters (hits, misses, fallback bytes, arena size, ...) and the fallback pool's
        reserved/used bytes, now and at peak."""
        return dict(self.native.arena_stats(self.device))

    def close(self) -> None:
        """Free the arena; every tensor it served must be gone (its memory is returned to CUDA)."""
        live = self.stats().get("live_arena_blocks", 0)
        if live:
            raise MemoError(f"memo.planned_memory: {live} tensors still live in the arena of cuda:{self.device}; "
                            f"finish (or drop) the backward that holds them before closing planned memory")
        self.native.arena_release(self.device)


def off_plan(planned: Optional[PlannedMemory]):
    """``planned.suspended()``, or a null context when planned memory is off."""
    return contextlib.nullcontext() if planned is None else planned.suspended()


def planned_layer(runtime, hidden_states: torch.Tensor):
    """The forward phase of a swapped layer when ``runtime.config.planned_memory`` (the arena is
    made at the first one, on that layer's device), else a null context yielding a list."""
    if not getattr(runtime.config, "planned_memory", False):
        return contextlib.nullcontext([])
    if runtime.planned_memory is None:
        check_device(hidden_states.device)
        runtime.planned_memory = PlannedMemory(runtime.plan, hidden_states.device)
    return runtime.planned_memory.forward(hidden_states)
