"""Planner core: lower bound, validator, greedy, Level-1 MIP, caching-allocator baseline."""

import itertools
import random

import pytest

from memo.planner.dsa import _exact_offsets, align_allocs, solve_layout
from memo.planner.greedy import caching_allocator_replay, greedy_layout
from memo.planner.layout import Alloc, LayoutError, conflicting_pairs, lower_bound, validate_layout


def _allocs(spec, scale=1):
    return [Alloc(f"t{k}", size * scale, start, end) for k, (size, start, end) in enumerate(spec)]


def _brute_force_optimum(allocs):
    """Exact DSA optimum for tiny instances: every layout is dominated by the longest-path
    layout of the order of its offsets, so the best over all orders is optimal."""
    pairs = conflicting_pairs(allocs)
    best = None
    for perm in itertools.permutations(range(len(allocs))):
        off = _exact_offsets(allocs, list(perm), pairs)
        peak = max(off[a.id] + a.bytes for a in allocs)
        best = peak if best is None else min(best, peak)
    return best


def test_lower_bound_is_max_live_total():
    a = _allocs([(4, 0, 2), (3, 1, 3), (5, 2, 4), (1, 3, 5)])
    # step 0: 4; step 1: 4+3; step 2: 3+5; step 3: 5+1; step 4: 1
    assert lower_bound(a) == 8
    # Half-open lifetimes: an allocation freed at step 2 does not meet one made at step 2.
    assert lower_bound(_allocs([(10, 0, 2), (10, 2, 4)])) == 10


def test_validator_accepts_valid_and_rejects_planted_overlaps():
    a = _allocs([(4, 0, 2), (3, 1, 3), (5, 2, 4)])
    good = {"t0": 0, "t1": 4, "t2": 7}
    validate_layout(a, good, peak=12)
    # t2 may reuse t0's bytes: their lifetimes do not overlap.
    validate_layout(a, {"t0": 0, "t1": 5, "t2": 0}, peak=8)
    # Planted overlap: t1 starts one byte inside t0 while both are live.
    with pytest.raises(LayoutError, match="'t0'.*'t1'.*overlap in memory"):
        validate_layout(a, {"t0": 0, "t1": 3, "t2": 7})
    with pytest.raises(LayoutError, match="overlap in memory"):
        validate_layout(a, {"t0": 0, "t1": 0, "t2": 7})
    with pytest.raises(LayoutError, match="above the plan's peak"):
        validate_layout(a, good, peak=11)
    with pytest.raises(LayoutError, match="no offset"):
        validate_layout(a, {"t0": 0, "t1": 4})
    with pytest.raises(LayoutError, match="offsets are integers >= 0"):
        validate_layout(a, {"t0": -1, "t1": 4, "t2": 7})
    with pytest.raises(LayoutError, match="not unique"):
        validate_layout(a + [Alloc("t0", 1, 9, 10)], {"t0": 0, "t1": 4, "t2": 7})


def test_validator_rejects_overlaps_planted_in_solved_layouts():
    rng = random.Random(3)
    for _ in range(20):
        spec = [(rng.randint(1, 9), s, s + rng.randint(1, 5)) for s in (rng.randint(0, 8) for _ in range(12))]
        a = _allocs(spec, 512)
        lay = solve_layout(a, use_mip=False)
        validate_layout(a, lay.offsets, lay.peak)
        i, j = conflicting_pairs(a)[0]
        bad = dict(lay.offsets)
        bad[a[j].id] = bad[a[i].id]            # plant: put j exactly on top of i
        with pytest.raises(LayoutError):
            validate_layout(a, bad)


def test_alloc_rejects_empty_lifetime_and_negative_size():
    with pytest.raises(ValueError, match="empty lifetime"):
        Alloc("x", 1, 3, 3)
    with pytest.raises(ValueError, match="negative size"):
        Alloc("x", -1, 0, 1)


# Instances where the greedy start is worse than the optimum (found by brute force), with the
# optimum (= lower bound here) and the greedy's peak.
KNOWN = [
    ([(8, 3, 5), (3, 1, 7), (8, 8, 10), (4, 3, 7), (2, 5, 8), (7, 6, 10)], 16, 22),
    ([(1, 4, 10), (5, 0, 5), (3, 4, 8), (3, 8, 10), (7, 2, 4), (7, 6, 7)], 12, 16),
    ([(7, 1, 5), (4, 4, 10), (4, 1, 2), (8, 7, 8), (2, 0, 1), (8, 2, 4)], 15, 19),
]


@pytest.mark.parametrize("spec,optimum,greedy", KNOWN)
def test_mip_reaches_known_optimum_where_greedy_does_not(spec, optimum, greedy):
    a = _allocs(spec, 1000)
    _, g_peak, _ = greedy_layout(a)
    assert g_peak == greedy * 1000
    assert _brute_force_optimum(a) == optimum * 1000
    lay = solve_layout(a, time_limit=20)
    validate_layout(a, lay.offsets, lay.peak)
    assert lay.peak == optimum * 1000 and lay.method == "mip" and lay.optimal
    assert lay.greedy_peak == greedy * 1000 and lay.gap == 0.0 and lay.mip_gap == pytest.approx(0.0, abs=1e-9)


def test_mip_matches_brute_force_on_random_instances():
    rng = random.Random(11)
    for _ in range(12):
        spec = []
        for _ in range(6):
            s = rng.randint(0, 8)
            spec.append((rng.choice([1, 2, 3, 4, 5, 7, 8]), s, rng.randint(s + 1, 10)))
        a = _allocs(spec, 4096)
        lay = solve_layout(a, time_limit=20)
        validate_layout(a, lay.offsets, lay.peak)
        assert lay.peak == _brute_force_optimum(a)
        assert lay.peak <= lay.greedy_peak and lay.lower_bound <= lay.peak
        if lay.mip_bound is not None:
            assert lay.lower_bound <= lay.mip_bound <= lay.peak


def test_time_limit_bounds_the_solve_and_a_valid_plan_exists():
    rng = random.Random(5)
    spec = [(rng.randint(1, 64), s, s + rng.randint(2, 30)) for s in (rng.randint(0, 60) for _ in range(60))]
    a = _allocs(spec, 512)
    calls = []
    lay = solve_layout(a, time_limit=2.0, progress=lambda elapsed, limit: calls.append((elapsed, limit)))
    assert lay.solve_s < 10.0
    if lay.greedy_peak > lay.lower_bound:          # the MIP ran: the progress display was fed
        assert calls and all(limit == 2.0 for _, limit in calls)
    validate_layout(a, lay.offsets, lay.peak)
    assert lay.lower_bound <= lay.peak <= lay.greedy_peak
    if not lay.optimal:
        assert lay.mip_gap is not None and lay.mip_gap >= 0


def test_zero_size_allocations_and_alignment():
    a = [Alloc("z", 0, 0, 5), Alloc("a", 100, 0, 2), Alloc("b", 700, 1, 3)]
    lay = solve_layout(align_allocs(a, 512), time_limit=5)
    assert lay.peak == 512 + 1024
    assert [x.bytes for x in align_allocs(a, 512)] == [0, 512, 1024]


def test_caching_allocator_replay_fragments_where_a_plan_does_not():
    mib = 1 << 20
    # Two 40 MiB blocks, the first freed; a 60 MiB request cannot use the 40 MiB hole: a new
    # segment is reserved. A plan places it at offset 0 once both are free... here one is still
    # live, so the planned peak is 100 MiB but the allocator reserves 140 MiB.
    a = [Alloc("a", 40 * mib, 0, 2), Alloc("b", 40 * mib, 0, 4), Alloc("c", 60 * mib, 2, 4)]
    rep = caching_allocator_replay(a)
    assert rep["reserved_bytes"] == 140 * mib and rep["allocated_bytes"] == 100 * mib
    assert solve_layout(a, use_mip=False).peak == 100 * mib
    # Free blocks of separate segments never merge: two 30 MiB holes do not serve 60 MiB.
    a = [Alloc("a", 30 * mib, 0, 1), Alloc("b", 30 * mib, 0, 1), Alloc("c", 60 * mib, 1, 2)]
    assert caching_allocator_replay(a)["reserved_bytes"] == 120 * mib
    # Within a segment, blocks are split for smaller requests and coalesced again when freed.
    a = [Alloc("a", 60 * mib, 0, 1), Alloc("b", 20 * mib, 1, 2), Alloc("c", 30 * mib, 1, 2),
         Alloc("d", 60 * mib, 2, 3)]
    assert caching_allocator_replay(a)["reserved_bytes"] == 60 * mib
