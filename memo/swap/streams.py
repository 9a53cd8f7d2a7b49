"""Compute and copy streams of one device, through the device's own module.

``torch.get_device_module(device)`` is ``torch.cuda`` on a GPU and ``torch.cpu`` on the CPU; both
have ``Stream``, ``Event``, ``current_stream`` and ``stream(...)``, and on the CPU they are no-ops
that run the same control flow. (The generic ``torch.Stream``/``torch.Event`` raise "cpu backend
doesn't support events" when an event is recorded, so they cannot serve the CPU path.)

On an accelerator every stream belongs to the model's device, not to whichever device is current:
a model on ``cuda:1`` gets its copy streams on ``cuda:1``.
"""

from __future__ import annotations

import contextlib

import torch

from memo.swap.timing import HostClockEvent


class Streams:
    """The compute stream plus one device-to-host and one host-to-device stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.module = torch.get_device_module(device.type)
        self.on_accelerator = device.type != "cpu"   # torch.cpu's streams take no device argument
        self.d2h = self.module.Stream(device) if self.on_accelerator else self.module.Stream()
        self.h2d = self.module.Stream(device) if self.on_accelerator else self.module.Stream()

    @property
    def compute(self):
        """The stream the model computes on: whatever is current on the model's device now."""
        return self.module.current_stream(self.device) if self.on_accelerator else self.module.current_stream()

    def event(self, stream) -> object:
        """An event recorded on ``stream`` now."""
        ev = self.module.Event()
        ev.record(stream)
        return ev

    def timing_event(self, stream) -> object:
        """A timing mark recorded on ``stream`` now: a device event with ``enable_timing`` on an
        accelerator, a host-clock reading on the CPU (See NOTE [ Step timing ] in memo/swap/timing.py)."""
        ev = self.module.Event(enable_timing=True) if self.on_accelerator else HostClockEvent()
        ev.record(stream)
        return ev

    @contextlib.contextmanager
    def use(self, stream):
        """Make ``stream`` current (and its device, on an accelerator)."""
        with contextlib.ExitStack() as stack:
            if self.on_accelerator:
                stack.enter_context(self.module.device(self.device))
            stack.enter_context(self.module.stream(stream))
            yield stream

    def run(self, stream, work) -> None:
        """Issue ``work()`` (copies) on ``stream``. Tests substitute a double that defers it until an
        event after it is waited for (tests/deferred_streams.py), which makes ordering bugs visible
        on the CPU."""
        with self.use(stream):
            work()

    def synchronize(self) -> None:
        """Wait (on the host) until the device is idle, copy streams included: before host memory is unmapped."""
        if self.on_accelerator:
            self.module.synchronize(self.device)
        else:
            self.module.synchronize()
