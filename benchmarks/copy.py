"""Bandwidth of memo's token-slice pack/unpack against Tensor.copy_ and a plain memcpy.

For each slice size and layout, the slice is the last 3/4 of the tokens (what the executor
swaps): pack copies it from the tensor into a host-pool block, unpack copies it back.
Baselines measured in the same run on the same bytes: ``Tensor.copy_`` of the same slice, and
one single-threaded ``memcpy`` of the same number of bytes between two contiguous buffers (the
machine's limit). Each number is the median of ``--repeats`` runs after one warm-up.

    python benchmarks/copy.py [--sizes-mb 1 4 16 64 256 1024] [--json PATH]

Layouts (fp32 unless --dtype): contiguous = (S, h) slicing dim 0 (one run of bytes);
strided = (4, S, h) slicing dim 1 (4 runs with gaps); permuted = SDPA's (b, heads, S, d) view of
a (b, S, heads, d) tensor, slicing dim 2 (rows of d elements, 8 KiB apart).
"""

from __future__ import annotations

import os
import sys

# Run as `python benchmarks/copy.py`, this directory is sys.path[0] and this file would shadow
# the standard library's `copy` module (which torch imports). Drop it before importing anything.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from memo import _ext, ops  # noqa: E402
from memo.swap.host_pool import HostPool  # noqa: E402

H = 4096  # hidden size in elements: (S, h) rows


def make_layout(layout: str, slice_bytes: int, dtype: torch.dtype):
    """(src, dim, start, stop) whose slice [start, stop) has ``slice_bytes`` bytes."""
    esize = torch.empty((), dtype=dtype).element_size()
    if layout == "contiguous":
        per_token = H * esize
        n = max(1, slice_bytes // per_token)
        src = torch.empty(n * 4 // 3 + 1, H, dtype=dtype)
        return src, 0, src.shape[0] - n, src.shape[0]
    if layout == "strided":
        b = 4
        per_token = b * H * esize
        n = max(1, slice_bytes // per_token)
        src = torch.empty(b, n * 4 // 3 + 1, H, dtype=dtype)
        return src, 1, src.shape[1] - n, src.shape[1]
    if layout == "permuted":
        b, heads, d = 1, 32, 128
        per_token = b * heads * d * esize
        n = max(1, slice_bytes // per_token)
        base = torch.empty(b, n * 4 // 3 + 1, heads, d, dtype=dtype)
        src = base.transpose(1, 2)                       # (b, heads, S, d), token dim 2
        return src, 2, src.shape[2] - n, src.shape[2]
    raise ValueError(layout)


def median_seconds(fns: list, repeats: int) -> list[float]:
    """Median time of each function. They run in turn within every repeat, so a noisy
    neighbour on this shared machine slows all of them alike instead of one of them."""
    for fn in fns:
        fn()                                             # warm-up: page faults, thread pool
    times = [[] for _ in fns]
    for r in range(repeats):
        order = list(range(len(fns)))
        if r % 2:
            order.reverse()
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def bench_one(layout: str, size: int, dtype: torch.dtype, repeats: int) -> list[dict]:
    src, dim, start, stop = make_layout(layout, size, dtype)
    src.normal_() if dtype.is_floating_point else src.random_()
    view = src.narrow(dim, start, stop - start)
    nbytes = view.numel() * view.element_size()
    pool = HostPool(nbytes, pin=False)
    block = pool.allocate(nbytes)
    out = block.view(dtype, tuple(view.shape))
    flat_out = block.view(torch.uint8, (nbytes,))
    flat_src = src.view(-1).view(torch.uint8)[:nbytes] if src.is_contiguous() else \
        src.transpose(1, 2).reshape(-1).view(torch.uint8)[:nbytes]
    native = _ext.csrc()
    assert native is not None, "memo._C is not active: " + str(_ext.status())

    memcpy = lambda: native._memcpy(flat_out, flat_src)                    # noqa: E731
    rows = []
    for op in ("pack", "unpack"):
        if op == "pack":
            ours = lambda: ops.pack_tokens(src, dim, start, stop, out)        # noqa: E731
            base = lambda: out.copy_(view)                                     # noqa: E731
        else:
            ours = lambda: ops.unpack_tokens(out, src, dim, start)            # noqa: E731
            base = lambda: view.copy_(out)                                     # noqa: E731
        ours_s, copy_s, memcpy_s = median_seconds([ours, base, memcpy], repeats)
        rows.append({"op": op, "layout": layout, "bytes": nbytes, "dtype": str(dtype).replace("torch.", ""),
                     "gbps": nbytes / ours_s / 1e9, "copy_gbps": nbytes / copy_s / 1e9,
                     "memcpy_gbps": nbytes / memcpy_s / 1e9, "repeats": repeats})
    # Correctness of what was timed: the last unpack wrote back what pack read.
    ops.pack_tokens(src, dim, start, stop, out)
    assert torch.equal(out, view)
    pool.free(block)
    pool.close()
    del src, view, out, flat_out, flat_src, block, pool
    gc.collect()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    p.add_argument("--layouts", nargs="+", default=["contiguous", "strided", "permuted"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=0, help="0: 21 below 64 MB, 7 from 64 MB, 5 at 1 GB")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"memo copy benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, csrc={_ext.status()['active']}", flush=True)
    results = []
    for mb in args.sizes_mb:
        size = int(mb * (1 << 20))
        repeats = args.repeats or (21 if size < 64 << 20 else 7 if size < 1 << 30 else 5)
        for layout in args.layouts:
            print(f"  {mb:g} MB {layout} ({repeats} repeats) ...", file=sys.stderr, flush=True)
            results.extend(bench_one(layout, size, dtype, repeats))
    hdr = f"{'op':<7}{'layout':<12}{'MB':>8}{'memo GB/s':>11}{'copy_ GB/s':>12}{'memcpy GB/s':>13}" \
          f"{'vs memcpy':>11}{'vs copy_':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['op']:<7}{r['layout']:<12}{r['bytes'] / 2**20:>8.1f}{r['gbps']:>11.2f}{r['copy_gbps']:>12.2f}"
              f"{r['memcpy_gbps']:>13.2f}{r['gbps'] / r['memcpy_gbps']:>10.2f}x{r['gbps'] / r['copy_gbps']:>9.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"results": results, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "dtype": args.dtype, "parallel_copy_bytes": os.environ.get("MEMO_PARALLEL_COPY_BYTES", "default")}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
