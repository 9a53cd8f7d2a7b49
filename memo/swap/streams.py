"""Compute and copy streams of one device, through the device's own module.

``torch.get_device_module(device)`` is ``torch.cuda`` on a GPU and ``torch.cpu`` on the CPU; both
have ``Stream``, ``Event``, ``current_stream`` and ``stream(...)``, and on the CPU they are no-ops
that run the same control flow. (The generic ``torch.Stream``/``torch.Event`` raise "cpu backend
doesn't support events" when an event is recorded, so they cannot serve the CPU path.)
"""

from __future__ import annotations

import torch


class Streams:
    """The compute stream plus one device-to-host and one host-to-device stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.module = torch.get_device_module(device.type)
        self.d2h = self.module.Stream()
        self.h2d = self.module.Stream()
        # Copies can run asynchronously only where there is an accelerator with pinned host memory.
        self.asynchronous = device.type != "cpu"

    @property
    def compute(self):
        """The stream the model computes on: whatever is current when memo needs it."""
        return self.module.current_stream()

    def event(self, stream) -> object:
        """An event recorded on ``stream`` now."""
        ev = self.module.Event()
        ev.record(stream)
        return ev

    def use(self, stream):
        """Context manager making ``stream`` current."""
        return self.module.stream(stream)
