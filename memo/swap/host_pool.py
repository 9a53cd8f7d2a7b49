"""One host allocation, carved into aligned blocks, reused every step.

The pool reserves its memory once (pinned where an accelerator exists, plain otherwise) and
hands out blocks from a free list with coalescing. Asking for more than the budget raises a
MemoError with the numbers.

Two free lists serve the same API: the C++ pool of ``memo._C`` (csrc/host_pool.cpp: it owns
the memory and page-locks it with cudaHostRegister in CUDA builds), and the pure-Python one
below (memory from ``torch.empty(pin_memory=...)``), used when ``memo._C`` is missing, disabled
(``MEMO_DISABLE_CSRC=1``), or cannot pin because it was built without its CUDA part. Both place
blocks first-fit by address, so they hand out the same offsets for the same requests.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import torch

from memo import _ext
from memo.errors import MemoError

ALIGNMENT = 256  # bytes; matches the CUDA caching allocator's block rounding (and csrc/host_pool.h)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass
class HostBlock:
    """A span ``[offset, offset + nbytes)`` of the pool; ``view`` gives a typed tensor over it."""

    pool: "HostPool"
    offset: int
    nbytes: int
    live: bool = True

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        need = numel * torch.empty((), dtype=dtype).element_size()
        assert need <= self.nbytes, f"block of {self.nbytes} B viewed as {need} B"
        raw = self.pool.buffer[self.offset:self.offset + need]
        return raw.view(dtype).view(shape)


class _PyFreeList:
    """Sorted free spans with coalescing; the fallback of the C++ pool."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free_spans: list[tuple[int, int]] = [(0, capacity)]  # sorted (offset, size)
        self.used_bytes = 0
        self.high_water_bytes = 0
        self.num_allocs = 0

    def allocate(self, nbytes: int) -> tuple[int, int]:
        size = _align(max(nbytes, 1))
        for i, (off, free) in enumerate(self.free_spans):
            if free >= size:
                if free == size:
                    del self.free_spans[i]
                else:
                    self.free_spans[i] = (off + size, free - size)
                self.used_bytes += size
                self.high_water_bytes = max(self.high_water_bytes, self.used_bytes)
                self.num_allocs += 1
                return off, size
        largest = max((s for _, s in self.free_spans), default=0)
        raise MemoError(
            f"memo.swap: host pool cannot serve {nbytes} B: {self.used_bytes} of {self.capacity} B in use, "
            f"largest free block {largest} B; raise MemoConfig(host_memory_budget=...) or lower swap_ratio")

    def free(self, off: int, size: int) -> None:
        self.used_bytes -= size
        i = bisect.bisect_left(self.free_spans, (off, 0))
        if i < len(self.free_spans) and self.free_spans[i][0] == off + size:      # merge with the next span
            size += self.free_spans[i][1]
            del self.free_spans[i]
        if i > 0 and self.free_spans[i - 1][0] + self.free_spans[i - 1][1] == off:  # merge with the previous
            off = self.free_spans[i - 1][0]
            size += self.free_spans[i - 1][1]
            del self.free_spans[i - 1]
            i -= 1
        self.free_spans.insert(i, (off, size))


class HostPool:
    """Free-list allocator over one host buffer of ``capacity`` bytes.

    The buffer is reserved on the first allocation (so a wrapped model that never trains costs
    nothing) and kept until :meth:`close`. ``backend`` says which free list serves it
    (``"csrc"`` or ``"python"``) and ``backend_reason`` why, when it is not the C++ one.
    """

    def __init__(self, capacity: int, *, pin: bool | None = None) -> None:
        if capacity <= 0:
            raise MemoError(f"memo.swap: host pool capacity must be > 0 bytes, got {capacity}")
        self.capacity = _align(capacity)
        self.pin = torch.accelerator.is_available() if pin is None else pin
        self.buffer: torch.Tensor | None = None
        native = _ext.csrc()
        if native is None:
            self.backend, self.backend_reason = "python", _ext.status().get("reason")
        elif self.pin and not _ext.cuda_part():
            self.backend = "python"
            self.backend_reason = "memo._C has no CUDA part to page-lock with; torch pins the Python pool's memory"
        else:
            self.backend, self.backend_reason = "csrc", None
        self._native_mod = native if self.backend == "csrc" else None
        self._native = None                                   # memo._C.HostPool once reserved
        self._closed_counters = {"used_bytes": 0, "high_water_bytes": 0, "num_allocs": 0}
        self._py = _PyFreeList(self.capacity) if self.backend == "python" else None
        self.pin_s = 0.0   # host seconds :meth:`reserve` took to allocate (and page-lock) the buffer

    def reserve(self) -> None:
        if self.buffer is not None:
            return
        start = time.perf_counter()   # a host operation: the host clock is its clock
        if self._py is not None:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pin)
        else:
            try:
                self._native = self._native_mod.HostPool(self.capacity, self.pin)
            except (RuntimeError, ValueError, MemoryError) as e:
                raise MemoError(str(e) if str(e).startswith("memo.swap: ") else
                                f"memo.swap: could not reserve a host pool of {self.capacity} B ({e}); "
                                "lower MemoConfig(host_memory_budget=...)") from e
            self.buffer = self._native.buffer()
        self.pin_s = time.perf_counter() - start

    @property
    def reserved_bytes(self) -> int:
        return 0 if self.buffer is None else self.capacity

    @property
    def used_bytes(self) -> int:
        return self._counters()["used_bytes"]

    @property
    def high_water_bytes(self) -> int:
        return self._counters()["high_water_bytes"]

    @property
    def num_allocs(self) -> int:
        return self._counters()["num_allocs"]

    def _counters(self) -> dict:
        if self._py is not None:
            return {"used_bytes": self._py.used_bytes, "high_water_bytes": self._py.high_water_bytes,
                    "num_allocs": self._py.num_allocs}
        if self._native is None:
            return self._closed_counters
        return self._native.stats()

    def allocate(self, nbytes: int) -> HostBlock:
        self.reserve()
        if self._py is not None:
            off, size = self._py.allocate(nbytes)
            return HostBlock(self, off, size)
        try:
            off = self._native.allocate(nbytes)
        except RuntimeError as e:  # csrc/host_pool.cpp words it "memo.swap: ..." with the numbers and the fix
            raise MemoError(str(e)) from e
        return HostBlock(self, off, self._native.block_size(off))

    def free(self, block: HostBlock) -> None:
        assert block.pool is self and block.live, "memo.swap: double free of a host block (bug in memo)"
        block.live = False
        if self._py is not None:
            self._py.free(block.offset, block.nbytes)
        else:
            self._native.free(block.offset)

    def close(self) -> None:
        assert self.used_bytes == 0, f"memo.swap: closing a host pool with {self.used_bytes} B still in use"
        # The C++ pool's memory lives until the last tensor viewing it is gone (csrc/bindings.cpp).
        self.buffer = None
        if self._native is not None:
            self._closed_counters = self._native.stats()
            self._native = None

    def stats(self) -> dict:
        return {"capacity_bytes": self.capacity, "reserved_bytes": self.reserved_bytes,
                "used_bytes": self.used_bytes, "high_water_bytes": self.high_water_bytes,
                "pinned": self.pin, "num_allocs": self.num_allocs, "backend": self.backend, "pin_s": self.pin_s}
