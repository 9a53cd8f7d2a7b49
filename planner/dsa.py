"""Level 1 of the planner: dynamic storage allocation as a MIP (python-mip / CBC). Torch-free.

    minimise M
    A_i + S_i <= M                                    for every allocation i
    A_i + S_i <= A_j + (1 - z_ij) * Mcap              for every pair (i, j) live at the same time
    A_j + S_j <= A_i + z_ij * Mcap                    z_ij = 1: i lies below j

NOTE [ MIP plan is exact ]
  1. ``Mcap`` is the greedy peak: every layout worth finding fits below it, so it is a valid big-M.
  2. The MIP starts from the greedy layout (``model.start``) and runs under a time limit, so a
     plan always exists and the MIP can only improve it.
  3. The solver works in scaled floating-point units and tolerates tiny overlaps. Its answer is
     only used for the *order* of allocations (sorted by A_i); offsets are then recomputed in
     exact bytes as longest paths (each allocation sits on top of every earlier-ordered
     allocation it is live with), which is valid by construction and at most the MIP's peak
     plus rounding. The result must still pass ``validate_layout``.
  4. If that exact layout is not lower than the greedy one, the greedy one is kept.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from .greedy import greedy_layout
from .layout import Alloc, Layout, conflicting_pairs, layout_peak, lower_bound, validate_layout

ProgressFn = Callable[[float, float], None]   # (elapsed seconds, time limit)


def align_allocs(allocs: list[Alloc], alignment: int) -> list[Alloc]:
    """Round every size up to ``alignment`` bytes (CUDA allocations are 512-byte aligned)."""
    if alignment <= 1:
        return list(allocs)
    return [Alloc(a.id, (a.bytes + alignment - 1) // alignment * alignment, a.start, a.end, a.kind, a.op)
            for a in allocs]


def _exact_offsets(allocs: list[Alloc], order: list[int], pairs: list[tuple[int, int]]) -> dict[str, int]:
    """Longest-path offsets for a fixed bottom-to-top order. See NOTE [ MIP plan is exact ] rule 3."""
    rank = {i: r for r, i in enumerate(order)}
    below: list[list[int]] = [[] for _ in allocs]
    for i, j in pairs:
        lo, hi = (i, j) if rank[i] < rank[j] else (j, i)
        below[hi].append(lo)
    off: dict[int, int] = {}
    for i in order:
        off[i] = max((off[j] + allocs[j].bytes for j in below[i]), default=0)
    return {allocs[i].id: o for i, o in off.items()}


def solve_layout(
    allocs: list[Alloc],
    *,
    time_limit: float = 60.0,
    threads: int = 2,
    use_mip: bool = True,
    progress: Optional[ProgressFn] = None,
    warm_start: bool = True,
) -> Layout:
    """Place ``allocs`` in one arena with the lowest peak found within ``time_limit`` seconds.

    Returns a validated ``Layout``; ``optimal`` is True when the peak equals the lower bound or
    the MIP proved optimality. See NOTE [ MIP plan is exact ].

    ``warm_start=False`` (for benchmarks) runs the MIP even when the greedy already reaches the
    lower bound, starting it from the trivial layout that stacks every allocation.
    """
    t0 = time.perf_counter()
    allocs = list(allocs)
    lb = lower_bound(allocs)
    offsets, g_peak, g_name = greedy_layout(allocs)
    validate_layout(allocs, offsets, g_peak)
    if not warm_start:
        offsets, g_name, total = {}, "none (stacked)", 0
        for a in allocs:
            offsets[a.id], total = total, total + a.bytes
        g_peak = total
    if (g_peak <= lb and warm_start) or not use_mip:
        return Layout(allocs, offsets, g_peak, lb, "greedy" if allocs else "trivial", time.perf_counter() - t0,
                      g_peak, optimal=g_peak <= lb, mip_gap=0.0 if g_peak <= lb else None,
                      mip_bound=lb if g_peak <= lb else None, status=f"greedy ({g_name})" + (", equals the lower bound"
                                                                                    if g_peak <= lb else ""))

    import mip  # python-mip: imported here so that torch-free callers that only validate stay light

    nz = [i for i, a in enumerate(allocs) if a.bytes > 0]
    sub = [allocs[i] for i in nz]
    pairs = conflicting_pairs(sub)
    unit = max(g_peak / 1e6, 1.0)
    cap = g_peak / unit
    size = [a.bytes / unit for a in sub]

    model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    model.threads = threads
    M = model.add_var("M", lb=lb / unit, ub=cap)
    A = [model.add_var(f"A{k}", lb=0.0, ub=max(cap - size[k], 0.0)) for k in range(len(sub))]
    Z = {}
    for i, j in pairs:
        z = model.add_var(f"z{i}_{j}", var_type=mip.BINARY)
        Z[i, j] = z
        model += A[i] + size[i] <= A[j] + (1 - z) * cap
        model += A[j] + size[j] <= A[i] + z * cap
    for k in range(len(sub)):
        model += A[k] + size[k] <= M
    model.objective = mip.minimize(M)
    start = [(M, cap)] + [(A[k], offsets[sub[k].id] / unit) for k in range(len(sub))]
    for (i, j), z in Z.items():
        start.append((z, 1.0 if offsets[sub[i].id] + sub[i].bytes <= offsets[sub[j].id] else 0.0))
    model.start = start

    result: dict = {}

    def run() -> None:
        result["status"] = model.optimize(max_seconds=max(time_limit - (time.perf_counter() - t0), 1.0))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.25)
        if progress is not None:
            progress(time.perf_counter() - t0, time_limit)
    status = result.get("status")

    best_offsets, best_peak, method = offsets, g_peak, "greedy"
    if model.num_solutions:
        order = sorted(range(len(sub)), key=lambda k: (A[k].x, k))
        exact = _exact_offsets(sub, order, pairs)
        for i, a in enumerate(allocs):
            if a.bytes == 0:
                exact[a.id] = 0
        peak = layout_peak(allocs, exact)
        if peak < g_peak:
            best_offsets, best_peak, method = exact, peak, "mip"
    validate_layout(allocs, best_offsets, best_peak)
    bound = model.objective_bound
    mip_bound = int(max(lb, bound * unit)) if bound is not None and bound == bound else lb
    mip_bound = min(mip_bound, best_peak)
    optimal = best_peak <= lb or status == mip.OptimizationStatus.OPTIMAL
    mip_gap = max(0.0, (best_peak - mip_bound) / best_peak) if best_peak else 0.0
    return Layout(allocs, best_offsets, best_peak, lb, method, time.perf_counter() - t0, g_peak, optimal=optimal,
                  mip_gap=mip_gap, mip_bound=mip_bound,
                  status=f"CBC {status.name.lower() if status is not None else 'not run'}, "
                         f"{len(pairs)} pairs, warm start {g_name}")
