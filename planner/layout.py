"""Allocation timelines, their lower bound, and the validator every plan must pass. Torch-free.

An allocation lives in the half-open step interval ``[start, end)``; two allocations conflict
when their lifetimes overlap (``a.start < b.end and b.start < a.end``). A layout gives every
allocation a byte offset in one arena; it is valid when no two conflicting allocations overlap
in ``[offset, offset + bytes)``.

NOTE [ Plan lower bound ]
  1. The lower bound of a layout's peak is the largest total of simultaneously live bytes
     (a sweep over the steps). No layout can do better; a layout that reaches it is optimal.
  2. The gap reported with every plan is ``(peak - lower_bound) / lower_bound``.
  3. The MIP may prove a stronger bound than rule 1 (when no layout reaches it); it is
     reported separately as ``mip_bound_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional


class LayoutError(ValueError):
    """A layout that is not valid: the message names the two allocations that collide."""


@dataclass(frozen=True)
class Alloc:
    """One allocation: ``bytes`` in size, live during steps ``[start, end)``."""

    id: str
    bytes: int
    start: int
    end: int
    kind: str = "other"
    op: str = ""      # the op that made it ("carried": live when the block starts); see planfile.arena_phases

    def __post_init__(self) -> None:
        if self.bytes < 0:
            raise ValueError(f"memo.planner: allocation {self.id!r} has negative size {self.bytes}")
        if self.end <= self.start:
            raise ValueError(f"memo.planner: allocation {self.id!r} has an empty lifetime "
                             f"[{self.start}, {self.end}); its free step must come after its allocation step")

    def conflicts(self, other: "Alloc") -> bool:
        return self.start < other.end and other.start < self.end


def lower_bound(allocs: Iterable[Alloc]) -> int:
    """Largest total of simultaneously live bytes. See NOTE [ Plan lower bound ] rule 1."""
    events: dict[int, int] = {}
    for a in allocs:
        events[a.start] = events.get(a.start, 0) + a.bytes
        events[a.end] = events.get(a.end, 0) - a.bytes
    live = best = 0
    for step in sorted(events):
        live += events[step]
        best = max(best, live)
    return best


def live_bytes_over_time(allocs: Iterable[Alloc]) -> list[tuple[int, int]]:
    """``[(step, live bytes from this step on), ...]`` at every step where the total changes."""
    events: dict[int, int] = {}
    for a in allocs:
        events[a.start] = events.get(a.start, 0) + a.bytes
        events[a.end] = events.get(a.end, 0) - a.bytes
    out, live = [], 0
    for step in sorted(events):
        live += events[step]
        out.append((step, live))
    return out


def conflicting_pairs(allocs: list[Alloc]) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, of allocations whose lifetimes overlap (sweep by start)."""
    order = sorted(range(len(allocs)), key=lambda i: (allocs[i].start, i))
    active: list[int] = []
    pairs = []
    for i in order:
        a = allocs[i]
        active = [j for j in active if allocs[j].end > a.start]
        for j in active:
            pairs.append((min(i, j), max(i, j)))
        active.append(i)
    return pairs


def layout_peak(allocs: Iterable[Alloc], offsets: dict[str, int]) -> int:
    return max((offsets[a.id] + a.bytes for a in allocs), default=0)


def validate_layout(allocs: list[Alloc], offsets: dict[str, int], peak: Optional[int] = None) -> None:
    """Raise ``LayoutError`` unless every allocation has an offset >= 0, ends at or below
    ``peak`` (when given), and no two allocations with overlapping lifetimes overlap in memory."""
    ids = [a.id for a in allocs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise LayoutError(f"memo.planner: allocation ids are not unique: {dup[:5]}")
    for a in allocs:
        if a.id not in offsets:
            raise LayoutError(f"memo.planner: allocation {a.id!r} has no offset in the layout")
        off = offsets[a.id]
        if int(off) != off or off < 0:
            raise LayoutError(f"memo.planner: allocation {a.id!r} has offset {off}; offsets are integers >= 0")
        if peak is not None and off + a.bytes > peak:
            raise LayoutError(f"memo.planner: allocation {a.id!r} ends at {off + a.bytes} B, above the "
                              f"plan's peak {peak} B")
    for i, j in conflicting_pairs(allocs):
        a, b = allocs[i], allocs[j]
        if a.bytes == 0 or b.bytes == 0:
            continue
        oa, ob = offsets[a.id], offsets[b.id]
        if oa < ob + b.bytes and ob < oa + a.bytes:
            raise LayoutError(
                f"memo.planner: allocations {a.id!r} (bytes [{oa}, {oa + a.bytes}), steps [{a.start}, {a.end})) and "
                f"{b.id!r} (bytes [{ob}, {ob + b.bytes}), steps [{b.start}, {b.end})) are live at the same "
                f"time and overlap in memory")


@dataclass
class Layout:
    """A validated placement of ``allocs`` in one arena, with how it was found."""

    allocs: list[Alloc]
    offsets: dict[str, int]
    peak: int
    lower_bound: int
    method: str                     # "greedy", "mip" (improved on greedy) or "trivial"
    solve_s: float
    greedy_peak: int
    optimal: bool                   # proved: peak equals the lower bound or the MIP closed its gap
    mip_gap: Optional[float] = None  # the solver's own (objective - bound) / objective; None without a MIP
    mip_bound: Optional[int] = None  # bound proved by the MIP, bytes. See NOTE [ Plan lower bound ] rule 3
    status: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """(peak - lower bound) / lower bound. See NOTE [ Plan lower bound ] rule 2."""
        return 0.0 if self.lower_bound == 0 else (self.peak - self.lower_bound) / self.lower_bound

    def to_dict(self) -> dict:
        return {
            "peak_bytes": int(self.peak),
            "lower_bound_bytes": int(self.lower_bound),
            "gap": self.gap,
            "greedy_peak_bytes": int(self.greedy_peak),
            "mip_gap": self.mip_gap,
            "mip_bound_bytes": self.mip_bound,
            "method": self.method,
            "optimal": self.optimal,
            "status": self.status,
            "solve_s": self.solve_s,
            "tensors": [{"id": a.id, "bytes": int(a.bytes), "start": a.start, "end": a.end, "kind": a.kind,
                         "offset": int(self.offsets[a.id]), **({"op": a.op} if a.op else {})} for a in self.allocs],
        }
