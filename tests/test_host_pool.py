"""The host pool, C++-backed and pure-Python: budget, reuse, coalescing, never overlapping."""

import random

import pytest
import torch

from memo import _ext
from memo.errors import MemoError
from memo.swap.host_pool import ALIGNMENT, HostPool

needs_csrc = pytest.mark.skipif(_ext._module is None, reason=f"memo._C not built: {_ext._load_error}")


@pytest.fixture(params=["csrc", "python"])
def backend(request, monkeypatch):
    if request.param == "csrc" and _ext._module is None:
        pytest.skip(f"memo._C not built: {_ext._load_error}")
    monkeypatch.setenv(_ext.DISABLE_ENV, "0" if request.param == "csrc" else "1")
    return request.param


def test_backend_selected(backend):
    pool = HostPool(4096, pin=False)
    assert pool.backend == backend
    assert pool.stats()["backend"] == backend


def test_over_budget_raises_with_numbers(backend):
    pool = HostPool(10_000, pin=False)
    assert pool.capacity == 10_240
    pool.allocate(4000)
    with pytest.raises(MemoError, match=r"^memo\.swap: host pool cannot serve 7000 B: 4096 of 10240 B in use, "
                                        r"largest free block 6144 B; raise MemoConfig\(host_memory_budget"):
        pool.allocate(7000)
    with pytest.raises(MemoError, match="must be > 0"):
        HostPool(0)


def test_views_write_into_the_pool_and_reuse_offsets(backend):
    pool = HostPool(1 << 16, pin=False)
    assert pool.reserved_bytes == 0                     # reserved on first use
    a = pool.allocate(1000)
    b = pool.allocate(ALIGNMENT)
    assert (a.offset, a.nbytes, b.offset) == (0, 1024, 1024)
    va = a.view(torch.float32, (10, 25))
    va.copy_(torch.arange(250.0).view(10, 25))
    assert torch.equal(pool.buffer[:1000].view(torch.float32), torch.arange(250.0))
    assert pool.used_bytes == 1024 + ALIGNMENT and pool.high_water_bytes == pool.used_bytes
    pool.free(a)
    pool.free(b)
    assert pool.used_bytes == 0 and pool.high_water_bytes == 1024 + ALIGNMENT
    again = pool.allocate(1000)                        # the same step again: the same place
    assert again.offset == 0
    pool.free(again)
    s = pool.stats()
    assert s["num_allocs"] == 3 and s["reserved_bytes"] == 1 << 16 and s["pinned"] is False
    pool.close()


def test_randomized_stress_never_overlaps(backend):
    """Random allocate/free sequences: live blocks are disjoint, in range, aligned, and their
    bytes are not disturbed by other blocks' writes; everything coalesces back at the end."""
    rng = random.Random(99)
    cap = 1 << 20
    pool = HostPool(cap, pin=False)
    live = {}                                           # offset -> (block, fill byte)
    for step in range(3000):
        if live and (rng.random() < 0.45 or pool.used_bytes > cap * 0.9):
            off = rng.choice(list(live))
            block, fill = live.pop(off)
            assert bool((pool.buffer[off:off + block.nbytes] == fill).all()), f"block at {off} was overwritten"
            pool.free(block)
        else:
            n = rng.choice([1, 17, 256, 1000, 4096, 30_000, rng.randint(1, 60_000)])
            try:
                block = pool.allocate(n)
            except MemoError:                           # only when no gap between live blocks fits
                edges = [0] + [x for b, _ in sorted(live.values(), key=lambda bf: bf[0].offset)
                               for x in (b.offset, b.offset + b.nbytes)] + [cap]
                gaps = [edges[i + 1] - edges[i] for i in range(0, len(edges), 2)]
                assert max(gaps) < -(-n // ALIGNMENT) * ALIGNMENT
                continue
            assert block.offset % ALIGNMENT == 0 and block.nbytes >= n and block.offset + block.nbytes <= cap
            fill = step % 251
            pool.buffer[block.offset:block.offset + block.nbytes] = fill
            live[block.offset] = (block, fill)
        spans = sorted((b.offset, b.offset + b.nbytes) for b, _ in live.values())
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:])), "overlapping blocks"
        assert pool.used_bytes == sum(e - s for s, e in spans)
    for block, _ in list(live.values()):
        pool.free(block)
    whole = pool.allocate(cap)                          # fully coalesced again
    assert whole.offset == 0
    pool.free(whole)


def test_both_backends_place_blocks_identically(monkeypatch):
    if _ext._module is None:
        pytest.skip(f"memo._C not built: {_ext._load_error}")
    rng = random.Random(5)
    ops = [(rng.random() < 0.4, rng.randint(1, 9000)) for _ in range(400)]
    placements = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(_ext.DISABLE_ENV, flag)
        pool, live, seen = HostPool(1 << 18, pin=False), [], []
        for is_free, n in ops:
            if is_free and live:
                pool.free(live.pop(n % len(live)))
            else:
                try:
                    live.append(pool.allocate(n))
                    seen.append((live[-1].offset, live[-1].nbytes))
                except MemoError:
                    seen.append(None)
        placements[flag] = (seen, pool.high_water_bytes)
    assert placements["0"] == placements["1"]


@needs_csrc
def test_cpp_pool_memory_outlives_close_while_viewed(monkeypatch):
    monkeypatch.setenv(_ext.DISABLE_ENV, "0")
    pool = HostPool(1 << 12, pin=False)
    block = pool.allocate(64)
    v = block.view(torch.float32, (16,))
    v.fill_(3.0)
    pool.free(block)
    pool.close()
    assert pool.buffer is None and pool.stats()["high_water_bytes"] == 256
    assert torch.equal(v, torch.full((16,), 3.0))       # the tensor keeps the C++ pool alive


@needs_csrc
def test_cpp_pool_double_free_and_pin_without_cuda():
    native = _ext._module.HostPool(1 << 12, False)
    off = native.allocate(10)
    native.free(off)
    with pytest.raises(RuntimeError, match="not a live block"):
        native.free(off)
    if not _ext.cuda_part():
        with pytest.raises(RuntimeError, match="built without its CUDA part"):
            _ext._module.HostPool(1 << 12, True)


def test_pin_request_without_cuda_part_falls_back_to_python(monkeypatch):
    monkeypatch.setenv(_ext.DISABLE_ENV, "0")
    pool = HostPool(1 << 12, pin=True)
    if _ext._module is not None and not _ext.cuda_part():
        assert pool.backend == "python" and "no CUDA part" in pool.backend_reason
    assert pool.pin is True
