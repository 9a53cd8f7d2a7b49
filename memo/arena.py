"""The planned arena: serve a memory plan's offsets at run time (see NOTE [ Arena replay ] in
``csrc/arena.h``).

The planner gives every allocation of a layer's forward and backward an offset in one arena.
:class:`ArenaReplay` replays such a plan on CPU memory (requests in, addresses out, hits and
misses counted); it is how the replay logic is tested without a GPU. On a GPU the same C++
logic serves PyTorch's allocator through :func:`cuda_pluggable_allocator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memo import _ext
from memo.errors import MemoError

Slot = tuple[int, int]  # (offset, size) in bytes


@dataclass
class ArenaPlan:
    """``phases[p][k]`` is the (offset, size) of the k-th allocation request of phase p."""

    arena_bytes: int
    phases: list[list[Slot]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for p, phase in enumerate(self.phases):
            for k, (off, size) in enumerate(phase):
                if off < 0 or size < 0 or off + size > self.arena_bytes:
                    raise MemoError(f"memo.arena: phase {p} request {k} is planned at [{off}, {off + size}) outside "
                                    f"the {self.arena_bytes} B arena; re-plan, or give the arena the plan's peak bytes")


def _require_csrc():
    native = _ext.csrc()
    if native is None:
        raise MemoError("memo.arena: the planned arena needs memo._C (" + str(_ext.status().get("reason")) +
                        "); build it with `pip install --no-build-isolation -e .` and unset MEMO_DISABLE_CSRC")
    return native


class ArenaReplay:
    """A plan replayed over ``plan.arena_bytes`` of host memory; addresses are integers."""

    def __init__(self, plan: ArenaPlan) -> None:
        self.plan = plan
        self._impl = _require_csrc().ArenaReplay(plan.arena_bytes, [list(ph) for ph in plan.phases])
        self.base = self._impl.base

    def begin_phase(self, phase: int) -> None:
        try:
            self._impl.begin_phase(phase)
        except IndexError as e:
            raise MemoError(str(e)) from e

    def end_phase(self) -> None:
        self._impl.end_phase()

    def allocate(self, size: int) -> int:
        """Address of a block of ``size`` bytes: ``base + offset[k]`` on a hit, heap memory on a miss."""
        return self._impl.allocate(size)

    def free(self, address: int) -> None:
        self._impl.free(address)

    def owns(self, address: int) -> bool:
        return self._impl.owns(address)

    def stats(self) -> dict:
        """requests, hits, misses, conflicts (misses whose planned span was still live), bytes."""
        return self._impl.stats()


def cuda_pluggable_allocator(plan: ArenaPlan, device: int = 0):
    """Configure the device arena for ``plan`` and return the ``CUDAPluggableAllocator`` serving it.

    Use it inside ``torch.cuda.MemPool(allocator.allocator())`` around a layer, and call
    :func:`begin_phase` at the start of each planned phase. GPU only.
    """
    native = _require_csrc()
    if not _ext.cuda_part():
        raise MemoError("memo.arena: the CUDA arena needs the CUDA part of memo._C (" +
                        str(_ext.status().get("cuda_reason")) + "); rebuild with a CUDA torch and nvcc")
    import torch

    try:
        native.arena_configure(plan.arena_bytes, [list(ph) for ph in plan.phases], device)
    except RuntimeError as e:
        raise MemoError(str(e)) from e
    return torch.cuda.memory.CUDAPluggableAllocator(native.__file__, native.arena_alloc_symbol,
                                                    native.arena_free_symbol)


def begin_phase(phase: int) -> None:
    """Start phase ``phase`` of the device arena (see :func:`cuda_pluggable_allocator`)."""
    try:
        _require_csrc().arena_begin_phase(phase)
    except (RuntimeError, AttributeError) as e:
        raise MemoError(f"memo.arena: cannot begin phase {phase} ({e}); configure the device arena with "
                        "cuda_pluggable_allocator(plan) first") from e
