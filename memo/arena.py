"""The planned arena: serve a memory plan's offsets at run time (see NOTE [ Arena replay ] in
``csrc/arena.h``).

The planner gives every allocation of a layer's forward and backward an offset in one arena.
:class:`ArenaReplay` replays such a plan on CPU memory (requests in, addresses out, hits and
misses counted, CUDA streams stood in for by integers); it is how the replay logic is tested
without a GPU. On a GPU the same C++ logic is PyTorch's allocator: memo/planned_memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from memo import _ext
from memo.errors import MemoError

Slot = tuple[Optional[int], int]  # (offset, size) in bytes; offset None: unplanned (fallback)

DEFAULT_ALIGNMENT = 512   # PyTorch's CUDA allocator rounds every request up to 512 bytes


@dataclass
class ArenaPlan:
    """``phases[p][k]`` is the (offset, size) of the k-th allocation request of phase p; requests
    are rounded up to ``alignment`` bytes before they are matched (NOTE [ Arena replay ] rule 3)."""

    arena_bytes: int
    phases: list[list[Slot]] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT

    def __post_init__(self) -> None:
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise MemoError(f"memo.arena: alignment {self.alignment} is not a power of two; use "
                            f"{DEFAULT_ALIGNMENT} (PyTorch's rounding) or 1 (exact sizes)")
        for p, phase in enumerate(self.phases):
            for k, (off, size) in enumerate(phase):
                if size < 0 or (off is not None and (off < 0 or off + size > self.arena_bytes)):
                    raise MemoError(f"memo.arena: phase {p} request {k} is planned at [{off}, {(off or 0) + size}) "
                                    f"outside the {self.arena_bytes} B arena; re-plan, or give the arena the plan's "
                                    f"peak bytes")

    @classmethod
    def from_plan(cls, plan: dict) -> "ArenaPlan":
        """Phase 0: the layer's forward, phase 1: its backward (NOTE [ Planned allocations ] in
        memo/planner/planfile.py)."""
        from memo.planner.planfile import ARENA_ALIGNMENT, arena_phases
        arena_bytes, phases = arena_phases(plan)
        return cls(arena_bytes, phases, ARENA_ALIGNMENT)


def _require_csrc():
    native = _ext.csrc()
    if native is None:
        raise MemoError("memo.arena: the planned arena needs memo._C (" + str(_ext.status().get("reason")) +
                        "); build it with `pip install --no-build-isolation -e .` and unset MEMO_DISABLE_CSRC")
    return native


class ArenaReplay:
    """A plan replayed over ``plan.arena_bytes`` of host memory; addresses are integers.

    Streams are integers; an event recorded by a free on stream ``s`` completes when
    :meth:`complete` says stream ``s`` got that far (NOTE [ Stream-ordered arena frees ]).
    """

    def __init__(self, plan: ArenaPlan) -> None:
        self.plan = plan
        self._impl = _require_csrc().ArenaReplay(plan.arena_bytes, [list(ph) for ph in plan.phases], plan.alignment)
        self.base = self._impl.base

    def begin_phase(self, phase: int) -> None:
        try:
            self._impl.begin_phase(phase)
        except IndexError as e:
            raise MemoError(str(e)) from e

    def end_phase(self) -> None:
        self._impl.end_phase()

    def suspend(self) -> None:
        """Requests go to the fallback without taking an index until :meth:`resume` (rule 7)."""
        self._impl.suspend()

    def resume(self) -> None:
        self._impl.resume()

    def allocate(self, size: int, stream: int = 0) -> int:
        """Address of a block of ``size`` bytes: ``base + offset[k]`` on a hit, heap memory otherwise."""
        return self._impl.allocate(size, stream)

    def free(self, address: int, stream: int = 0) -> None:
        self._impl.free(address, stream)

    def owns(self, address: int) -> bool:
        return self._impl.owns(address)

    def complete(self, stream: int) -> None:
        """Every event recorded on ``stream`` so far has completed (the stream stand-in's clock)."""
        self._impl.complete(stream)

    def waits(self) -> list[tuple[int, int, int]]:
        """``(waiting stream, freeing stream, event number)`` for every device-side wait issued."""
        return self._impl.waits()

    @property
    def pending_frees(self) -> int:
        return self._impl.pending_frees

    def stats(self) -> dict:
        """requests, hits, misses, conflicts, unplanned, outside, bytes, stream_waits, live blocks."""
        return self._impl.stats()


def replay_requests(arena: "ArenaReplay", events: list[tuple]) -> dict:
    """Run recorded allocator events against ``arena``: ``("alloc", id, size)`` / ``("free", id)``,
    optionally with a stream as a last element. Returns the arena's stats."""
    addr = {}
    for ev in events:
        if ev[0] == "alloc":
            addr[ev[1]] = arena.allocate(ev[2], *ev[3:])
        elif ev[1] in addr:
            arena.free(addr.pop(ev[1]), *ev[2:])
    for a in addr.values():
        arena.free(a)
    return arena.stats()
