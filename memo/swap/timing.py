"""Step timing from marks on the streams that did the work.

# NOTE [ Step timing ]
#
# 1. Every interval is two marks recorded on one stream: the compute stream around a layer's
#    forward, recompute and backward and around the whole step; the D2H / H2D stream around each
#    batch of copies. On an accelerator a mark is ``Event(enable_timing=True)`` recorded on that
#    stream, so an interval is the device's time for the work, not the host's time to enqueue it
#    (3-4 ms against 17-68 ms per layer on an H100). On the CPU the streams are torch.cpu's no-op
#    stand-ins, which run work when it is issued, and a mark is a host-clock reading
#    (``HostClockEvent``). Both go through the same calls: ``record``, ``query``, ``synchronize``,
#    ``elapsed_time``.
# 2. Nothing reads a mark inside a step. A step's marks are closed at the next step boundary (the
#    first layer's forward of the next pass) or when stats are read, and resolved there: without
#    waiting when every end mark has completed (``query``), or by waiting for them when the caller
#    must decide now (``swap_ratio="auto"`` while it measures, ``memo.stats``). A step boundary or a
#    stats read is never inside a step, so no mark adds a device sync to the work it times.
# 3. A compute-stream interval measures what ran on that stream between its marks, waits on other
#    streams included. The runtime records each wait for a copy (NOTE [ Swap stream ordering ]
#    rules 2 and 4) *before* the layer's start mark, so layer intervals hold compute only and the
#    waits show up in the step's time.
# 4. An interval is read only once both its marks completed: ``torch.cuda.Event.elapsed_time``
#    refuses otherwise ("Both events must be completed"), and the end mark's completion says
#    nothing of the start's when the two were recorded on different streams (a step's start is
#    recorded on the forward's current stream, its end on the one autograd runs the backward on).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

#: The kinds of interval a step holds. ``step``: the first layer's forward to the end of the first
#: swapped layer's backward (one per step). ``d2h`` / ``h2d``: one per batch of copies.
KINDS = ("step", "forward", "backward", "recompute", "d2h", "h2d")


class HostClockEvent:
    """A timing event for the CPU, with the calls of ``torch.cuda.Event(enable_timing=True)``.

    ``torch.cpu.Event`` records nothing and has no ``elapsed_time``. On the CPU the work of every
    stream runs when it is issued, so the host clock when the mark is recorded is the work's clock.
    """

    __slots__ = ("clock", "t")

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.t: Optional[float] = None

    def record(self, stream=None) -> None:
        self.t = self.clock()

    def query(self) -> bool:
        return self.t is not None

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "HostClockEvent") -> float:
        """Milliseconds from this mark to ``end`` (as ``torch.cuda.Event.elapsed_time``)."""
        assert self.t is not None and end.t is not None, "memo.swap.timing: elapsed_time of an unrecorded mark (bug)"
        return (end.t - self.t) * 1e3


@dataclass
class StepTimes:
    """One step's resolved intervals, in seconds. ``ratio`` is the swap ratio the step ran at."""

    source: str                          # "cuda events" or "host clock"
    ratio: Optional[float]
    step_s: Optional[float]              # None when the step did not reach its end (no backward)
    forward_s: dict = field(default_factory=dict)     # layer index -> seconds
    backward_s: dict = field(default_factory=dict)    # swapped layers: restore to last unpack, recompute excluded
    recompute_s: dict = field(default_factory=dict)   # swapped layers
    d2h_s: float = 0.0                   # copy-stream busy time, all batches of the step
    h2d_s: float = 0.0
    d2h_bytes: int = 0
    h2d_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Interval:
    kind: str
    index: int
    start: object
    end: object = None
    nbytes: int = 0


class StepTimer:
    """Marks of the current step, closed and resolved at step boundaries (NOTE [ Step timing ]).

    ``streams`` is a :class:`memo.swap.streams.Streams` (or its test double): it makes the marks.
    """

    def __init__(self, streams) -> None:
        self.streams = streams
        self.source = f"{streams.device.type} events" if streams.on_accelerator else "host clock"
        self._current: list[_Interval] = []
        self._open: dict[tuple[str, int], _Interval] = {}
        self._ratio: Optional[float] = None
        self._closed: list[tuple[Optional[float], list[_Interval]]] = []   # steps waiting to be resolved

    # --- marks -------------------------------------------------------------------------------
    def start(self, kind: str, index: int, stream) -> None:
        assert kind in KINDS, kind
        iv = _Interval(kind, index, self.streams.timing_event(stream))
        self._open[(kind, index)] = iv
        self._current.append(iv)

    def stop(self, kind: str, index: int, stream, nbytes: int = 0) -> None:
        iv = self._open.pop((kind, index), None)
        if iv is None:      # started in a step that was closed since (a stats read mid-step): not timed
            return
        iv.end = self.streams.timing_event(stream)
        iv.nbytes = nbytes

    def is_open(self, kind: str, index: int) -> bool:
        return (kind, index) in self._open

    def start_step(self, ratio: Optional[float], stream) -> None:
        """The step's first mark; ``ratio`` is the swap ratio it runs at."""
        self._ratio = ratio
        self.start("step", 0, stream)

    # --- step boundaries ---------------------------------------------------------------------
    def close_step(self) -> None:
        """Stop collecting marks for the current step; intervals still open are dropped."""
        done = [iv for iv in self._current if iv.end is not None]
        self._current, self._open = [], {}
        if done:
            self._closed.append((self._ratio, done))

    def step_complete(self) -> bool:
        """The current step reached its end mark (its backward finished issuing)."""
        return any(iv.kind == "step" and iv.end is not None for iv in self._current)

    def resolve(self, block: bool) -> list[StepTimes]:
        """Closed steps whose marks completed, oldest first, removed from the queue.

        ``block``: wait for incomplete marks (only at a step boundary or a stats read; NOTE rule 2).
        A step is resolved only after every older one, so the result stays in order.
        """
        out = []
        while self._closed:
            ratio, intervals = self._closed[0]
            if not block and not all(iv.start.query() and iv.end.query() for iv in intervals):
                break
            self._closed.pop(0)
            out.append(self._times(ratio, intervals))
        return out

    def _times(self, ratio: Optional[float], intervals: list[_Interval]) -> StepTimes:
        times = StepTimes(source=self.source, ratio=ratio, step_s=None)
        per_layer = {"forward": times.forward_s, "backward": times.backward_s, "recompute": times.recompute_s}
        for iv in intervals:
            iv.start.synchronize()   # elapsed_time needs both marks completed (rule 4)
            iv.end.synchronize()
            seconds = iv.start.elapsed_time(iv.end) / 1e3
            if iv.kind == "step":
                times.step_s = seconds
            elif iv.kind in per_layer:
                per_layer[iv.kind][iv.index] = per_layer[iv.kind].get(iv.index, 0.0) + seconds
            elif iv.kind == "d2h":
                times.d2h_s += seconds
                times.d2h_bytes += iv.nbytes
            else:
                times.h2d_s += seconds
                times.h2d_bytes += iv.nbytes
        return times
