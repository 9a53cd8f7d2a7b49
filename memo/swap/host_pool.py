"""One host allocation, carved into aligned blocks, reused every step.

The pool reserves its memory once (pinned where an accelerator exists, plain otherwise) and
hands out blocks from a free list with coalescing. Asking for more than the budget raises a
MemoError with the numbers.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from memo.errors import MemoError

ALIGNMENT = 256  # bytes; matches the CUDA caching allocator's block rounding


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


class HostPool:
    """Free-list allocator over one host buffer of ``capacity`` bytes.

    The buffer is reserved on the first allocation (so a wrapped model that never trains costs
    nothing) and kept until :meth:`close`.
    """

    def __init__(self, capacity: int, *, pin: bool | None = None) -> None:
        if capacity <= 0:
            raise MemoError(f"memo.swap: host pool capacity must be > 0 bytes, got {capacity}")
        self.capacity = _align(capacity)
        self.pin = torch.accelerator.is_available() if pin is None else pin
        self.buffer: torch.Tensor | None = None
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # sorted (offset, size)
        self.used_bytes = 0
        self.high_water_bytes = 0
        self.num_allocs = 0

    def reserve(self) -> None:
        if self.buffer is None:
            self.buffer = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pin)

    @property
    def reserved_bytes(self) -> int:
        return 0 if self.buffer is None else self.capacity

    def allocate(self, nbytes: int) -> HostBlock:
        self.reserve()
        size = _align(max(nbytes, 1))
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, free - size)
                self.used_bytes += size
                self.high_water_bytes = max(self.high_water_bytes, self.used_bytes)
                self.num_allocs += 1
                return HostBlock(self, off, size)
        largest = max((s for _, s in self._free), default=0)
        raise MemoError(
            f"memo.swap: host pool cannot serve {nbytes} B: {self.used_bytes} of {self.capacity} B in use, "
            f"largest free block {largest} B; raise MemoConfig(host_memory_budget=...) or lower swap_ratio")

    def free(self, block: HostBlock) -> None:
        assert block.pool is self and block.live, "memo.swap: double free of a host block (bug in memo)"
        block.live = False
        self.used_bytes -= block.nbytes
        i = bisect.bisect_left(self._free, (block.offset, 0))
        off, size = block.offset, block.nbytes
        if i < len(self._free) and self._free[i][0] == off + size:      # merge with the next span
            size += self._free[i][1]
            del self._free[i]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:  # merge with the previous
            off = self._free[i - 1][0]
            size += self._free[i - 1][1]
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (off, size))

    def close(self) -> None:
        assert self.used_bytes == 0, f"memo.swap: closing a host pool with {self.used_bytes} B still in use"
        self.buffer = None

    def stats(self) -> dict:
        return {"capacity_bytes": self.capacity, "reserved_bytes": self.reserved_bytes,
                "used_bytes": self.used_bytes, "high_water_bytes": self.high_water_bytes,
                "pinned": self.pin, "num_allocs": self.num_allocs}
