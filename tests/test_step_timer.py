"""StepTimer reads an interval only once both of its marks completed (NOTE [ Step timing ]
rule 4), with marks that behave as torch.cuda.Event(enable_timing=True) does: completion is
the device's business, and elapsed_time refuses an incomplete mark."""

import itertools
import types

from memo.swap.timing import StepTimer


class DeviceMark:
    """A timing event whose completion the test controls. ``elapsed_time`` raises like
    torch's CUDAEvent ("Both events must be completed before calculating elapsed time")."""

    ticks = itertools.count()

    def __init__(self) -> None:
        self.t, self.done = None, False

    def record(self, stream=None) -> None:
        self.t = next(self.ticks)

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True

    def elapsed_time(self, end: "DeviceMark") -> float:
        if not (self.done and end.done):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return float(end.t - self.t)


class MarkStreams:
    device = types.SimpleNamespace(type="cuda")
    on_accelerator = True

    def __init__(self) -> None:
        self.marks: list[DeviceMark] = []

    def timing_event(self, stream) -> DeviceMark:
        mark = DeviceMark()
        mark.record(stream)
        self.marks.append(mark)
        return mark


def test_an_interval_is_read_only_when_its_start_mark_completed_too():
    streams = MarkStreams()
    timer = StepTimer(streams)
    timer.start_step(0.5, "forward stream")
    timer.stop("step", 0, "backward stream")   # another stream: its end may complete first
    timer.close_step()
    start, end = streams.marks
    end.done = True
    assert timer.resolve(block=False) == []     # not read while the start mark is pending
    (times,) = timer.resolve(block=True)         # a step boundary that must decide waits for both
    assert start.done and times.step_s == (end.t - start.t) / 1e3 and times.ratio == 0.5
