"""A CPU test double for memo.swap.streams.Streams that makes stream-ordering bugs visible.

On a GPU, work issued on a copy stream runs whenever the device gets to it; on the CPU the real
streams run everything at once, so a missing event wait cannot show. Here the copy streams
queue their work and run it only when some stream waits on an event recorded after it: the
latest legal moment. Together with poisoning (freed host blocks, released activations and fresh
device buffers are filled with NaN), a missing or misplaced wait turns into NaN gradients.
"""

from __future__ import annotations

import contextlib

import torch

from memo.swap.streams import Streams


class DeferredStream:
    def __init__(self, name: str, immediate: bool = False) -> None:
        self.name = name
        self.immediate = immediate   # the compute stream: host program order
        self.queue: list = []
        self.done = 0

    def enqueue(self, work) -> None:
        if self.immediate:
            work()
        else:
            self.queue.append(work)

    def flush(self, upto: int | None = None) -> None:
        end = len(self.queue) if upto is None else upto
        while self.done < end:
            work = self.queue[self.done]
            self.done += 1
            work()

    def wait_event(self, event: "DeferredEvent") -> None:
        if event.stream is self or event.stream.immediate:
            return
        if self.immediate:
            event.stream.flush(event.pos)          # the host-ordered stream blocks until then
        else:
            self.enqueue(lambda: event.stream.flush(event.pos))


class DeferredEvent:
    def __init__(self, stream: DeferredStream) -> None:
        self.stream = stream
        self.pos = len(stream.queue)

    def query(self) -> bool:
        return self.stream.immediate or self.stream.done >= self.pos


class DeferredStreams(Streams):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.module = torch.get_device_module(device.type)
        self.on_accelerator = False
        self._compute = DeferredStream("compute", immediate=True)
        self.d2h = DeferredStream("d2h")
        self.h2d = DeferredStream("h2d")

    @property
    def compute(self):
        return self._compute

    def event(self, stream):
        return DeferredEvent(stream)

    def use(self, stream):
        return contextlib.nullcontext(stream)

    def run(self, stream, work) -> None:
        stream.enqueue(work)

    def synchronize(self) -> None:
        while self.d2h.done < len(self.d2h.queue) or self.h2d.done < len(self.h2d.queue):
            self.d2h.flush()
            self.h2d.flush()


def poison(t: torch.Tensor) -> None:
    """What a reused allocation would hold: NaN (all bits set) in every byte."""
    t.view(torch.uint8).fill_(255) if t.is_contiguous() else t.fill_(float("nan"))
