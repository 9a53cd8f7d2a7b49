"""Token-slice pack/unpack: memo._C against the pure-torch reference, bit for bit.

Every case runs through both backends (the C++ op and the fallback, by MEMO_DISABLE_CSRC), and
each result is compared with a reference computed by narrow + clone. Which backend ran is observed,
not assumed: ``_OpLog`` (a TorchDispatchMode) records the ops the dispatcher saw, so a case that
claims the C++ op must see ``memo.pack_tokens`` / ``memo.unpack_tokens`` there, and a fallback case
must not.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memo import _ext, ops
from memo.errors import MemoError

needs_csrc = pytest.mark.skipif(_ext._module is None, reason=f"memo._C not built: {_ext._load_error}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["csrc", "fallback"])
def backend(request, monkeypatch):
    if request.param == "csrc":
        if _ext._module is None:
            pytest.skip(f"memo._C not built: {_ext._load_error}")
        monkeypatch.setenv(_ext.DISABLE_ENV, "0")
    else:
        monkeypatch.setenv(_ext.DISABLE_ENV, "1")
    return request.param


class _OpLog(TorchDispatchMode):
    """Counts the ops the dispatcher runs inside it, by name (``memo.pack_tokens.default``, ...)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))

    def native(self) -> tuple[int, int]:
        """(pack, unpack) calls that reached memo._C's ops."""
        return self.counts.get("memo.pack_tokens.default", 0), self.counts.get("memo.unpack_tokens.default", 0)


def _assert_ran(log: _OpLog, backend: str, packs: int, unpacks: int) -> None:
    """The C++ ops ran for every call when ``backend`` is csrc, and never for the fallback."""
    expect = (packs, unpacks) if backend == "csrc" else (0, 0)
    assert log.native() == expect, (backend, log.counts)


def _random_bits(shape, dtype, gen):
    """Random bit patterns (NaNs, infs, denormals included): a copy must keep every one."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    int_dtype = {2: torch.int16, 4: torch.int32}[itemsize]
    info = torch.iinfo(int_dtype)
    return torch.randint(info.min, info.max, shape, dtype=int_dtype, generator=gen).view(dtype)


def _random_layout(gen, dtype):
    """A tensor of 1-4 dims with a random permutation, maybe a strided slice; its token dim."""
    ndim = int(torch.randint(1, 5, (), generator=gen))
    shape = [int(torch.randint(1, 9, (), generator=gen)) for _ in range(ndim)]
    base = _random_bits([s * 2 for s in shape], dtype, gen)   # room for step-2 slices
    t = base[tuple(slice(0, s) for s in shape)]                # non-contiguous rows
    if bool(torch.randint(0, 2, (), generator=gen)):
        t = base[tuple(slice(0, 2 * s, 2) for s in shape)]     # every other element
    perm = torch.randperm(ndim, generator=gen).tolist()
    t = t.permute(perm)
    if bool(torch.randint(0, 3, (), generator=gen) == 0):
        t = t.contiguous()
    dim = int(torch.randint(0, ndim, (), generator=gen))
    return t, dim


def _same_bits(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    itemsize = a.element_size()
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}[itemsize]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_unpack_random_layouts_bit_exact(backend, dtype):
    gen = torch.Generator().manual_seed(1234 + DTYPES.index(dtype))
    log = _OpLog()
    for _ in range(150):
        src, dim = _random_layout(gen, dtype)
        seq = src.shape[dim]
        start = int(torch.randint(0, seq + 1, (), generator=gen))
        stop = int(torch.randint(start, seq + 1, (), generator=gen))
        ref = src.narrow(dim, start, stop - start).clone()
        out = torch.full((ref.numel(),), 7, dtype=torch.int16 if dtype != torch.float32 else torch.int32).view(dtype)
        with log:
            view = ops.pack_tokens(src, dim, start, stop, out)
        assert view.shape == ref.shape and view.data_ptr() == out.data_ptr()
        assert _same_bits(view, ref), (backend, tuple(src.shape), src.stride(), dim, start, stop)

        dst = _random_bits(tuple(src.shape), dtype, gen).as_strided(src.shape, src.stride()) \
            if src.is_contiguous() else torch.empty_like(src).copy_(src.flip(dim) if seq else src)
        before = dst.clone()
        with log:
            ops.unpack_tokens(out, dst, dim, start)
        expect = before.clone()
        expect.narrow(dim, start, stop - start).copy_(ref)
        assert _same_bits(dst, expect), (backend, tuple(src.shape), dst.stride(), dim, start, stop)
    _assert_ran(log, backend, 150, 150)


@pytest.mark.parametrize("dtype", DTYPES)
def test_llm_layouts(backend, dtype):
    """The layouts the executor swaps: (b, s, h), (b*s, h), SDPA's (b, heads, s, d) view of (b, s, heads, d)."""
    gen = torch.Generator().manual_seed(7)
    b, s, heads, d = 2, 300, 4, 16
    cases = [
        (_random_bits((b, s, heads * d), dtype, gen), 1),
        (_random_bits((b * s, heads * d), dtype, gen), 0),
        (_random_bits((b, s, heads, d), dtype, gen).transpose(1, 2), 2),
        (_random_bits((s, b, heads * d), dtype, gen), 0),
        (_random_bits((b, s, heads * d), dtype, gen).transpose(1, 2), 2),   # token dim innermost, stride h
    ]
    log = _OpLog()
    for src, dim in cases:
        for start, stop in [(0, s), (37, 300), (299, 300), (120, 120)]:
            ref = src.narrow(dim, start, stop - start).clone()
            out = torch.empty(ref.numel(), dtype=dtype)
            with log:
                view = ops.pack_tokens(src, dim, start, stop, out)
            assert _same_bits(view, ref)
            dst = torch.zeros_like(src)
            with log:
                ops.unpack_tokens(out, dst, dim, start)
            expect = torch.zeros_like(src)
            expect.narrow(dim, start, stop - start).copy_(ref)
            assert _same_bits(dst, expect)                      # and nothing outside the slice
    _assert_ran(log, backend, 4 * len(cases), 4 * len(cases))


@needs_csrc
def test_large_copy_runs_threaded_and_exact(monkeypatch):
    """Slices above the streaming-store threshold (8 MiB), with threads (MEMO_PARALLEL_COPY_BYTES=0
    in the fresh-process test covers small ones): long rows cut into pieces, tiled transposed
    rows, unaligned rows."""
    monkeypatch.setenv(_ext.DISABLE_ENV, "0")
    cases = [(torch.randn(3, 4096, 256), 1, 100, 4000),          # 12 MiB, rows of 4 MiB split in pieces
             (torch.randn(3, 4096, 256), 0, 1, 3),
             (torch.randn(2, 1500, 32, 128).to(torch.bfloat16).transpose(1, 2), 2, 123, 1499),  # tiled, partial tile
             (torch.randn(3, 2000, 1001).half(), 1, 99, 2000),            # streaming stores, unaligned rows
             (torch.randn(1, 3000, 7, 301).half().transpose(1, 2), 2, 1, 2999)]  # tiled, odd row bytes
    log = _OpLog()
    for src, dim, start, stop in cases:
        ref = src.narrow(dim, start, stop - start).clone()
        out = torch.empty(ref.numel(), dtype=src.dtype)
        with log:
            view = ops.pack_tokens(src, dim, start, stop, out)
        assert torch.equal(view, ref)
        dst = torch.zeros_like(src)
        with log:
            ops.unpack_tokens(out, dst, dim, start)
        assert torch.equal(dst.narrow(dim, start, stop - start), ref)
    _assert_ran(log, "csrc", len(cases), len(cases))       # the C++ copies ran, not the fallback


@needs_csrc
def test_native_op_is_dispatched_when_active_and_not_when_disabled(monkeypatch):
    """memo.ops calls torch.ops.memo (seen by the dispatcher) while memo._C is active, and the
    pure-torch copy (aten.copy_) under MEMO_DISABLE_CSRC=1. Nothing in memo is mocked."""
    src = torch.randn(4, 10)
    dst = torch.zeros(4, 10)
    for flag, backend in (("0", "csrc"), ("1", "fallback")):
        monkeypatch.setenv(_ext.DISABLE_ENV, flag)
        out = torch.empty(12)
        with _OpLog() as log:
            ops.pack_tokens(src, 1, 2, 5, out)
            ops.unpack_tokens(out, dst, 1, 2)
        _assert_ran(log, backend, 1, 1)
        assert ("aten.copy_.default" in log.counts) is (backend == "fallback"), log.counts
        assert torch.equal(dst[:, 2:5], src[:, 2:5])


def test_bad_arguments_raise_memo_error(backend):
    src = torch.randn(2, 10, 4)
    with pytest.raises(MemoError, match=r"^memo\.ops: pack_tokens: dim 3"):
        ops.pack_tokens(src, 3, 0, 1, torch.empty(8))
    with pytest.raises(MemoError, match=r"tokens \[4, 11\)"):
        ops.pack_tokens(src, 1, 4, 11, torch.empty(56))
    with pytest.raises(MemoError, match="24 elements"):
        ops.pack_tokens(src, 1, 4, 7, torch.empty(25))
    with pytest.raises(MemoError, match="bfloat16"):
        ops.pack_tokens(src, 1, 4, 7, torch.empty(24, dtype=torch.bfloat16))
    with pytest.raises(MemoError, match="whole number of tokens"):
        ops.unpack_tokens(torch.empty(9), src, 1, 0)
    with pytest.raises(MemoError, match=r"tokens \[8, 11\)"):
        ops.unpack_tokens(torch.empty(24), src, 1, 8)


@needs_csrc
def test_cpp_op_checks_name_the_argument():
    """Direct torch.ops callers get the C++ checks (RuntimeError naming the argument)."""
    src = torch.randn(2, 10, 4)
    with pytest.raises(RuntimeError, match="argument 'out' must be contiguous"):
        torch.ops.memo.pack_tokens(src, 1, 0, 2, torch.empty(16, 2)[:, 0])
    with pytest.raises(RuntimeError, match="argument 'dst' has elements that share memory"):
        torch.ops.memo.unpack_tokens(torch.empty(4), torch.empty(1, 4).expand(3, 4), 0, 0)


def test_both_backends_in_fresh_processes_agree(tmp_path):
    """MEMO_DISABLE_CSRC read from the environment at start-up: same bytes either way. The C++
    run also has MEMO_PARALLEL_COPY_BYTES=0, so every case below runs on all threads (units
    pulled from the shared counter), including the tiled and the long-row paths."""
    script = (
        "import sys, torch; from memo import ops, _ext\n"
        "from torch.utils._python_dispatch import TorchDispatchMode\n"
        "class Log(TorchDispatchMode):\n"
        "    names = set()\n"
        "    def __torch_dispatch__(self, func, types, args=(), kwargs=None):\n"
        "        self.names.add(str(func)); return func(*args, **(kwargs or {}))\n"
        "g = torch.Generator().manual_seed(3)\n"
        "cases = [(torch.randn(3, 64, 8, 5, generator=g).to(torch.bfloat16).permute(2, 1, 0, 3), 1, 10, 50),\n"
        "         (torch.randn(2, 700, 16, 64, generator=g).to(torch.float16).transpose(1, 2), 2, 33, 700),\n"
        "         (torch.randn(2, 900, 1000, generator=g), 1, 1, 899),\n"
        "         (torch.randn(300, 500, generator=g).t(), 1, 20, 290)]\n"
        "res = {'active': _ext.csrc() is not None}\n"
        "for i, (src, dim, a, b) in enumerate(cases):\n"
        "    out = torch.empty(src.numel() // src.shape[dim] * (b - a), dtype=src.dtype)\n"
        "    dst = torch.zeros_like(src)\n"
        "    with Log():\n"
        "        ops.pack_tokens(src, dim, a, b, out); ops.unpack_tokens(out, dst, dim, a)\n"
        "    res[i] = (out, dst)\n"
        "res['ops'] = sorted(Log.names)\n"
        "torch.save(res, sys.argv[1])\n")
    results = {}
    for flag in ("0", "1"):
        path = tmp_path / f"r{flag}.pt"
        env = dict(os.environ, MEMO_DISABLE_CSRC=flag, MEMO_PARALLEL_COPY_BYTES="0")  # threads even when small
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
        results[flag] = torch.load(path)
    assert results["1"]["active"] is False
    assert results["0"]["active"] is (_ext._module is not None)
    native = ["memo.pack_tokens.default", "memo.unpack_tokens.default"]
    assert not any(n.startswith("memo.") for n in results["1"]["ops"]), results["1"]["ops"]
    assert all((n in results["0"]["ops"]) is (_ext._module is not None) for n in native), results["0"]["ops"]
    for i in range(4):
        for a, b in zip(results["0"][i], results["1"][i]):
            assert _same_bits(a, b), i


def test_fake_tensors_are_checked_not_copied(backend):
    """The planner's profiler traces under FakeTensorMode: the ops run there (Meta kernels)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        src = torch.randn(2, 10, 4)
        out = torch.empty(24)
        assert ops.pack_tokens(src, 1, 2, 5, out).shape == (2, 3, 4)
        ops.unpack_tokens(out, src, 1, 2)
        with pytest.raises(MemoError, match="24 elements"):
            ops.pack_tokens(src, 1, 2, 5, torch.empty(25))
