"""The swap engine: copy streams, events and the two in-flight slots (even and odd layers).

# NOTE [ Swap stream ordering ]
#
# 1. Layer i's copies out run on the D2H stream after it waits for the compute stream at the
#    end of layer i's forward, and after the last copy in (so a reused host block is not
#    overwritten while an H2D copy still reads it).
# 2. Layer i's device tensors stay referenced in slot ``i % 2`` until layer i+2 starts its
#    forward. There the compute stream waits for layer i's ``d2h_event`` before the references
#    are dropped, so the caching allocator hands their memory to layer i+2 only after the copy
#    (the paper's two rounding buffers). At the end of the forward pass both slots drain.
# 3. Prefetch of layer i allocates its device buffers on the compute stream; the H2D stream
#    waits for that and for layer i's ``d2h_event``, copies, and records ``h2d_event``.
# 4. Before layer i's backward reads anything, the compute stream waits for ``h2d_event``.
#    Host blocks are freed only after that wait (rule 1 orders the next forward's copies out).
#
# Each batch of copies is timed by marks on its own copy stream, recorded after the stream's
# waits, so a ``d2h``/``h2d`` interval is the copy itself (See NOTE [ Step timing ] in
# memo/swap/timing.py).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable, Optional

import torch

from memo.swap.host_pool import HostPool
from memo.swap.streams import Streams
from memo.swap.timing import StepTimer

if TYPE_CHECKING:
    from memo.executor import LayerState


class SwapEngine:
    def __init__(self, device: torch.device, pool: HostPool,
                 timer_factory: Callable[[Streams], StepTimer] = StepTimer) -> None:
        self.streams = Streams(device)
        self.pool = pool
        self.timer = timer_factory(self.streams)
        # Weak: a layer whose graph was dropped (an exception in the forward) must be collectable;
        # its __del__ orders the release after its copies (NOTE rule 2).
        self.slots: list[Optional[weakref.ref]] = [None, None]
        self.last_h2d_event = None

    def layer_starting(self, parity: int) -> None:
        """Layer i is about to run its forward: release layer i-2. See NOTE rule 2."""
        self._release(parity)

    def _release(self, parity: int) -> None:
        ref = self.slots[parity]
        self.slots[parity] = None
        state = ref() if ref is not None else None
        if state is not None:
            state.release_sources()

    def swap_out(self, state: "LayerState") -> None:
        s = self.streams
        forward_done = s.event(s.compute)
        s.d2h.wait_event(forward_done)
        if self.last_h2d_event is not None:
            s.d2h.wait_event(self.last_h2d_event)
        try:
            for rec in state.records.values():
                rec.allocate_host(self.pool)
            work = [(rec, rec.source) for rec in state.records.values()]
            self.timer.start("d2h", state.index, s.d2h)
            s.run(s.d2h, lambda: [rec.copy_out(source) for rec, source in work])
            self.timer.stop("d2h", state.index, s.d2h, nbytes=sum(rec.host_bytes() for rec, _ in work))
        finally:   # even if the pool ran out: the slot's release breaks the state's cycle
            state.d2h_event = s.event(s.d2h)
            self._occupy(state)

    def _occupy(self, state: "LayerState") -> None:
        parity = state.index % 2
        self._release(parity)
        self.slots[parity] = weakref.ref(state)

    def drain(self) -> None:
        """End of the forward pass: release both slots (NOTE rule 2)."""
        self._release(0)
        self._release(1)

    def prefetch(self, state: "LayerState") -> None:
        """Start copying layer ``state`` back (NOTE rule 3)."""
        s = self.streams
        for rec in state.records.values():
            rec.allocate_device()
        allocated = s.event(s.compute)
        s.h2d.wait_event(allocated)
        s.h2d.wait_event(state.d2h_event)
        records = list(state.records.values())
        self.timer.start("h2d", state.index, s.h2d)
        s.run(s.h2d, lambda: [rec.copy_in() for rec in records])
        self.timer.stop("h2d", state.index, s.h2d, nbytes=sum(rec.host_bytes() for rec in records))
        state.h2d_event = s.event(s.h2d)
        self.last_h2d_event = state.h2d_event
        state.prefetched = True

    def wait_restored(self, state: "LayerState") -> None:
        """The compute stream waits for layer ``state``'s copies in (NOTE rule 4); its recompute starts."""
        self.streams.compute.wait_event(state.h2d_event)
        self.timer.start("recompute", state.index, self.streams.compute)

    def serve_from(self, pool: HostPool) -> None:
        """Serve later copies from ``pool``. Records already in the old one stay there and are freed to it
        (``HostBlock.pool``); the caller closes a pool only without records and after synchronising the
        streams (NOTE [ Host pool sizing ] and [ Several forwards before one backward ] in memo/runtime.py)."""
        self.pool = pool
