"""Level-1 planner benchmark on a traced 7B Llama layer (llama2-7b shapes, bf16, one rank).

For each length, the layer's forward and backward allocation traces (FakeTensorMode profile)
are placed by:
  * greedy      -- the heuristic that warm-starts the MIP (best of several orders, first/best fit);
  * mip         -- the planner as shipped: greedy warm start, CBC under --time-limit;
  * mip-cold    -- CBC alone from the trivial stacked layout, same time limit (shows what the
                   MIP does on its own; the shipped planner never needs this);
  * best-fit    -- the same request trace replayed through a caching allocator without a plan
                   (PyTorch-style best fit, segments never released): reserved bytes.
Then a whole step's request trace (32 layers of the same traces, swap ratio 1, last two layers
kept) is placed request by request and replayed through the same allocator.
Every number is a ratio to the lower bound (largest total of simultaneously live bytes).

    .venv/bin/python benchmarks/planner.py --json results/planner.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# This directory holds a benchmark named copy.py, which would shadow the standard library's
# `copy` for torch: import from the installed package only.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from memo.planner.dsa import align_allocs, solve_layout  # noqa: E402
from memo.planner.greedy import caching_allocator_replay  # noqa: E402
from memo.planner.layout import Alloc, lower_bound, validate_layout  # noqa: E402
from memo.planner.plan import trace_allocs  # noqa: E402
from memo.planner.units import format_bytes, parse_count  # noqa: E402
from memo.profile import load_model, profile_model  # noqa: E402


def run(model_name: str, lengths: list[int], time_limit: float, cold: bool, tile=None) -> list[dict]:
    model = load_model(model_name)
    rows = []
    for s in lengths:
        t0 = time.perf_counter()
        prof = profile_model(model, seq_len=s, tile_tokens=tile).to_dict()
        profile_s = time.perf_counter() - t0
        for part in ("forward", "backward"):
            allocs = trace_allocs(prof[part])
            greedy = solve_layout(allocs, use_mip=False)
            mip = solve_layout(allocs, time_limit=time_limit)
            validate_layout(allocs, mip.offsets, mip.peak)
            row = {"model": model_name, "seq_len": s, "block": part, "allocations": len(allocs),
                   "profile_s": profile_s, "lower_bound_bytes": mip.lower_bound,
                   "greedy_peak_bytes": greedy.peak, "greedy_ratio": greedy.peak / mip.lower_bound,
                   "greedy_s": greedy.solve_s,
                   "mip_peak_bytes": mip.peak, "mip_ratio": mip.peak / mip.lower_bound, "mip_s": mip.solve_s,
                   "mip_status": mip.status}
            if cold:
                c = solve_layout(allocs, time_limit=time_limit, warm_start=False)
                validate_layout(allocs, c.offsets, c.peak)
                row.update(cold_peak_bytes=c.peak, cold_ratio=c.peak / mip.lower_bound, cold_s=c.solve_s,
                           cold_status=c.status, cold_mip_gap=c.mip_gap)
            rep = caching_allocator_replay(allocs)
            row.update(bestfit_reserved_bytes=rep["reserved_bytes"],
                       bestfit_ratio=rep["reserved_bytes"] / mip.lower_bound)
            rows.append(row)
            print(_fmt(row, cold), flush=True)
    return rows


def step_trace(prof: dict, keep: int = 2) -> list[Alloc]:
    """A whole step's fine-grained request trace built from the profiled layer traces: every
    layer's forward and backward allocations in order; a swapped layer's saved activations are
    freed when the next layer's forward ends (copied out), prefetched back as separate requests
    when the next-later layer's backward starts, and the last ``keep`` layers keep theirs.
    Swap ratio 1 (everything saved is swapped). Returns allocations on one global op clock."""
    n = prof["model"]["layers"]
    fwd, bwd = prof["forward"], prof["backward"]
    fsteps, bsteps = fwd["steps"], bwd["steps"]
    out, t = [], 0
    fwd_start = []
    saved_end_of = {}
    for i in range(n):
        fwd_start.append(t)
        for a in fwd["allocs"]:
            if a["kind"] == "layer_input" and i > 0:
                continue                      # the previous layer's output (already allocated)
            out.append([f"L{i}.{a['id']}", a["bytes"], t + a["start"], t + a["end"], a["kind"], a["end"] >= fsteps])
        t += fsteps
    for i in reversed(range(n)):
        b0 = t
        for a in bwd["allocs"]:
            if a["kind"] == "param_grad":
                continue
            start = b0 + a["start"]
            if a["op"] == "carried" and i < n - keep:
                start = max(b0 - bsteps, 0)     # prefetched during the later layer's backward
            out.append([f"L{i}.{a['id']}", a["bytes"], start, b0 + a["end"], a["kind"], False])
        t += bsteps
        saved_end_of[i] = b0
    allocs = []
    for aid, nbytes, start, end, kind, alive_at_end in out:
        i = int(aid[1:aid.index(".")])
        if aid.split(".")[1].startswith("f") and alive_at_end:
            # Saved (or output) at the end of layer i's forward: swapped ones leave after the next
            # forward; kept layers hold them until their backward begins.
            end = saved_end_of[i] if i >= n - keep else fwd_start[min(i + 1, n - 1)] + fsteps
        allocs.append(Alloc(aid, nbytes, start, max(end, start + 1), kind))
    return align_allocs(allocs, 512)


def run_step(model_name: str, lengths: list[int], layers: int, tile=None) -> list[dict]:
    model = dict(load_model(model_name), layers=layers)
    rows = []
    for s in lengths:
        prof = profile_model(model, seq_len=s, tile_tokens=tile).to_dict()
        allocs = step_trace(prof)
        lb = lower_bound(allocs)
        rep = caching_allocator_replay(allocs)
        t0 = time.perf_counter()
        greedy = solve_layout(allocs, use_mip=False)
        row = {"model": model_name, "layers": layers, "seq_len": s, "block": "whole step", "allocations": len(allocs),
               "lower_bound_bytes": lb, "greedy_peak_bytes": greedy.peak, "greedy_ratio": greedy.peak / lb,
               "greedy_s": time.perf_counter() - t0, "bestfit_reserved_bytes": rep["reserved_bytes"],
               "bestfit_allocated_bytes": rep["allocated_bytes"], "bestfit_ratio": rep["reserved_bytes"] / lb}
        rows.append(row)
        print(f"{s:>9} {'step':<9}{len(allocs):>7}{format_bytes(lb):>13}{row['greedy_ratio']:>8.4f}"
              f"{'':>8}{'':>7}{row['bestfit_ratio']:>10.4f}", flush=True)
    return rows


def _header(cold: bool) -> str:
    h = (f"{'tokens':>9} {'block':<9}{'allocs':>7}{'lower bound':>13}{'greedy':>8}{'mip':>8}{'mip s':>7}")
    if cold:
        h += f"{'cold':>8}{'cold s':>8}"
    return h + f"{'best-fit':>10}"


def _fmt(r: dict, cold: bool) -> str:
    line = (f"{r['seq_len']:>9} {r['block']:<9}{r['allocations']:>7}{format_bytes(r['lower_bound_bytes']):>13}"
            f"{r['greedy_ratio']:>8.4f}{r['mip_ratio']:>8.4f}{r['mip_s']:>7.1f}")
    if cold:
        line += f"{r['cold_ratio']:>8.4f}{r['cold_s']:>8.1f}"
    return line + f"{r['bestfit_ratio']:>10.4f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--lengths", default="64K,256K,1M")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--no-cold", action="store_true", help="skip the MIP run without warm start")
    ap.add_argument("--step-layers", type=int, default=32, help="layers in the whole-step trace")
    ap.add_argument("--tile-tokens", default="none",
                    help="MLP tiling of the traced layer: none (default: the untiled trace, as in "
                         "results/planner.json), auto or a token count")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    tile = None if args.tile_tokens == "none" else ("auto" if args.tile_tokens == "auto" else int(args.tile_tokens))
    lengths = [parse_count(x) for x in args.lengths.split(",")]
    cold = not args.no_cold
    print(f"memo planner benchmark: {args.model} layer, bf16, one rank, CBC time limit {args.time_limit:.0f} s, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); ratios are peak / lower bound, "
          f"1 run each")
    print(_header(cold))
    rows = run(args.model, lengths, args.time_limit, cold, tile)
    print(f"whole step, {args.step_layers} layers, swap ratio 1, last 2 layers kept (greedy placement of every "
          f"request vs the same requests through the best-fit allocator):")
    rows += run_step(args.model, lengths, args.step_layers, tile)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"benchmark": "planner", "cpus": os.cpu_count(), "time_limit_s": args.time_limit,
                       "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
