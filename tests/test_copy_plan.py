"""The copy plan of NOTE [ Token slice copy plan ] (csrc/layout.h), checked on the CPU.

On a GPU, pack/unpack between a device tensor and host memory issue the plan's pieces as
cudaMemcpyAsync / cudaMemcpy2DAsync / cudaMemcpy3DAsync. Here memo._C's host executor runs the
same pieces with memcpy exactly as CUDA defines them (row y of slice z at
ptr + z * pitch * ysize + y * pitch, and CUDA's own checks: width <= pitch, height <= ysize), and
its bytes are compared with torch's ``narrow().contiguous()``. Also: which layouts the plan sends
to the gather kernel, how few pieces the swap engine's layouts take, and the copy counters in
``memo.stats``.
"""

import pytest
import torch

import memo
from memo import MemoConfig, _ext, ops
from memo.errors import MemoError
from models import batch, build, run_step

pytestmark = pytest.mark.skipif(_ext._module is None, reason=f"memo._C not built: {_ext._load_error}")

INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(shape, esize, gen):
    """Random bit patterns of `esize`-byte elements."""
    return torch.randint(0, 256, (*shape, esize), dtype=torch.uint8, generator=gen).view(INT_OF_SIZE[esize]) \
        .reshape(shape)


def _plan(t, dim, start, stop):
    return ops.copy_plan(t.shape, t.stride(), dim, start, stop, t.element_size())


def _layouts(esize, gen):
    """(name, tensor, token dim): the layouts memo swaps, rows of 64 elements (>= 64 bytes)."""
    b, s, heads, d = 3, 20, 4, 64
    wide = _bits((b, s, heads * d + 64), esize, gen)
    return [
        ("(b, s, h)", _bits((b, s, heads * d), esize, gen), 1),
        ("(1, s, h)", _bits((1, s, heads * d), esize, gen), 1),
        ("(b, s, h) batch slice", _bits((b, s, heads * d), esize, gen), 0),
        ("(s, b, h)", _bits((s, b, heads * d), esize, gen), 0),
        ("(b, s, h) in wider rows", wide[:, :, 32:32 + heads * d], 1),
        ("(b*s, h)", _bits((b * s, heads * d), esize, gen), 0),
        ("(b, h, s, d)", _bits((b, heads, s, d), esize, gen), 2),
        ("(b, h, s, d) of (b, s, h, d)", _bits((b, s, heads, d), esize, gen).transpose(1, 2), 2),
        ("(b, s, heads, d) permuted", _bits((heads, b, s, d), esize, gen).permute(1, 2, 0, 3), 1),
    ]


@pytest.mark.parametrize("esize", [1, 2, 4, 8])
def test_plan_executor_is_bit_exact_for_the_swapped_layouts(esize):
    gen = torch.Generator().manual_seed(esize)
    seen_depth = False
    for name, src, dim in _layouts(esize, gen):
        s = src.shape[dim]
        for start, stop in [(0, s), (s // 3, 2 * s // 3 + 1), (s - 1, s), (s // 2, s // 2), (0, 1)]:
            plan = _plan(src, dim, start, stop)
            assert plan["dma"], (name, plan)
            seen_depth |= plan["depth"] > 1
            ref = src.narrow(dim, start, stop - start).contiguous()
            out = _bits((ref.numel(),), esize, gen)
            _ext._module._pack_by_plan(src, dim, start, stop, out)
            assert torch.equal(out, ref.reshape(-1)), (name, start, stop, plan)

            dst = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype)   # src's layout, random bits
            dst.copy_(_bits(tuple(src.shape), esize, gen))
            expect = dst.clone()
            expect.narrow(dim, start, stop - start).copy_(ref)
            _ext._module._unpack_by_plan(out, dst, dim, start)
            assert torch.equal(dst, expect), (name, start, stop, plan)   # the slice, and nothing outside it
    assert seen_depth, "no layout exercised a 3D (cudaMemcpy3D) piece"


def test_plan_executor_random_layouts():
    """Random shapes, permutations and step-2 views: every plan that says DMA copies exactly."""
    gen = torch.Generator().manual_seed(11)
    kinds = {"1d": 0, "2d": 0, "3d": 0, "kernel": 0}
    for _ in range(500):
        ndim = int(torch.randint(1, 5, (), generator=gen))
        shape = [int(torch.randint(1, 6, (), generator=gen)) for _ in range(ndim)]
        step = [int(torch.randint(1, 3, (), generator=gen)) for _ in range(ndim)]
        inner = int(torch.randint(16, 40, (), generator=gen))            # rows of 64..156 bytes
        base = _bits([x * st for x, st in zip(shape, step)] + [inner + 8], 4, gen)
        t = base[tuple(slice(None, None, st) for st in step)][..., :inner]   # step-2 views, rows in wider rows
        t = t.permute(torch.randperm(ndim, generator=gen).tolist() + [ndim])
        if int(torch.randint(0, 3, (), generator=gen)) == 0:
            t = t.contiguous()
        dim = int(torch.randint(0, ndim + 1, (), generator=gen))         # the row dimension too
        n = t.shape[dim]
        start = int(torch.randint(0, n + 1, (), generator=gen))
        stop = int(torch.randint(start, n + 1, (), generator=gen))
        plan = _plan(t, dim, start, stop)
        if not plan["dma"]:
            kinds["kernel"] += 1
            continue
        kinds["3d" if plan["depth"] > 1 else "2d" if plan["height"] > 1 else "1d"] += 1
        ref = t.narrow(dim, start, stop - start).contiguous()
        out = torch.empty(ref.numel(), dtype=torch.int32)
        _ext._module._pack_by_plan(t, dim, start, stop, out)
        assert torch.equal(out, ref.reshape(-1)), (tuple(t.shape), t.stride(), dim, start, stop, plan)
        dst = torch.zeros_like(t)
        _ext._module._unpack_by_plan(out, dst, dim, start)
        assert torch.equal(dst.narrow(dim, start, stop - start), ref)
        dst.narrow(dim, start, stop - start).zero_()
        assert not dst.any(), "unpack wrote outside the slice"
    assert all(kinds[k] > 10 for k in ("1d", "2d", "3d")), kinds


def test_layouts_that_need_the_gather_kernel():
    """The plan names why; the host executor refuses such a plan instead of copying wrongly."""
    b, s, h = 2, 50, 64
    cases = [
        (torch.empty(b, s, h).transpose(1, 2), 2, "innermost dimension is not contiguous"),   # token dim innermost
        (torch.empty(b, s, 16, dtype=torch.uint8)[..., :8], 1, "narrower than kMinDmaRowBytes"),  # 8-byte rows
        (torch.empty(1, 400, 300, 32).transpose(1, 2), 2, "more than kMaxDmaPieces"),        # 300 heads x 400 tokens
    ]
    for t, dim, reason in cases:
        plan = _plan(t, dim, 1, t.shape[dim])
        assert not plan["dma"] and reason in plan["reason"], plan
        out = torch.empty(t.narrow(dim, 1, t.shape[dim] - 1).numel(), dtype=t.dtype)
        with pytest.raises(RuntimeError, match="needs the gather kernel"):
            _ext._module._pack_by_plan(t, dim, 1, t.shape[dim], out)


def test_swap_engine_layouts_are_dma_in_few_pieces():
    """The performance claim: real shapes (Llama-2-7B / TinyLlama, 32K tokens) plan as DMA only,
    one piece per layout except a (b, heads, s, d) view of (b, s, heads, d): one per head, batch
    folded into each piece as a 3D copy. Shapes only; nothing is allocated."""
    def plan(shape, strides, dim, start, stop, esize):
        p = ops.copy_plan(shape, strides, dim, start, stop, esize)
        assert p["dma"], (shape, strides, p)
        return p

    def contiguous_strides(shape):
        return torch.empty(shape, device="meta").stride()

    b, s, heads, kv, d, hidden, ffn = 2, 32768, 32, 8, 128, 4096, 11008
    split = s // 5
    for shape, dim in [((b, s, hidden), 1), ((b * s, hidden), 0), ((b, s, ffn), 1), ((b, heads, s, d), 2),
                       ((b, heads, s), 2), ((s, b, hidden), 0)]:       # hidden states, MLP, SDPA out, lse
        p = plan(shape, contiguous_strides(shape), dim, split, s, 2)
        assert p["pieces"] == 1, (shape, p)
    for nh in (heads, kv):                                             # q/k/v views handed to SDPA
        shape = (b, s, nh, d)
        st = contiguous_strides(shape)
        p = plan((b, nh, s, d), (st[0], st[2], st[1], st[3]), 2, split, s, 2)
        assert p["pieces"] == nh and p["depth"] == b and p["height"] == s - split and p["width"] == d * 2, p
    # A short remainder (few tokens, many heads): one piece per token instead, rows over heads.
    shape = (1, s, heads, d)
    st = contiguous_strides(shape)
    p = plan((1, heads, s, d), (st[0], st[2], st[1], st[3]), 2, s - 4, s, 2)
    assert p["pieces"] == 4 and p["height"] == heads, p


def test_copy_plan_rejects_bad_arguments():
    with pytest.raises(MemoError, match="argument 'dim'"):
        ops.copy_plan((2, 3), (3, 1), 2, 0, 1, 4)
    with pytest.raises(MemoError, match=r"\[2, 5\) is not inside the 3 tokens"):
        ops.copy_plan((2, 3), (3, 1), 1, 2, 5, 4)
    with pytest.raises(MemoError, match="equally long"):
        ops.copy_plan((2, 3), (1,), 0, 0, 1, 4)
    with pytest.raises(MemoError, match="element_size"):
        ops.copy_plan((2, 3), (3, 1), 0, 0, 1, 0)


def test_layouts_of_many_dimensions_are_refused_or_empty_never_overrun():
    # NOTE [ Token slice layout ]: at most kMaxCopyDims (12) dimensions survive merging. Many
    # more unmergeable ones are refused; with a dimension of size 0 there is nothing to copy.
    sizes, strides = (3,) * 200, (5,) * 200
    with pytest.raises(MemoError, match="more than 12 dimensions that cannot be merged"):
        ops.copy_plan(sizes, strides, 0, 0, 2, 4)
    p = ops.copy_plan(sizes + (0,), strides + (3,), 0, 0, 2, 4)
    assert p["dma"] and p["pieces"] == 0, p


def test_copy_counters_count_each_path(monkeypatch):
    src = torch.randn(2, 10, 16)
    out = torch.empty(2 * 4 * 16)
    for flag, key in (("0", "host_pack_bytes"), ("1", "torch_fallback_bytes")):
        monkeypatch.setenv(_ext.DISABLE_ENV, flag)
        ops.reset_copy_counters()
        ops.pack_tokens(src, 1, 3, 7, out)
        ops.unpack_tokens(out, src, 1, 3)
        counts = ops.copy_counters()
        unpack_key = "host_unpack_bytes" if flag == "0" else key
        expect = {k: 0 for k in counts}
        expect[key] += out.nbytes
        expect[unpack_key] += out.nbytes
        assert counts == expect, counts


def test_memo_stats_reports_the_steps_copies():
    """On the CPU the swapped activations go through memo._C's host copies: memo.stats says how many
    bytes went out and came back in the last step (not summed over steps), and none by a GPU path."""
    model = build("llama")
    memo.wrap(model, MemoConfig(swap_ratio=1.0, keep_last_layers=1, host_memory_budget="1GiB",
                                loss_chunk_size=None))
    steps = []
    for _ in range(2):
        run_step(model, [batch(1, 32)])
        steps.append(memo.stats(model).copies)
    first, second = steps
    assert first == second, steps
    assert 0 < first["host_pack_bytes"] == first["host_unpack_bytes"], first
    # Every swapped byte is counted once each way: token slices by memo._C, whole records by copy_.
    assert first["host_pack_bytes"] + first["d2h_whole_bytes"] == memo.stats(model).swapped_bytes, first
    assert first["host_unpack_bytes"] + first["h2d_whole_bytes"] == memo.stats(model).swapped_bytes, first
    assert all(v == 0 for k, v in first.items() if k.startswith(("d2h", "h2d", "d2d")) and "whole" not in k), first
    assert "copies: host_pack" in str(memo.stats(model))
