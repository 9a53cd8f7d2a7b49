"""Greedy placement (the MIP's warm start) and a caching-allocator replay (the baseline). Torch-free.

The greedy places allocations one by one, each at the lowest (first-fit) or tightest (best-fit)
gap left by the already placed allocations whose lifetimes overlap it; it tries several orders
and keeps the lowest peak. It always returns a valid layout, so a plan exists even when the MIP
finds nothing better within its time limit.
"""

from __future__ import annotations

import bisect
from typing import Callable

from .layout import Alloc, conflicting_pairs, layout_peak

_ORDERS: dict[str, Callable[[Alloc], tuple]] = {
    "size": lambda a: (-a.bytes, a.start, a.id),
    "lifetime": lambda a: (-(a.end - a.start), -a.bytes, a.id),
    "area": lambda a: (-(a.end - a.start) * a.bytes, a.id),
    "start": lambda a: (a.start, -a.bytes, a.id),
}


def _place(allocs: list[Alloc], neighbours: list[list[int]], order: list[int], best_fit: bool) -> dict[str, int]:
    offsets: dict[int, int] = {}
    for i in order:
        size = allocs[i].bytes
        busy = sorted((offsets[j], offsets[j] + allocs[j].bytes) for j in neighbours[i] if j in offsets)
        # Gaps between busy intervals (merged), then the open space above the last one.
        cursor, choice, choice_len = 0, None, None
        for lo, hi in busy:
            if lo > cursor:
                gap = lo - cursor
                if gap >= size:
                    if not best_fit:
                        choice = cursor
                        break
                    if choice_len is None or gap < choice_len:
                        choice, choice_len = cursor, gap
            cursor = max(cursor, hi)
        if choice is None:
            choice = cursor
        offsets[i] = choice
    return {allocs[i].id: off for i, off in offsets.items()}


def neighbour_lists(allocs: list[Alloc]) -> list[list[int]]:
    neighbours: list[list[int]] = [[] for _ in allocs]
    for i, j in conflicting_pairs(allocs):
        neighbours[i].append(j)
        neighbours[j].append(i)
    return neighbours


def greedy_layout(allocs: list[Alloc]) -> tuple[dict[str, int], int, str]:
    """Best of several orders x {first-fit, best-fit}: ``(offsets, peak, which)``."""
    neighbours = neighbour_lists(allocs)
    best = None
    for name, key in _ORDERS.items():
        order = sorted(range(len(allocs)), key=lambda i: key(allocs[i]))
        for best_fit in (False, True):
            offsets = _place(allocs, neighbours, order, best_fit)
            peak = layout_peak(allocs, offsets)
            if best is None or peak < best[1]:
                best = (offsets, peak, f"{name}/{'best' if best_fit else 'first'}-fit")
    if best is None:
        return {}, 0, "empty"
    return best


# --- Baseline: what an allocator without a plan does with the same request trace -----------------

_MIB = 1 << 20


def _round_request(size: int) -> int:
    """PyTorch's CUDA caching allocator rounds every request up to a multiple of 512 bytes."""
    return max(512, (size + 511) // 512 * 512)


def _segment_size(size: int) -> int:
    """Segment a fresh cudaMalloc gets for a request (PyTorch: 2 MiB for requests of at most
    1 MiB, 20 MiB up to 10 MiB, otherwise the request rounded up to 2 MiB)."""
    if size <= _MIB:
        return 2 * _MIB
    if size < 10 * _MIB:
        return 20 * _MIB
    return (size + 2 * _MIB - 1) // (2 * _MIB) * (2 * _MIB)


def caching_allocator_replay(allocs: list[Alloc]) -> dict:
    """Replay the trace (frees of a step before its allocations) through a best-fit caching
    allocator that never releases segments, modelled on PyTorch's CUDA allocator: small
    (<= 1 MiB) and large pools, block splitting when the remainder is over 1 MiB (large pool),
    coalescing of free neighbours within a segment. Returns peak reserved and allocated bytes."""
    # Free blocks per pool: sorted list of (size, segment, offset); block map per segment.
    pools: dict[str, list[tuple[int, int, int]]] = {"small": [], "large": []}
    blocks: dict[int, dict[int, list]] = {}     # segment -> offset -> [size, free]
    where: dict[str, tuple[str, int, int]] = {}
    reserved = allocated = peak_reserved = peak_allocated = 0
    n_segments = 0
    events = []
    for a in allocs:
        if a.bytes == 0:
            continue
        events.append((a.start, 1, a.id, a.bytes))
        events.append((a.end, 0, a.id, a.bytes))
    events.sort()
    for _, is_alloc, aid, nbytes in events:
        size = _round_request(nbytes)
        if is_alloc:
            pool = "small" if size <= _MIB else "large"
            free = pools[pool]
            k = bisect.bisect_left(free, (size, -1, -1))
            if k < len(free):
                bsize, seg, off = free.pop(k)
            else:
                seg, off, bsize = n_segments, 0, _segment_size(size)
                n_segments += 1
                blocks[seg] = {0: [bsize, True]}
                reserved += bsize
            remainder = bsize - size
            split = remainder >= 512 if pool == "small" else remainder > _MIB
            if split:
                blocks[seg][off] = [size, False]
                blocks[seg][off + size] = [remainder, True]
                bisect.insort(free, (remainder, seg, off + size))
            else:
                blocks[seg][off] = [bsize, False]
                size = bsize
            where[aid] = (pool, seg, off)
            allocated += nbytes
        else:
            pool, seg, off = where.pop(aid)
            free = pools[pool]
            seg_blocks = blocks[seg]
            bsize = seg_blocks[off][0]
            # Coalesce with the next and previous free blocks of the same segment.
            nxt = off + bsize
            if nxt in seg_blocks and seg_blocks[nxt][1]:
                nsize = seg_blocks.pop(nxt)[0]
                free.remove((nsize, seg, nxt))
                bsize += nsize
            prev = max((o for o in seg_blocks if o < off), default=None)
            if prev is not None and seg_blocks[prev][1]:
                psize = seg_blocks[prev][0]
                free.remove((psize, seg, prev))
                del seg_blocks[off]
                off, bsize = prev, psize + bsize
            seg_blocks[off] = [bsize, True]
            bisect.insort(free, (bsize, seg, off))
            allocated -= nbytes
        peak_reserved = max(peak_reserved, reserved)
        peak_allocated = max(peak_allocated, allocated)
    return {"reserved_bytes": peak_reserved, "allocated_bytes": peak_allocated, "segments": n_segments}
